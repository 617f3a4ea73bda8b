"""Reading annotation files: JSON lines and JSON documents, with errors that name the file and line."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class AnnotationError(ValueError):
    """An annotation file that cannot be used; the message names the file (and line where there is one)."""


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` for every non-blank line; a bad line fails naming ``file:line``."""
    path = Path(path)
    if not path.exists():
        raise AnnotationError(f"annotation file not found: {path}")
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise AnnotationError(
                    f"{path}:{number}: malformed JSON line ({err.msg} at column {err.colno})"
                ) from None
            if not isinstance(record, dict):
                raise AnnotationError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            yield number, record


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise AnnotationError(f"annotation file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise AnnotationError(
            f"{path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno})"
        ) from None


def field(record: dict[str, Any], key: str, where: str) -> Any:
    """``record[key]``, or an error naming the location and the missing field."""
    if key not in record:
        raise AnnotationError(f"{where}: missing field '{key}'")
    return record[key]


_LANG = re.compile(r"^[a-z]{2,3}$")
_FILE_LANG = re.compile(r"(?:^|[-_])([a-z]{2,3})(?:_gmt|_train\d+)?$")


def language_from_path(path: str | Path, default: str = "en") -> str:
    """The language an IGLUE file is for: its folder (``annotations/de/test.jsonl``) or its name
    (``marvl-id.jsonl``, ``test_ar_gmt.jsonl``, ``marvl-zh_train10.jsonl``); English sources get ``default``."""
    path = Path(path)
    if _LANG.match(path.parent.name):
        return path.parent.name
    match = _FILE_LANG.search(path.stem)
    if match and match.group(1) not in {"ann", "dev", "val"}:
        return match.group(1)
    return default
