"""Printing strings a user does not control (file names, annotation values) on a terminal: every character that
is not printable is shown as an escape, so a crafted name cannot recolour the terminal, set its title, move the
cursor, fake a line of output or reorder text with bidirectional controls.

Escaped: control characters (C0, DEL, C1), format characters (bidirectional overrides, zero-width characters),
line and paragraph separators, private-use and unassigned code points, and the lone surrogates that stand for
the undecodable bytes of a file name (shown as the byte, ``\\xNN``). Printable text, spaces and backslashes are
kept as they are. No import from cclm: any layer may use it.
"""

from __future__ import annotations

import json
import unicodedata
from typing import Any

_UNSAFE_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}
# os.fsdecode turns each byte of a file name that is not UTF-8 into one of these (PEP 383 surrogateescape)
_ESCAPED_BYTES = range(0xDC80, 0xDD00)


def _is_unsafe(char: str) -> bool:
    return unicodedata.category(char) in _UNSAFE_CATEGORIES


def _escape(char: str) -> str:
    code = ord(char)
    if code in _ESCAPED_BYTES:
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: Any) -> str:
    """``str(text)`` with every unsafe character replaced by a visible escape (``\\x1b``, ``\\u202e``)."""
    text = str(text)
    if text.isprintable():  # the common case, in C
        return text
    return "".join(_escape(char) if _is_unsafe(char) else char for char in text)


def _json_escape(char: str) -> str:
    code = ord(char)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000  # a JSON string spells a code point above U+FFFF as a surrogate pair
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def printable_json(value: Any) -> str:
    """``json.dumps(value, ensure_ascii=False)`` with every unsafe character written as a JSON ``\\uNNNN``
    escape: the line stays valid JSON that decodes to the same value, and readable for non-ASCII text."""
    text = json.dumps(value, ensure_ascii=False)
    if text.isprintable():
        return text
    return "".join(_json_escape(char) if _is_unsafe(char) else char for char in text)
