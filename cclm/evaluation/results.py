"""Per-language result tables: ``<name>.json``, ``<name>.csv`` and ``<name>.md`` with one row per language. The one
writer of the retrieval benchmarks (``cclm evaluate retrieval``) and of the IGLUE protocols
(:func:`cclm.tasks.results.write_task_results`)."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ENGLISH = "en"
AVERAGE = "avg"
RESULT_FILES = (".json", ".csv", ".md")


def mean_over_languages(
    rows: Mapping[str, Mapping[str, Any]], columns: Sequence[str] | None = None, exclude: Sequence[str] = ()
) -> dict[str, float]:
    """Mean of each column (default: every key of the first kept row) over the languages not in ``exclude``;
    empty when no language is left."""
    kept = [values for lang, values in rows.items() if lang not in exclude]
    if not kept:
        return {}
    columns = list(kept[0]) if columns is None else columns
    return {column: sum(float(values[column]) for values in kept) / len(kept) for column in columns}


def non_english_average(
    rows: Mapping[str, Mapping[str, Any]], columns: Sequence[str]
) -> dict[str, float] | None:
    """IGLUE's ``avg``: the mean of each column over the languages other than English; None when there are none."""
    return mean_over_languages(rows, columns, exclude=(ENGLISH,)) or None


def _fmt(value) -> str:
    """Two decimals (percentages); a small non-zero number (a learning rate) keeps its digits: 1e-4, not 0.00."""
    if not isinstance(value, float):
        return str(value)
    return f"{value:.2g}" if 0 < abs(value) < 0.01 else f"{value:.2f}"


def _markdown_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def write_results(
    out_dir: str | Path,
    name: str,
    rows: Mapping[str, Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    extra_columns: Sequence[str] = (),
    *,
    title: str | None = None,
    header: Mapping[str, Any] | None = None,
    iglue_average: bool = False,
    write: bool = True,
) -> dict:
    """Write the three files of ``rows`` (language -> values) into ``out_dir``; returns the JSON document.

    ``columns`` are the metrics (default: every key of the first row), ``extra_columns`` values shown per row in
    the CSV and Markdown files. Without ``header`` the JSON file is ``{language: values}``; with it (IGLUE:
    ``{"task", "protocol"}``) it is ``{**header, "metrics", "rows": [{"language", ...}], "average_non_english"}``.
    ``iglue_average`` adds the IGLUE average over the non-English languages as a last row (``avg``) and,
    in the Markdown file, IGLUE's own layout of each metric: languages as columns, then the average.
    ``write=False`` only returns the document (the other ranks of a multi-process run)."""
    out_dir = Path(out_dir)
    columns = list(next(iter(rows.values()), {}) if columns is None else columns)
    average = non_english_average(rows, columns) if iglue_average else None
    if header is None:
        document: dict = {lang: dict(values) for lang, values in rows.items()}
    else:
        document = {
            **header,
            "metrics": columns,
            "rows": [{"language": lang, **values} for lang, values in rows.items()],
            "average_non_english": average,
        }
    if not write:
        return document
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(
        json.dumps(document, indent=2, ensure_ascii=False), encoding="utf-8"
    )

    fields = [*columns, *extra_columns]
    table = [[lang, *(_fmt(values.get(c, "")) for c in fields)] for lang, values in rows.items()]
    average_cells = ([_fmt(average[c]) for c in columns] + [""] * len(extra_columns)) if average else []
    with (out_dir / f"{name}.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["language", *fields])
        writer.writerows(table)
        if average:
            writer.writerow([AVERAGE, *average_cells])

    lines = [f"# {title or name}", "", _markdown_row(["language", *fields]), "|" + "---|" * (1 + len(fields))]
    lines += [_markdown_row(cells) for cells in table]
    if average:
        lines.append(_markdown_row([f"**{AVERAGE}** (non-English)", *average_cells]))
    if iglue_average:
        for column in columns:
            lines += [
                "",
                f"IGLUE layout ({column}):",
                "",
                _markdown_row([*rows, AVERAGE]),
                "|" + "---|" * (len(rows) + 1),
                _markdown_row(
                    [
                        *(_fmt(values[column]) for values in rows.values()),
                        _fmt(average[column]) if average else "-",
                    ]
                ),
            ]
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return document


def set_aside(out_dir: str | Path, name: str) -> Path:
    """Rename the result files of ``name`` in ``out_dir`` to ``<name>.old-<time>.*`` (never deleted); returns the
    new JSON path."""
    out_dir = Path(out_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, suffix = f"{name}.old-{stamp}", 1
    while any((out_dir / (aside + ext)).exists() for ext in RESULT_FILES):
        aside, suffix = f"{name}.old-{stamp}-{suffix}", suffix + 1
    for ext in RESULT_FILES:
        if (out_dir / (name + ext)).exists():
            (out_dir / (name + ext)).rename(out_dir / (aside + ext))
    return out_dir / (aside + ".json")
