"""Reading IGLUE annotation files: JSON lines and JSON documents, every problem an :class:`AnnotationError` naming
``file:line``; each field a reader uses is type-checked as it is read, so a bad record fails before training
starts, never as a crash in the middle of it. Also the language of an IGLUE file.

Unlike the converters (which skip and count an undecodable line), a line that is not UTF-8 is an error here: the
IGLUE annotations are curated releases, so such a line means a damaged copy, and dropping it would silently
change the benchmark.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cclm.data.languages import normalize_language
from cclm.errors import DataError
from cclm.jsonl import json_kind, read_jsonl
from cclm.text_safety import printable_json


class AnnotationError(DataError, ValueError):
    """An annotation file that cannot be used; the message names the file and line (and the field)."""


# ----------------------------------------------------------------------------------------------- field types
@dataclass(frozen=True)
class FieldType:
    """What a field must hold, as said in an error message (``a string``), and the check of a value."""

    name: str
    accepts: Callable[[Any], bool]


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not the number 1


TEXT = FieldType("a string", lambda v: isinstance(v, str))
# Image and record ids: IGLUE writes strings, but some releases write numbers (COCO ids in xFlickr&CO).
IDENTIFIER = FieldType("a string or an integer", lambda v: isinstance(v, str) or _is_integer(v))
TEXT_LIST = FieldType(
    "a non-empty list of strings",
    lambda v: isinstance(v, list) and bool(v) and all(isinstance(s, str) for s in v),
)
BOOLEAN_OR_TEXT = FieldType("a boolean or a string", lambda v: isinstance(v, (bool, str)))
INTEGER = FieldType("an integer", _is_integer)
OBJECT = FieldType("a JSON object", lambda v: isinstance(v, dict))


def _shown(value: Any, limit: int = 60) -> str:
    """A value as JSON, its control characters escaped: a crafted value cannot drive the terminal."""
    text = printable_json(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_type(value: Any, expected: FieldType, what: str, where: str) -> Any:
    """``value``, or an error saying where, what (``field 'x'``), what it must be and what it is."""
    if not expected.accepts(value):
        got = json_kind(value) if value is None else f"{json_kind(value)} {_shown(value)}"
        raise AnnotationError(f"{where}: {what} must be {expected.name}, got {got}")
    return value


def field(record: dict[str, Any], key: str, where: str, expected: FieldType = TEXT) -> Any:
    """``record[key]`` checked against ``expected``; a missing field or a wrong type fails naming ``where``."""
    if key not in record:
        raise AnnotationError(f"{where}: missing field '{key}'")
    return check_type(record[key], expected, f"field '{key}'", where)


def optional_field(
    record: dict[str, Any], key: str, where: str, expected: FieldType = TEXT, default: Any = None
) -> Any:
    """``record[key]`` checked against ``expected`` when the record has it, else ``default``."""
    if key not in record:
        return default
    return check_type(record[key], expected, f"field '{key}'", where)


# ----------------------------------------------------------------------------------------------------- files
def _require_file(path: Path) -> None:
    if not path.is_file():
        raise AnnotationError(f"file not found: {path}")


def _not_utf8(path: Path, line: int, byte: int, column: int) -> AnnotationError:
    return AnnotationError(
        f"{path}:{line}: not valid UTF-8 (byte 0x{byte:02x} at column {column}); IGLUE annotations are "
        "curated files, so an undecodable line is an error rather than a skipped line: download the file "
        "again or repair that line"
    )


def read_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` for every non-blank line of a JSON-lines file; a missing file, a line that is
    not UTF-8, not JSON, or not a JSON object fails naming ``file:line``."""

    def refuse(path: Path, number: int, raw: bytes, err: UnicodeDecodeError) -> None:
        raise _not_utf8(path, number, raw[err.start], err.start + 1)

    return read_jsonl(path, error=AnnotationError, on_undecodable=refuse)


def _document_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line_start = raw.rfind(b"\n", 0, err.start) + 1
        line = raw.count(b"\n", 0, err.start) + 1
        raise _not_utf8(path, line, raw[err.start], err.start - line_start + 1) from None


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


class _JsonDocument:
    """A JSON file's text, read value by value so that each value's line is known (a whole-document
    ``json.load`` forgets where things were); every error names ``file:line``."""

    def __init__(self, path: Path):
        self.path = path
        self.text = _document_text(path)
        self._decoder = json.JSONDecoder()
        self._position, self._line = 0, 1

    def line_at(self, position: int) -> int:  # positions only grow: count the newlines since the last call
        self._line += self.text.count("\n", self._position, position)
        self._position = position
        return self._line

    def malformed(self, message: str, position: int) -> AnnotationError:
        err = json.JSONDecodeError(message, self.text, position)
        return AnnotationError(f"{self.path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno})")

    def decode_at(self, position: int) -> tuple[Any, int]:
        try:
            return self._decoder.raw_decode(self.text, position)
        except json.JSONDecodeError as err:
            raise self.malformed(err.msg, err.pos) from None

    def skip_space(self, position: int) -> int:
        return _JSON_SPACE.match(self.text, position).end()

    def starts(self, token: str, position: int) -> bool:
        return self.text.startswith(token, position)

    def children(self, opening: str, kind: str, parse: Callable[[int], tuple[Any, int]]) -> Iterator[Any]:
        """What ``parse(position) -> (result, end)`` makes of each child of the document's one container
        (``opening`` ``{`` or ``[``, named ``kind`` in errors), in order; anything after the container fails."""
        closing = "}" if opening == "{" else "]"
        position = self.skip_space(0)
        if not self.starts(opening, position):
            document, _ = self.decode_at(position)
            raise AnnotationError(
                f"{self.path}:{self.line_at(position)}: expected a JSON {kind}, got {json_kind(document)}"
            )
        position, first = self.skip_space(position + 1), True
        while not self.starts(closing, position):
            if not first:
                if not self.starts(",", position):
                    raise self.malformed("Expecting ',' delimiter", position)
                position = self.skip_space(position + 1)
            result, end = parse(position)
            first = False
            yield result
            position = self.skip_space(end)
        end = self.skip_space(position + 1)
        if end != len(self.text):
            raise self.malformed("Extra data", end)


def read_object_entries(path: str | Path) -> Iterator[tuple[int, str, Any]]:
    """``(line, key, value)`` of each member of a JSON document that is one object (xGQA's ``{question_id:
    question}``, ``trainval_ans2label.json``), ``line`` being where the value starts. A missing file, bytes that
    are not UTF-8, malformed JSON, a document that is not an object or a key given twice fail naming
    ``file:line``. One pass over the text: the members are decoded one by one to learn their lines."""
    path = Path(path)
    _require_file(path)
    doc = _JsonDocument(path)

    def member(position: int) -> tuple[tuple[int, str, Any], int]:
        if not doc.starts('"', position):
            raise doc.malformed("Expecting property name enclosed in double quotes", position)
        key, position = doc.decode_at(position)
        position = doc.skip_space(position)
        if not doc.starts(":", position):
            raise doc.malformed("Expecting ':' delimiter", position)
        start = doc.skip_space(position + 1)
        value, end = doc.decode_at(start)
        return (doc.line_at(start), key, value), end

    first_line: dict[str, int] = {}
    for line, key, value in doc.children("{", "object", member):
        if key in first_line:
            raise AnnotationError(
                f"{path}:{line}: key {_shown(key)} given twice (first at line {first_line[key]})"
            )
        first_line[key] = line
        yield line, key, value


def read_array_items(path: str | Path) -> Iterator[tuple[int, Any]]:
    """``(line, item)`` of each item of a JSON document that is one array (the CCLM reference's retrieval files),
    ``line`` being where the item starts. A missing file, bytes that are not UTF-8, malformed JSON or a document
    that is not an array fail naming ``file:line``."""
    path = Path(path)
    _require_file(path)
    doc = _JsonDocument(path)

    def item(position: int) -> tuple[tuple[int, Any], int]:
        value, end = doc.decode_at(position)
        return (doc.line_at(position), value), end

    yield from doc.children("[", "array", item)


# -------------------------------------------------------------------------------------------------- language
_LANG = re.compile(r"^[a-z]{2,3}$")
_FILE_LANG = re.compile(r"(?:^|[-_])([a-z]{2,3})(?:_gmt|_train\d+(?:x\d+)?)?$")


def language_from_path(path: str | Path, default: str = "en") -> str:
    """The language an IGLUE file is for: its folder (``annotations/de/test.jsonl``) or its name
    (``marvl-id.jsonl``, ``test_ar_gmt.jsonl``, ``marvl-zh_train10.jsonl``, ``marvl-tr_train10x2.jsonl``), when
    that is a known language code; English sources and other names get ``default``."""
    path = Path(path)
    if _LANG.match(path.parent.name) and normalize_language(path.parent.name):
        return path.parent.name
    match = _FILE_LANG.search(path.stem)
    if match and normalize_language(match.group(1)):  # a known code, not "out/" or "train_all"
        return match.group(1)
    return default
