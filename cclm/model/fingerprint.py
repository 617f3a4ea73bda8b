"""Which weights a saved model folder holds: a digest over its weight files, so that a result or an index can say
which model made it (a folder saved again with other weights gives another digest)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from cclm.runtime.checkpoint import sha256


def weights_digest(directory: str | Path) -> str:
    """sha256 over the ``*.safetensors`` files of ``directory`` (their names and contents)."""
    digest = hashlib.sha256()
    for path in sorted(Path(directory).glob("*.safetensors")):
        digest.update(f"{path.name}:{sha256(path)};".encode())
    return digest.hexdigest()
