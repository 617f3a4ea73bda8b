"""IGLUE result tables: ``<output_dir>/results/<task>/<protocol>.{json,csv,md}``, one row per language (in the
configured order) and the average over non-English languages, as the IGLUE paper reports it; written by the
project's one per-language writer, :func:`cclm.evaluation.results.write_results`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cclm.evaluation.results import write_results


def write_task_results(
    output_dir: str | Path,
    task: str,
    protocol: str,
    rows: Sequence[dict],
    columns: Sequence[str],
    extra_columns: Sequence[str] = (),
    write: bool = True,
) -> dict:
    """Write the table of ``rows`` (dicts with ``language``); ``columns`` are the metrics averaged,
    ``extra_columns`` are shown per row only. Returns ``{"task", "protocol", "metrics", "rows",
    "average_non_english"}`` (the JSON file; ``write=False``: only returned)."""
    by_language = {row["language"]: row for row in rows}
    if len(by_language) != len(rows):
        raise ValueError(
            f"{task} {protocol}: a language has several rows ({[row['language'] for row in rows]})"
        )
    return write_results(
        Path(output_dir) / "results" / task,
        protocol,
        by_language,
        columns,
        extra_columns,
        title=f"{task} -- {protocol.replace('_', '-')}",
        header={"task": task, "protocol": protocol},
        iglue_average=True,
        write=write,
    )
