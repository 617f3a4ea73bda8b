"""Reading JSON and JSON-lines files, with one error policy for the whole project: a file that cannot be used
raises :class:`JsonFileError` (a ``ValueError``) naming the file, and the line where there is one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cclm.errors import DataError


class JsonFileError(DataError, ValueError):
    """A JSON / JSON-lines file that cannot be used; the message names the file (and line)."""


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` for every non-blank line; a missing file, a line that is not JSON, or a
    line that is not an object fails naming ``file:line``."""
    path = Path(path)
    if not path.is_file():
        raise JsonFileError(f"file not found: {path}")
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise JsonFileError(
                    f"{path}:{number}: malformed JSON line ({err.msg} at column {err.colno})"
                ) from None
            if not isinstance(record, dict):
                raise JsonFileError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            yield number, record


def read_json(path: str | Path) -> Any:
    """The document of a JSON file; a missing or malformed file fails naming it (and the line)."""
    path = Path(path)
    if not path.is_file():
        raise JsonFileError(f"file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise JsonFileError(
            f"{path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno})"
        ) from None
