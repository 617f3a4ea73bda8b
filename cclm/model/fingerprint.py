"""Which weights a saved model folder holds: a digest over its weight files, so that a result or an index can say
which model made it (a folder saved again with other weights gives another digest)."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from cclm.runtime.checkpoint import sha256


def weights_digest(directory: str | Path) -> str:
    """sha256 over the ``*.safetensors`` files of ``directory`` (their names and contents)."""
    digest = hashlib.sha256()
    for path in sorted(Path(directory).glob("*.safetensors")):
        stat = path.stat()
        digest.update(
            f"{path.name}:{_file_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)};".encode()
        )
    return digest.hexdigest()


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """A file's sha256, read once per (path, size, modification time): a run that checks a model's digest before
    and after its work reads a large weight file once."""
    return sha256(Path(path))
