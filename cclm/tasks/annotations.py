"""Reading annotation files: JSON lines and JSON documents through the project's reader (:mod:`cclm.jsonl`), whose
errors name the file and line, plus the field check and the language of an IGLUE file."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from cclm.jsonl import JsonFileError

# Annotation errors are the reader's errors: a bad line and a bad field are caught by the same except clause.
AnnotationError = JsonFileError


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
