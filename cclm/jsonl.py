"""Reading JSON and JSON-lines files, with one error policy for the whole project: a file that cannot be used
raises :class:`JsonFileError` (a ``ValueError``) naming the file, and the line where there is one."""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cclm.errors import DataError


class JsonFileError(DataError, ValueError):
    """A JSON / JSON-lines file that cannot be used; the message names the file (and line)."""


def json_kind(value: Any) -> str:
    """How JSON calls a value's type (``null``, ``a number``, ``a list`` ...), for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _refuse_undecodable(path: Path, number: int, raw: bytes, err: UnicodeDecodeError) -> None:
    raise JsonFileError(f"{path}:{number}: not UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})")


def read_jsonl(
    path: str | Path,
    *,
    error: type[Exception] = JsonFileError,
    on_undecodable: Callable[[Path, int, bytes, UnicodeDecodeError], None] = _refuse_undecodable,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` for every non-blank line; a missing file, a line that is not JSON, or a
    line that is not an object fails naming ``file:line`` (raising ``error``). Lines are decoded one by one, so a
    line that is not UTF-8 is named by its own number: ``on_undecodable(path, line, raw, err)`` raises (the
    default) or returns to skip the line (a converter counting it). A leading byte-order mark is allowed."""
    path = Path(path)
    if not path.is_file():
        raise error(f"file not found: {path}")
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                on_undecodable(path, number, raw, err)
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise error(
                    f"{path}:{number}: malformed JSON line ({err.msg} at column {err.colno})"
                ) from None
            if not isinstance(record, dict):
                raise error(f"{path}:{number}: expected a JSON object, got {json_kind(record)}")
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
