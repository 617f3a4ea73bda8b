"""Reading JSON and JSON-lines files, with one error policy for the whole project: a file that cannot be used
raises :class:`JsonFileError` (a ``ValueError``) naming the file, and the line where there is one."""

from __future__ import annotations

import codecs
import json
import re
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


# JSON's escape of a UTF-16 surrogate (U+D800-U+DFFF). json.loads makes a lone one (half an emoji a scraper cut)
# into a str that no UTF-8 writer or tokenizer takes, failing far from the line that holds it.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SURROGATE_ESCAPE_BYTES = re.compile(_SURROGATE_ESCAPE.pattern.encode())


def lone_surrogate(raw: str | bytes, value: Any) -> str | None:
    """Why ``value``, parsed from the JSON text ``raw``, is not Unicode text: it holds a lone surrogate (a pair
    is one character and fine); None when it is text. Costs a search of ``raw`` only, unless it escapes one."""
    pattern = _SURROGATE_ESCAPE_BYTES if isinstance(raw, bytes) else _SURROGATE_ESCAPE
    if not pattern.search(raw):
        return None
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        code = ord(err.object[err.start])
        return f"a lone UTF-16 surrogate (\\u{code:04x}, half of a character) in a string: not Unicode text"
    return None


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
            surrogate = lone_surrogate(line, record)
            if surrogate:
                raise error(f"{path}:{number}: {surrogate}")
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
