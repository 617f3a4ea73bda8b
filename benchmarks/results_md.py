"""Adding a benchmark's result lines to its own section of ``benchmarks/RESULTS.md``.

Every ``benchmarks/bench_*.py`` records a run with :func:`append_to_section`: the lines go after the last line of
the benchmark's section (before the next ``## `` heading and the blank lines in front of it), not at the end of the
file, where they would land in whichever section happens to be last.
"""

from __future__ import annotations

from pathlib import Path


def find_section(lines: list[str], match: str) -> int | None:
    """Index of the first ``## `` heading line that starts with ``match`` (a heading may carry a date or a note
    after the part that names the benchmark), or None."""
    for i, line in enumerate(lines):
        if line.startswith("## ") and line.startswith(match):
            return i
    return None


def append_to_section(path: Path, heading: str, text: str, match: str | None = None) -> None:
    """Add ``text`` (one or more lines) as the last lines of the section whose heading starts with ``match``
    (default: ``heading``); when the file has no such section, at its end under a new ``heading``."""
    if not heading.startswith("## "):
        raise ValueError(f"a section heading starts with '## ': {heading!r}")
    if not text.endswith("\n"):
        text += "\n"
    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    lines = old.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):  # the file's last line had no newline
        lines[-1] += "\n"
    at = find_section(lines, match or heading)
    if at is None:
        separator = "" if not old or old.endswith("\n\n") else ("\n" if old.endswith("\n") else "\n\n")
        path.write_text(f"{old}{separator}{heading}\n\n{text}", encoding="utf-8")
        return
    start = at + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    while end > start and not lines[end - 1].strip():  # after the section's last line, before its blank lines
        end -= 1
    if end == start:  # a heading with nothing under it yet: keep a blank line between the two
        lines.insert(end, "\n")
        end += 1
    path.write_text("".join(lines[:end] + [text] + lines[end:]), encoding="utf-8")
