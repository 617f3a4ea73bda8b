"""IGLUE result tables: ``<output_dir>/results/<task>/<name>.{json,csv,md}``, one row per language (in the
configured order) and the average over non-English languages, as the IGLUE paper reports it; written by the
project's one per-language writer, :func:`cclm.evaluation.results.write_results`.

``name`` is the protocol (``zero_shot``, ``translate_test``, ``few_shot``) or, for a few-shot run of several shot
counts, ``few_shot_<shots>``; a few-shot table selected on the test files (``train.select_on=test``) ends in
``_selected_on_test`` and says so in its JSON header (``"selected_on": "test"``) and Markdown title."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cclm.evaluation.results import write_results

SELECTED_ON_TEST_NOTE = (
    "SELECTED ON TEST: learning rate and step chosen on this test file (the CCLM reference's few-shot protocol); "
    "not a held-out number"
)


def table_title(task: str, protocol: str, details: Mapping[str, Any] | None = None) -> str:
    """``xvnli -- few-shot (48 shots, selected on dev)``; a test-selected table says so in capitals."""
    details = dict(details or {})
    parts = []
    if details.get("shots"):
        parts.append(f"{details['shots']} shots")
    if details.get("selected_on"):
        parts.append(f"selected on {details['selected_on']}")
    title = f"{task} -- {protocol.replace('_', '-')}" + (f" ({', '.join(parts)})" if parts else "")
    if details.get("selected_on") == "test":
        title += f" -- {SELECTED_ON_TEST_NOTE}"
    return title


def write_task_results(
    output_dir: str | Path,
    task: str,
    protocol: str,
    rows: Sequence[dict],
    columns: Sequence[str],
    extra_columns: Sequence[str] = (),
    write: bool = True,
    *,
    name: str | None = None,
    details: Mapping[str, Any] | None = None,
) -> dict:
    """Write the table of ``rows`` (dicts with ``language``) as ``name`` (default: ``protocol``); ``columns`` are
    the metrics averaged, ``extra_columns`` are shown per row only; ``details`` (few-shot: ``shots``,
    ``selected_on``) join the JSON header and the title. Returns ``{"task", "protocol", **details, "metrics",
    "rows", "average_non_english"}`` (the JSON file; ``write=False``: only returned)."""
    by_language = {row["language"]: row for row in rows}
    if len(by_language) != len(rows):
        raise ValueError(
            f"{task} {name or protocol}: a language has several rows ({[row['language'] for row in rows]})"
        )
    return write_results(
        Path(output_dir) / "results" / task,
        name or protocol,
        by_language,
        columns,
        extra_columns,
        title=table_title(task, protocol, details),
        header={"task": task, "protocol": protocol, **dict(details or {})},
        iglue_average=True,
        write=write,
    )
