"""IGLUE result tables: ``<output_dir>/results/<task>/<name>.{json,csv,md}``, one row per language (in the
configured order) and the average over non-English languages, as the IGLUE paper reports it; written by the
project's one per-language writer, :func:`cclm.evaluation.results.write_results`.

``name`` is the protocol (``zero_shot``, ``translate_test``, ``few_shot``) or, for a few-shot run of several shot
counts, ``few_shot_<shots>``; a few-shot table selected on the test files (``train.select_on=test``) ends in
``_selected_on_test`` and says so in its JSON header (``"selected_on": "test"``) and Markdown title.

Every row names the model folder that scored it (``model``), the digest of its weights (``model_digest``) and the
settings that decide its numbers (``scoring``); a few-shot row also names the English model its language started
from (``checkpoint``, ``checkpoint_digest``). A table already on disk is never silently replaced: rows of the same
model (few-shot: the same starting model) scored the same way are kept beside the new ones (but those of the
languages run again), and another table is refused or moved aside (``<name>.old-<time>.*``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cclm.errors import DataError
from cclm.evaluation.results import set_aside, write_results
from cclm.jsonl import read_json

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


def table_path(output_dir: str | Path, task: str, name: str) -> Path:
    return Path(output_dir) / "results" / task / f"{name}.json"


def read_task_table(output_dir: str | Path, task: str, name: str) -> dict | None:
    """The table ``name`` already written under ``output_dir`` (None when there is none); a damaged one is an
    error naming it, not a table to overwrite."""
    path = table_path(output_dir, task, name)
    if not path.exists():
        return None
    table = read_json(path)
    if not isinstance(table, dict) or not isinstance(table.get("rows"), list):
        raise DataError(f"{path}: not a cclm result table (no 'rows' list); move it away to write this one")
    return table


def other_models(table: Mapping[str, Any], digest: str, key: str = "model") -> list[str]:
    """The models (folders) of ``table``'s rows whose ``<key>_digest`` is not ``digest`` (``key``: ``model``, the
    scored model, or ``checkpoint``, the model a few-shot language started from)."""
    return sorted({str(row.get(key, "?")) for row in table["rows"] if row.get(f"{key}_digest") != digest})


def other_scoring(table: Mapping[str, Any], settings: Mapping[str, Any]) -> str | None:
    """The first row of ``table`` scored with settings other than ``settings``, as ``language: key: old -> new``
    (a row that records none counts as scored otherwise), or None."""
    for row in table["rows"]:
        scored = row.get("scoring") or {}
        changed = [f"{k}: {scored.get(k)!r} -> {v!r}" for k, v in settings.items() if scored.get(k) != v]
        if changed:
            return f"{row.get('language')}: {'; '.join(changed)}"
    return None


def set_aside_table(output_dir: str | Path, task: str, name: str) -> Path:
    """Rename the files of table ``name`` to ``<name>.old-<time>.*``; returns the new JSON path."""
    return set_aside(table_path(output_dir, task, name).parent, name)


def merged_rows(old: Sequence[Mapping[str, Any]], new: Sequence[dict]) -> list[dict]:
    """``old`` rows with those of ``new``'s languages replaced (in place), then ``new``'s other languages."""
    fresh = {row["language"]: row for row in new}
    rows = [dict(fresh.pop(row["language"], row)) for row in old]
    return rows + list(fresh.values())
