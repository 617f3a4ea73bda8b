"""Result tables: ``results/<task>/<protocol>.{json,csv,md}`` with one row per language (in the configured IGLUE
order) and the average over non-English languages, as the IGLUE paper reports it."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

from cclm.tasks.metrics import average_non_english

AVERAGE = "avg"


def _fmt(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def write_results(
    output_dir: str | Path,
    task: str,
    protocol: str,
    rows: Sequence[dict],
    columns: Sequence[str],
    extra_columns: Sequence[str] = (),
) -> dict:
    """Write the three files; ``columns`` are the metrics averaged, ``extra_columns`` are shown per row only."""
    folder = Path(output_dir) / "results" / task
    folder.mkdir(parents=True, exist_ok=True)
    average = average_non_english(rows, columns)
    table = {
        "task": task,
        "protocol": protocol,
        "metrics": list(columns),
        "rows": list(rows),
        "average_non_english": average,
    }
    (folder / f"{protocol}.json").write_text(json.dumps(table, indent=2, ensure_ascii=False))

    header = ["language", *columns, *extra_columns]
    with (folder / f"{protocol}.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row in rows:
            writer.writerow([_fmt(row.get(c, "")) for c in header])
        if average is not None:
            writer.writerow([AVERAGE, *(_fmt(average[c]) for c in columns), *([""] * len(extra_columns))])

    lines = [
        f"# {task} -- {protocol.replace('_', '-')}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(_fmt(row.get(c, "")) for c in header) + " |" for row in rows]
    if average is not None:
        lines.append(
            "| "
            + " | ".join(
                [
                    f"**{AVERAGE}** (non-English)",
                    *(_fmt(average[c]) for c in columns),
                    *([""] * len(extra_columns)),
                ]
            )
            + " |"
        )
    # IGLUE's own layout: languages as columns, English first, then the average over the others.
    for column in columns:
        langs = [row["language"] for row in rows]
        lines += [
            "",
            f"IGLUE layout ({column}):",
            "",
            "| " + " | ".join([*langs, AVERAGE]) + " |",
            "|" + "---|" * (len(langs) + 1),
            "| "
            + " | ".join([*(_fmt(row[column]) for row in rows), _fmt(average[column]) if average else "-"])
            + " |",
        ]
    (folder / f"{protocol}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return table
