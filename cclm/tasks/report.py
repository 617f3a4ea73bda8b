"""``cclm iglue report RESULTS_DIR... --out DIR``: our IGLUE numbers beside the published baselines.

Reads the result tables that fine-tuning writes (:func:`cclm.tasks.results.write_task_results`:
``<output_dir>/results/<task>/<protocol>.json``; a RESULTS_DIR may be an ``output_dir``, a folder holding several,
its ``results/`` folder, one ``results/<task>/`` folder or one such JSON file) and writes, per task and protocol
(few-shot: per number of shots), a Markdown table and a PNG chart into ``--out``, plus ``report.md`` (every table)
and ``report.json`` (the numbers shown).

Each table has one row per language (IGLUE's column order) and the IGLUE average over the non-English languages;
one column per run of ours (named by its ``output_dir``) and one per published model, each labelled with its
source. A task or language we have no number for is shown as ``missing`` (never as 0); an average over fewer
languages than the baselines' says over how many.

Published baselines: UC2 and M3P as IGLUE released them (Bugliarello et al., ICML 2022): the per-language files
of ``results/`` in github.com/e-bug/iglue at commit 43cbac9 (zero-shot ``<TASK>_0.csv``, translate-test
``<TASK>_0.mt.csv``, few-shot ``<TASK>_<shots>.csv``). Their averages are those of the IGLUE paper (XVNLI 62.05 /
58.25, xGQA 29.35 / 28.17, MaRVL 57.28 / 56.00, xFlickr&CO IR 20.31 / 12.91, TR 17.89 / 11.90, WIT IR 7.83 / 8.12,
TR 9.09 / 9.98 -- UC2 / M3P, zero-shot). The CCLM paper's own numbers (Zeng et al.) are not built in: they could
not be checked against a source this module can cite. Add them, or any other published numbers, with
``--baselines FILE.json`` (see :func:`load_baselines`), each entry naming its source.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cclm.evaluation.results import AVERAGE, ENGLISH

IGLUE_TASKS = ("xvnli", "xgqa", "marvl", "xflickrco", "wit")
TASK_NAMES = {"xvnli": "XVNLI", "xgqa": "xGQA", "marvl": "MaRVL", "xflickrco": "xFlickr&CO", "wit": "WIT"}
PROTOCOLS = ("zero_shot", "translate_test", "few_shot")
METRIC_NAMES = {"accuracy": "accuracy (%)", "img_r1": "IR R@1 (%)", "txt_r1": "TR R@1 (%)"}
TASK_METRICS = {"xvnli": ("accuracy",), "xgqa": ("accuracy",), "marvl": ("accuracy",)}
RETRIEVAL_METRICS = ("img_r1", "txt_r1")
# Few-shot tables without a run of ours show the largest shot count of IGLUE's results files (MaRVL's files also
# include a "10x2" one, shown when a run of ours names it).
DEFAULT_SHOTS = {"xvnli": "48", "xgqa": "48", "marvl": "10", "xflickrco": "100"}
MISSING = "missing"
# A few-shot run whose learning rate and step were chosen on the test file (``train.select_on=test``, the CCLM
# reference's few-shot protocol): labelled wherever it appears; IGLUE's baselines were selected on dev sets.
SELECTED_ON_TEST_LABEL = "[SELECTED ON TEST]"
NOT_REPORTED = "\u2014"  # a language the published model has no number for
# IGLUE's WIT ar numbers are whole counts over 891 captions (IR) and 793 images (TR), one line more than the
# released test_ar.jsonl holds (docs/iglue.md)
IGLUE_WIT_AR_CAPTIONS = 891

IGLUE_COMMIT = "43cbac91513388d40b2c6d93925f00ca9fc08a98"
IGLUE_SOURCE = "IGLUE (Bugliarello et al., ICML 2022)"
IGLUE_URL = f"https://github.com/e-bug/iglue/blob/{IGLUE_COMMIT}/results/"

# IGLUE's results files (e-bug/iglue, results/ at IGLUE_COMMIT), the UC2 and M3P rows as released (3 decimals).
# A header line: task, protocol, shots ("-": not few-shot), metric, file under results/, languages; then one
# line per model: its numbers in the header's language order. Every average these give equals the file's "avg".
_IGLUE_RESULTS = """
xvnli zero_shot - accuracy xvnli/XVNLI_0.csv en ar es fr ru
  UC2 76.375 56.186 57.474 69.674 64.863
  M3P 76.89 55.241 58.849 56.357 62.543
xvnli translate_test - accuracy xvnli/XVNLI_0.mt.csv en ar es fr ru
  UC2 76.375 74.141 72.852 75 72.68
  M3P 76.89 73.282 72.766 74.742 72.68
xvnli few_shot 1 accuracy xvnli/XVNLI_1.csv ar es fr ru
  UC2 56.357 57.646 69.674 64.433
  M3P 54.983 58.333 56.615 62.457
xvnli few_shot 5 accuracy xvnli/XVNLI_5.csv ar es fr ru
  UC2 57.646 61.34 69.674 64.519
  M3P 55.069 58.935 57.99 62.715
xvnli few_shot 10 accuracy xvnli/XVNLI_10.csv ar es fr ru
  UC2 57.818 59.794 69.759 64.948
  M3P 56.186 60.052 58.333 63.23
xvnli few_shot 20 accuracy xvnli/XVNLI_20.csv ar es fr ru
  UC2 59.107 62.629 69.845 65.378
  M3P 55.241 59.192 57.818 62.457
xvnli few_shot 25 accuracy xvnli/XVNLI_25.csv ar es fr ru
  UC2 58.505 59.794 69.759 65.378
  M3P 56.787 59.278 57.646 62.973
xvnli few_shot 48 accuracy xvnli/XVNLI_48.csv ar es fr ru
  UC2 56.873 62.801 69.759 65.292
  M3P 56.014 60.395 58.591 62.457
xgqa zero_shot - accuracy xgqa/xGQA_0.csv en bn de id ko pt ru zh
  UC2 55.193 19.988 42.851 28.667 21.364 30.416 30.995 31.161
  M3P 53.745 18.643 33.416 32.485 25.109 31.399 27.498 28.647
xgqa translate_test - accuracy xgqa/xGQA_0.mt.csv en bn de id ko pt ru zh
  UC2 55.193 49.307 52.607 50.341 48.624 52.173 49.948 48.324
  M3P 53.745 47.786 51.014 49.348 47.641 51.21 47.755 47.041
xgqa few_shot 1 accuracy xgqa/xGQA_1.csv bn de id ko pt ru zh
  UC2 22.522 43.762 34.761 29.33 32.102 33.044 37.544
  M3P 23.422 34.368 33.106 29.743 33.375 33.499 30.675
xgqa few_shot 5 accuracy xgqa/xGQA_5.csv bn de id ko pt ru zh
  UC2 30.964 44.682 38.951 33.023 39.417 37.399 41.206
  M3P 31.068 39.665 38.144 34.533 37.616 37.234 36.768
xgqa few_shot 10 accuracy xgqa/xGQA_10.csv bn de id ko pt ru zh
  UC2 32.837 45.717 40.11 34.502 39.572 38.134 41.486
  M3P 33.375 40.73 39.841 35.775 39.468 37.865 37.772
xgqa few_shot 20 accuracy xgqa/xGQA_20.csv bn de id ko pt ru zh
  UC2 35.692 46.7 41.258 36.085 41.734 40.627 43.462
  M3P 35.744 41.775 40.513 37.109 41.092 39.179 39.251
xgqa few_shot 25 accuracy xgqa/xGQA_25.csv bn de id ko pt ru zh
  UC2 35.123 47.238 41.506 38.403 41.268 41.092 43.575
  M3P 35.94 41.93 41.527 37.813 41.962 39.758 39.986
xgqa few_shot 48 accuracy xgqa/xGQA_48.csv bn de id ko pt ru zh
  UC2 38.899 48.179 43.11 39.634 43.234 42.789 44.817
  M3P 37.761 43.193 41.382 38.579 43.006 42.148 41.186
marvl zero_shot - accuracy marvl/MaRVL_0.csv en id sw ta tr zh
  UC2 70.561 56.738 52.617 60.467 56.695 59.881
  M3P 68.222 56.472 55.686 56.039 56.78 55.04
marvl translate_test - accuracy marvl/MaRVL_0.mt.csv en id sw ta tr zh
  UC2 70.561 60.461 62.365 62.721 68.729 61.166
  M3P 68.222 60.461 62.365 62.721 68.475 58.597
marvl few_shot 1 accuracy marvl/MaRVL_1.csv id tr zh
  UC2 56.117 55.763 58.992
  M3P 49.025 51.186 50.692
marvl few_shot 2 accuracy marvl/MaRVL_2.csv id tr zh
  UC2 56.294 54.492 57.016
  M3P 48.05 49.322 50.395
marvl few_shot 4 accuracy marvl/MaRVL_4.csv id tr zh
  UC2 57.535 52.627 58.992
  M3P 50.177 49.576 50.198
marvl few_shot 10 accuracy marvl/MaRVL_10.csv id tr zh
  UC2 57.624 55.932 57.213
  M3P 50.089 49.407 49.802
marvl few_shot 10x2 accuracy marvl/MaRVL_10x2.csv id tr zh
  UC2 58.511 56.271 60.178
  M3P 50.089 49.576 49.704
xflickrco zero_shot - img_r1 xflickrco/xFlickrCO_ir_0.csv en de es id ja ru tr zh
  UC2 37.4 28.6 15.95 14.6 24.25 20 7.15 31.6
  M3P 31.35 13.35 13.4 13.2 10.3 15.95 7.75 16.45
xflickrco zero_shot - txt_r1 xflickrco/xFlickrCO_tr_0.csv en de es id ja ru tr zh
  UC2 34.55 23.9 15.3 13.6 22.4 16.75 6.95 26.3
  M3P 24.6 11.85 12.15 12.1 9.65 14.45 8.35 14.75
xflickrco translate_test - img_r1 xflickrco/xFlickrCO_ir_0.mt.csv en de es id ja ru tr zh
  UC2 37.4 33.25 38.4 34.85 29.85 42.95 37.55 35.35
  M3P 31.35 25.45 30.25 26.1 23.85 33.05 28 27.45
xflickrco translate_test - txt_r1 xflickrco/xFlickrCO_tr_0.mt.csv en de es id ja ru tr zh
  UC2 34.55 27.8 32.55 29.2 25.5 37.2 30.8 29.55
  M3P 24.6 21.4 23.65 19.5 16.7 25.45 21.05 21.25
xflickrco few_shot 1 img_r1 xflickrco/xFlickrCO_ir_1.csv de es id ja ru tr zh
  UC2 27.4 15.4 14.5 23.15 20.05 7.2 31.3
  M3P 12.25 13.4 13.2 11.5 15.95 7.75 14.85
xflickrco few_shot 1 txt_r1 xflickrco/xFlickrCO_tr_1.csv de es id ja ru tr zh
  UC2 22.25 15.85 14.9 21.2 17 7.15 25.8
  M3P 10.65 12.15 12.1 12.3 14.45 8.35 13.65
xflickrco few_shot 5 img_r1 xflickrco/xFlickrCO_ir_5.csv de es id ja ru tr zh
  UC2 28.15 15.7 14.55 23 19.9 7.05 31.05
  M3P 12.85 13.8 14.2 10.85 17.1 7.45 16.15
xflickrco few_shot 5 txt_r1 xflickrco/xFlickrCO_tr_5.csv de es id ja ru tr zh
  UC2 23.45 16.15 14.2 20.25 16.75 7 25.75
  M3P 12.35 11.6 13 10.6 14.65 8.1 14.4
xflickrco few_shot 10 img_r1 xflickrco/xFlickrCO_ir_10.csv de es id ja ru tr zh
  UC2 28.15 15.5 12.3 24.8 19.65 5.55 29.75
  M3P 11.95 13.95 14.15 12.75 16.15 7.45 9.3
xflickrco few_shot 10 txt_r1 xflickrco/xFlickrCO_tr_10.csv de es id ja ru tr zh
  UC2 23.45 16.15 13.7 22.2 17.75 6.6 24.4
  M3P 10.6 11.6 13.15 11.5 14.9 8.1 10.65
xflickrco few_shot 25 img_r1 xflickrco/xFlickrCO_ir_25.csv de es id ja ru tr zh
  UC2 28.15 8.55 14.7 24.4 21.3 6.85 31.4
  M3P 13.15 13.5 13.5 11.7 16.75 7.35 16.4
xflickrco few_shot 25 txt_r1 xflickrco/xFlickrCO_tr_25.csv de es id ja ru tr zh
  UC2 23.45 9.25 14.05 22.45 17.5 7.1 25.2
  M3P 12.6 11.55 12.2 11.35 14.4 8.05 15
xflickrco few_shot 50 img_r1 xflickrco/xFlickrCO_ir_50.csv de es id ja ru tr zh
  UC2 28.15 15.4 14.65 24.35 17.65 4.9 25.5
  M3P 13.35 13.4 13.2 12.05 16.4 7.75 12.65
xflickrco few_shot 50 txt_r1 xflickrco/xFlickrCO_tr_50.csv de es id ja ru tr zh
  UC2 23.45 15.45 13.95 22.25 16.3 6.7 21.5
  M3P 11.85 12.15 12.1 11.25 15.85 8.35 12.9
xflickrco few_shot 100 img_r1 xflickrco/xFlickrCO_ir_100.csv de es id ja ru tr zh
  UC2 28.6 15.95 14.6 19.8 20.85 7.15 31.6
  M3P 13.25 13.4 13.2 11.75 16.65 7.75 16.45
xflickrco few_shot 100 txt_r1 xflickrco/xFlickrCO_tr_100.csv de es id ja ru tr zh
  UC2 23.9 15.3 13.6 18.4 18.65 6.95 26.3
  M3P 12.55 12.15 12.1 10.5 15.4 8.35 14.75
wit zero_shot - img_r1 wit/WIT_ir_0.csv en ar bg da el et id ja ko tr vi
  UC2 17.9 6.622 8.837 9.428 8.772 4.691 9.878 9.8 4.296 7.49 8.457
  M3P 15.5 8.866 8.837 9.428 9.649 5.378 8.657 7 6.122 6.519 10.782
wit zero_shot - txt_r1 wit/WIT_tr_0.csv en ar bg da el et id ja ko tr vi
  UC2 19.708 8.323 7.692 10.442 11.645 6.026 11.475 10.808 5.737 8.811 9.896
  M3P 15.328 8.323 9.801 11.794 12.015 8.205 10.89 8.432 7.087 10.573 12.658
wit translate_test - img_r1 wit/WIT_ir_0.mt.csv en ar bg da el et id ja ko tr vi
  UC2 17.9 12.795 13.605 11.448 16.667 11.327 13.43 9 11.815 14.147 12.791
  M3P 15.5 12.458 12.558 10.55 12.807 11.327 10.655 8.8 10.311 12.621 13.214
wit translate_test - txt_r1 wit/WIT_tr_0.mt.csv en ar bg da el et id ja ko tr vi
  UC2 19.708 13.997 13.772 13.514 18.854 11.923 14.637 10.57 12.711 17.034 14.039
  M3P 15.328 13.997 13.648 14.865 16.821 12.821 11.71 10.689 12.036 13.069 16.686

"""


# ------------------------------------------------------------------------------------------------ baselines
@dataclass
class Baseline:
    """Published numbers of one model on one task, protocol (few-shot: ``shots``) and metric: ``values`` maps
    languages to numbers; ``avg`` may be given alone (a paper that reports only the average)."""

    model: str
    task: str
    protocol: str
    shots: str | None
    metric: str
    values: dict[str, float]
    source: str

    def average(self) -> float | None:
        if AVERAGE in self.values:
            return self.values[AVERAGE]
        non_english = [v for lang, v in self.values.items() if lang != ENGLISH]
        return sum(non_english) / len(non_english) if non_english else None

    @property
    def languages(self) -> list[str]:
        return [lang for lang in self.values if lang != AVERAGE]


def iglue_baselines() -> list[Baseline]:
    """UC2 and M3P from IGLUE's results files (see the module)."""
    baselines, header = [], None
    for line in _IGLUE_RESULTS.strip().splitlines():
        if not line.startswith(" "):
            task, protocol, shots, metric, path, *languages = line.split()
            header = (task, protocol, None if shots == "-" else shots, metric, path, languages)
            continue
        model, *numbers = line.split()
        task, protocol, shots, metric, path, languages = header
        source = f"{IGLUE_SOURCE}, [{path}]({IGLUE_URL}{path})"
        values = dict(zip(languages, map(float, numbers), strict=True))
        baselines.append(Baseline(model, task, protocol, shots, metric, values, source))
    return baselines


def load_baselines(path: str | Path) -> list[Baseline]:
    """Published numbers from a JSON file: a list of ``{"model", "source", "task", "protocol", "metric",
    "values": {language or "avg": number}}`` (few-shot entries add ``"shots"``, e.g. ``"48"``). ``source`` is
    required: it is printed under every table the numbers appear in."""
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read baselines: {err}") from None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: baselines must be a JSON list of entries")
    baselines = []
    for i, entry in enumerate(entries):
        where = f"{path}: entry {i}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be an object")
        for key in ("model", "source", "task", "protocol", "metric"):
            if not isinstance(entry.get(key), str) or not entry[key].strip():
                raise ValueError(f"{where}: '{key}' must be a non-empty string")
        values = entry.get("values")
        if not isinstance(values, dict) or not values:
            raise ValueError(f"{where}: 'values' must map languages (or 'avg') to numbers")
        for lang, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{where}: values.{lang} must be a number, got {value!r}")
        shots = entry.get("shots")
        baselines.append(
            Baseline(
                entry["model"],
                entry["task"],
                entry["protocol"],
                None if shots is None else str(shots),
                entry["metric"],
                {str(k): float(v) for k, v in values.items()},
                entry["source"],
            )
        )
    return baselines


# ------------------------------------------------------------------------------------------------- our runs
@dataclass
class RunResult:
    """One result table of ours: ``rows`` maps languages to their row (metrics and extra columns)."""

    label: str
    path: Path
    task: str
    protocol: str
    metrics: list[str]
    rows: dict[str, dict]
    shots: str | None = None
    details: dict = field(default_factory=dict)  # the document's other scalar keys (how it was selected)
    scoring: dict = field(default_factory=dict)  # the settings its rows were scored with (rows' ``scoring``)


_SHOTS = re.compile(r"train_?(\d+(?:x\d+)?)$")
_DOCUMENT_KEYS = {"task", "protocol", "metrics", "rows", "average_non_english"}


def shots_of(rows: Iterable[dict]) -> str | None:
    """The number of shots of few-shot rows: their ``shots`` (as fine-tuning writes it), else the name of their
    ``shots_file`` (``train_48.jsonl``, ``marvl-id_train10.jsonl``); None when unknown or when the languages used
    different numbers."""
    found = set()
    for row in rows:
        if row.get("shots") not in (None, ""):
            found.add(str(row["shots"]))
            continue
        name = Path(str(row.get("shots_file", ""))).name.split(".")[0]
        match = _SHOTS.search(name)
        found.add(match.group(1) if match else None)
    return found.pop() if len(found) == 1 else None


def result_files(path: Path) -> list[Path]:
    """The result JSON files a RESULTS_DIR names (see the module), sorted."""
    if path.is_file():
        return [path]
    candidates = set(path.glob("**/results/*/*.json"))
    if path.name == "results":
        candidates |= set(path.glob("*/*.json"))
    if path.parent.name == "results":
        candidates |= set(path.glob("*.json"))
    return sorted(candidates)


def _label(file: Path) -> str:
    """A run's name: its output_dir (the folder holding ``results/``) as the RESULTS_DIR argument spells it."""
    run = file.parent.parent.parent if file.parent.parent.name == "results" else file.parent
    return str(run)


def load_result(file: Path) -> RunResult | None:
    """The table of ``file``, or None when it is not a result table (another JSON file)."""
    try:
        document = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{file}: cannot read: {err}") from None
    if not isinstance(document, dict) or not {"task", "protocol", "metrics", "rows"} <= set(document):
        return None
    rows = {
        str(row["language"]): row for row in document["rows"] if isinstance(row, dict) and "language" in row
    }
    protocol = str(document["protocol"])
    details = {
        k: v
        for k, v in document.items()
        if k not in _DOCUMENT_KEYS and isinstance(v, (str, int, float, bool))
    }
    shots = None
    if protocol == "few_shot":
        shots = (
            str(details.pop("shots")) if details.get("shots") not in (None, "") else shots_of(rows.values())
        )
    details.pop("shots", None)
    selected = {str(details.get("selected_on", ""))} | {
        str(row.get("selected_on", "")) for row in rows.values()
    }
    label = _label(file) + (f" {SELECTED_ON_TEST_LABEL}" if "test" in selected else "")
    return RunResult(
        label,
        file,
        str(document["task"]),
        protocol,
        [str(m) for m in document["metrics"]],
        rows,
        shots,
        details,
        _scoring_of(file, rows.values()),
    )


def _scoring_of(file: Path, rows: Iterable[dict]) -> dict:
    """The ``scoring`` settings shared by ``rows`` (fine-tuning keeps a table's rows scored one way); a table
    whose rows disagree (edited or merged by hand) cannot be one column."""
    found = {json.dumps(row.get("scoring") or {}, sort_keys=True) for row in rows}
    if len(found) > 1:
        raise ValueError(
            f"{file}: its rows were scored with different settings ({'; '.join(sorted(found))}): split them into "
            "one table per setting"
        )
    return json.loads(found.pop()) if found else {}


# The scoring settings under which a number of ours is not comparable with IGLUE's; said in the table's notes.
def scoring_caveats(scoring: dict) -> list[str]:
    caveats = []
    if _number(scoring.get("max_examples")):
        caveats.append(
            f"first {int(scoring['max_examples'])} examples of each test file only (data.max_examples): not "
            "comparable with the baselines, which score whole files"
        )
    if scoring.get("duplicate_images") not in (None, "iglue"):
        caveats.append(
            f"duplicate_images={scoring['duplicate_images']} (the CCLM reference's merging of lines that show one "
            "image); IGLUE's baselines score every line as its own image"
        )
    return caveats


def load_results(paths: Sequence[str | Path]) -> list[RunResult]:
    results, seen = [], set()
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
        for file in result_files(path):
            if file.resolve() in seen:
                continue
            seen.add(file.resolve())
            result = load_result(file)
            if result is not None:
                results.append(result)
    labels: dict[str, int] = {}
    for result in results:  # two runs of one task and protocol under one name: tell them apart
        key = f"{result.task}/{result.protocol}/{result.shots}/{result.label}"
        labels[key] = labels.get(key, 0) + 1
        if labels[key] > 1:
            result.label = f"{result.label} ({labels[key]})"
    return results


# ---------------------------------------------------------------------------------------------------- tables
@dataclass
class Column:
    name: str
    source: str
    values: dict[str, float | None]  # language -> number (None: missing)
    average: float | None
    ours: bool
    note: str = ""  # e.g. "avg over 3 of 4 languages"


@dataclass
class Table:
    task: str
    protocol: str
    shots: str | None
    metric: str
    languages: list[str]
    columns: list[Column]
    notes: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str, str | None]:
        return self.task, self.protocol, self.shots


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _metrics_of(task: str, runs: Sequence[RunResult], baselines: Sequence[Baseline]) -> list[str]:
    metrics = [b.metric for b in baselines]
    metrics += [m for run in runs for m in run.metrics]
    if not metrics:
        metrics = list(TASK_METRICS.get(task, RETRIEVAL_METRICS if task in IGLUE_TASKS else ("accuracy",)))
    return list(dict.fromkeys(metrics))


def build_tables(results: Sequence[RunResult], baselines: Sequence[Baseline]) -> list[Table]:
    """One table per task, protocol, shots and metric: every pair that has a run of ours, and every IGLUE task
    of each protocol that has one (zero-shot always), with the baselines of the same task, protocol and shots."""
    keys = {(task, "zero_shot", None) for task in IGLUE_TASKS}
    keys |= {(r.task, r.protocol, r.shots) for r in results}
    protocols = {r.protocol for r in results} | {"zero_shot"}
    for protocol in protocols:
        for task in IGLUE_TASKS:
            if any(k[0] == task and k[1] == protocol for k in keys):
                continue
            shots = DEFAULT_SHOTS.get(task) if protocol == "few_shot" else None
            if any(b.task == task and b.protocol == protocol and b.shots == shots for b in baselines):
                keys.add((task, protocol, shots))
    order = {t: i for i, t in enumerate(IGLUE_TASKS)}
    porder = {p: i for i, p in enumerate(PROTOCOLS)}

    def sort_key(key):
        task, protocol, shots = key
        return (
            order.get(task, len(order)),
            task,
            porder.get(protocol, len(porder)),
            protocol,
            _shots_value(shots),
        )

    tables = []
    for task, protocol, shots in sorted(keys, key=sort_key):
        runs = [r for r in results if (r.task, r.protocol, r.shots) == (task, protocol, shots)]
        published = [b for b in baselines if (b.task, b.protocol, b.shots) == (task, protocol, shots)]
        for metric in _metrics_of(task, runs, published):
            tables.append(
                _table(task, protocol, shots, metric, runs, [b for b in published if b.metric == metric])
            )
    return tables


def _shots_value(shots: str | None) -> tuple[int, str]:
    if shots is None:
        return (-1, "")
    head = shots.split("x")[0]
    return (int(head) if head.isdigit() else 1 << 30, shots)


def _table(task, protocol, shots, metric, runs, published) -> Table:
    languages: list[str] = []
    for baseline in published:
        languages += [lang for lang in baseline.languages if lang not in languages]
    reference = [lang for lang in languages if lang != ENGLISH]
    for run in runs:
        languages += [lang for lang in run.rows if lang not in languages]
    columns, notes = [], []
    for run in runs:
        values = {
            lang: _number(run.rows[lang].get(metric)) if lang in run.rows else None for lang in languages
        }
        # the baselines' languages (else the run's), so that ours and theirs average over the same ones
        wanted = reference or [lang for lang in run.rows if lang != ENGLISH]
        present = [values[lang] for lang in wanted if values.get(lang) is not None]
        average = sum(present) / len(present) if present else None
        parts = (
            [f"avg over {len(present)} of {len(wanted)} languages"]
            if present and len(present) < len(wanted)
            else []
        )
        extra = [lang for lang in run.rows if lang != ENGLISH and lang not in wanted]
        if extra:
            parts.append(f"{', '.join(extra)} not in the avg (no baseline reports them)")
        note = "; ".join(parts)
        details = ", ".join(f"{k}={v}" for k, v in run.details.items())
        source = f"`{run.path}`" + (f" ({details})" if details else "")
        columns.append(Column(f"ours: {run.label}", source, values, average, True, note))
        notes += [f"ours: {run.label}: {caveat}" for caveat in scoring_caveats(run.scoring)]
        notes += [f"ours: {run.label}: {caveat}" for caveat in test_set_caveats(task, run)]
    differing = _differing_scoring(runs)
    if differing:
        notes.append(f"our columns were scored with different settings: {differing}")
    if any(SELECTED_ON_TEST_LABEL in run.label for run in runs):
        notes.append(
            f"{SELECTED_ON_TEST_LABEL}: chosen on the test file itself (the CCLM reference's few-shot protocol), "
            "not a held-out number; IGLUE's baselines were selected on dev sets"
        )
    if not runs:
        where = f"results/{task}/{protocol}*.json"
        notes.append(f"ours: missing (no {where} under the folders given)")
        columns.append(Column("ours", "", {lang: None for lang in languages}, None, True))
    for baseline in published:
        values = {lang: baseline.values.get(lang) for lang in languages}
        columns.append(Column(baseline.model, baseline.source, values, baseline.average(), False))
    if protocol == "few_shot":
        if shots is None:
            notes.append("shots unknown (no shots_file naming train_<N>): no baseline matched")
        elif not published and task in IGLUE_TASKS:
            notes.append(f"IGLUE reports no {shots}-shot results for {task}")
    return Table(task, protocol, shots, metric, languages, columns, notes)


# --------------------------------------------------------------------------------------------------- writing
def test_set_caveats(task: str, run: RunResult) -> list[str]:
    """Where ``run`` was scored on other examples than IGLUE's tables, or trained on images its test file
    names: xGQA's full testdev files (``configs/finetune/xgqa_testdev.yaml``) where IGLUE tests on the
    few-shot split's ``test.json``; XVNLI without its records labelled ``-``; WIT ar on the released
    ``test_ar.jsonl``, one line short of IGLUE's; few-shot training images that the test file also names."""
    caveats = _shared_test_images_caveat(run)
    if task == "xgqa":
        caveats += _xgqa_testdev_caveat(run)
    if task == "xvnli":
        caveats += _xvnli_no_gold_label_caveat(run)
    if task == "wit":
        caveats += _wit_ar_caveat(run)
    return caveats


def _shared_test_images_caveat(run: RunResult) -> list[str]:
    shared = {
        lang: len(row["shared_test_images"])
        for lang, row in run.rows.items()
        if row.get("shared_test_images")
    }
    if not shared:
        return []
    counts = ", ".join(f"{lang} {count}" for lang, count in shared.items())
    return [
        f"few-shot training images whose paths the test file also names ({counts}; listed in the rows' "
        "shared_test_images): IGLUE reads few-shot images from a feature file of their own, so whether "
        "its runs trained on test images is unknown"
    ]


def _xgqa_testdev_caveat(run: RunResult) -> list[str]:
    testdev = sorted(
        lang for lang, row in run.rows.items() if "testdev" in Path(str(row.get("file", ""))).name
    )
    if not testdev:
        return []
    which = "every language" if len(testdev) == len(run.rows) else ", ".join(testdev)
    return [
        f"{which} scored on xGQA's full testdev files; IGLUE's baselines test on the few-shot split's test.json "
        "(testdev without the few-shot images): not comparable"
    ]


def _xvnli_no_gold_label_caveat(run: RunResult) -> list[str]:
    """Rows scored without the records labelled ``-`` (``data.no_gold_label=drop``, or by a cclm that recorded
    no such setting: it left them out) divide by 1,150, IGLUE's by 1,164 (every ``-`` counted wrong)."""
    setting = run.scoring.get("no_gold_label")
    if setting == "iglue" or not run.scoring:
        return []
    how = "data.no_gold_label=drop" if setting == "drop" else "by a cclm that left them out"
    return [
        f"scored without the records labelled '-' ({how}, the CCLM reference's scoring); IGLUE's baselines "
        "count them as wrong over every record (1,164 per test file): the same answers score 1164/1150 times "
        "IGLUE's number here"
    ]


def _wit_ar_caveat(run: RunResult) -> list[str]:
    row = run.rows.get("ar", {})
    captions = row.get("captions")
    if not isinstance(captions, int) or captions >= IGLUE_WIT_AR_CAPTIONS:
        return []
    return [
        f"ar scored on {captions} captions; IGLUE's ar numbers are over {IGLUE_WIT_AR_CAPTIONS} captions / "
        "793 images: the released test_ar.jsonl lacks wit-test_7382 (a .tif image; test_ar_gmt.jsonl has it)"
    ]


def _differing_scoring(runs: Sequence[RunResult]) -> str:
    """``precision: bf16 (run a), fp32 (run b)`` for every scoring setting on which ``runs`` differ."""
    parts = []
    for key in sorted({k for run in runs for k in run.scoring}):
        values: dict[str, list[str]] = {}
        for run in runs:
            values.setdefault(json.dumps(run.scoring.get(key)), []).append(run.label)
        if len(values) > 1:
            shown = [f"{json.loads(v)} ({', '.join(labels)})" for v, labels in values.items()]
            parts.append(f"{key}: {', '.join(shown)}")
    return "; ".join(parts)


def _fmt(value: float | None, missing: str) -> str:
    return missing if value is None else f"{value:.2f}"


def table_title(task: str, protocol: str, shots: str | None) -> str:
    name = TASK_NAMES.get(task, task)
    title = f"{name} -- {protocol.replace('_', '-')}"
    return f"{title} ({shots} shots)" if shots else title


def markdown(tables: Sequence[Table], level: int = 2) -> str:
    """The tables of one task and protocol (or several), with the sources of every column."""
    lines: list[str] = []
    current = None
    for table in tables:
        if table.key != current:
            current = table.key
            lines += ["#" * level + " " + table_title(*table.key), ""]
        lines += [f"{METRIC_NAMES.get(table.metric, table.metric)}:", ""]
        lines.append("| language | " + " | ".join(c.name for c in table.columns) + " |")
        lines.append("|---|" + "---|" * len(table.columns))
        for lang in table.languages:
            cells = [_fmt(c.values.get(lang), MISSING if c.ours else NOT_REPORTED) for c in table.columns]
            lines.append(f"| {lang} | " + " | ".join(cells) + " |")
        averages = []
        for c in table.columns:
            cell = _fmt(c.average, MISSING if c.ours else NOT_REPORTED)
            averages.append(f"{cell} ({c.note})" if c.note else cell)
        lines.append(f"| **{AVERAGE}** (non-English) | " + " | ".join(averages) + " |")
        lines.append("")
        by_source: dict[str, list[str]] = {}
        for c in table.columns:
            if c.source:
                by_source.setdefault(c.source, []).append(c.name)
        sources = [f"{', '.join(names)}: {source}" for source, names in by_source.items()]
        lines += [f"- {s}" for s in [*sources, *table.notes]]
        lines.append("")
    return "\n".join(lines)


def plot(tables: Sequence[Table], out: Path) -> Path:
    """Grouped bars of the tables of one task and protocol (one panel per metric): every language and the
    average; a run of ours without a number is marked "missing" where its bar would be."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width_in = max(6.0, 0.9 * len(tables[0].languages) + 3)
    fig, axes = plt.subplots(len(tables), 1, figsize=(width_in, 3.8 * len(tables)), squeeze=False)
    axes = [row[0] for row in axes]
    for ax, table in zip(axes, tables):
        groups = [*table.languages, AVERAGE]
        width = 0.8 / max(1, len(table.columns))
        top = max(
            [v for c in table.columns for v in [*c.values.values(), c.average] if v is not None] or [1.0]
        )
        for i, column in enumerate(table.columns):
            xs = [g + (i - (len(table.columns) - 1) / 2) * width for g in range(len(groups))]
            ys = [*(column.values.get(lang) for lang in table.languages), column.average]
            ax.bar(
                [x for x, y in zip(xs, ys) if y is not None],
                [y for y in ys if y is not None],
                width,
                label=column.name,
                hatch="//" if not column.ours else None,
            )
            for x, y in zip(xs, ys):
                if y is None and column.ours:
                    ax.text(x, top * 0.02, MISSING, rotation=90, ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(groups)), groups)
        ax.set_ylabel(METRIC_NAMES.get(table.metric, table.metric))
        ax.set_title(f"{table_title(*table.key)}: {METRIC_NAMES.get(table.metric, table.metric)}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _stem(key: tuple[str, str, str | None]) -> str:
    task, protocol, shots = key
    stem = f"{task}_{protocol}" + (f"_{shots}" if shots else "")
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem)


def write_report(
    results_dirs: Sequence[str | Path],
    out: str | Path,
    extra_baselines: Sequence[Baseline] = (),
    png: bool = True,
) -> dict:
    """Write the report (see the module) into ``out``; returns ``{"tables": [...], "files": [...], "runs": N}``."""
    out = Path(out)
    results = load_results(results_dirs)
    tables = build_tables(results, [*iglue_baselines(), *extra_baselines])
    out.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple, list[Table]] = {}
    for table in tables:
        groups.setdefault(table.key, []).append(table)
    files, sections = [], []
    for key, group in groups.items():
        text = markdown(group, level=1)
        path = out / f"{_stem(key)}.md"
        path.write_text(text, encoding="utf-8")
        files.append(path)
        sections.append(markdown(group, level=2))
        if png:
            files.append(plot(group, out / f"{_stem(key)}.png"))
    runs = sorted({f"{r.label}: {r.path}" for r in results})
    index = [
        "# IGLUE report",
        "",
        "Our runs:" if runs else "Our runs: none found (every table shows ours as missing).",
        "",
        *[f"- {r}" for r in runs],
        "",
        f"`{MISSING}`: no number of ours; `{NOT_REPORTED}`: the published model has none for that language. "
        f"`{AVERAGE}`: the mean over the non-English languages (IGLUE's). Baselines: UC2 and M3P from "
        f"the results files of {IGLUE_SOURCE} (github.com/e-bug/iglue at {IGLUE_COMMIT[:7]}); the CCLM paper's "
        "numbers are not included (add published numbers with `--baselines FILE.json`).",
        "",
        *sections,
    ]
    report = out / "report.md"
    report.write_text("\n".join(index), encoding="utf-8")
    document = {
        "runs": runs,
        "tables": [
            {
                "task": t.task,
                "protocol": t.protocol,
                "shots": t.shots,
                "metric": t.metric,
                "languages": t.languages,
                "columns": [
                    {
                        "name": c.name,
                        "source": c.source,
                        "ours": c.ours,
                        "values": c.values,
                        "average_non_english": c.average,
                        "note": c.note,
                    }
                    for c in t.columns
                ],
                "notes": t.notes,
            }
            for t in tables
        ],
    }
    (out / "report.json").write_text(json.dumps(document, indent=2, ensure_ascii=False), encoding="utf-8")
    return {"tables": tables, "files": [report, out / "report.json", *files], "runs": len(results)}


def main(argv: list[str]) -> int:
    """``cclm iglue report`` (``argv``: the arguments after ``report``)."""
    parser = argparse.ArgumentParser(
        prog="cclm iglue report",
        description="Our IGLUE result tables beside the published baselines (Markdown + PNG per task/protocol).",
    )
    parser.add_argument(
        "results",
        nargs="+",
        metavar="RESULTS_DIR",
        help="fine-tuning output_dir(s), results/ folders or files",
    )
    parser.add_argument(
        "--out", required=True, help="folder for report.md, report.json and one .md/.png each"
    )
    parser.add_argument(
        "--baselines",
        action="append",
        default=[],
        metavar="JSON",
        help="more published numbers, each with its source (see cclm/tasks/report.py load_baselines)",
    )
    parser.add_argument("--no-png", action="store_true", help="Markdown and JSON only")
    args = parser.parse_args(argv)
    try:
        extra = [b for path in args.baselines for b in load_baselines(path)]
        written = write_report(args.results, args.out, extra, png=not args.no_png)
    except (FileNotFoundError, ValueError) as err:
        print(f"cclm iglue report: {err}", file=sys.stderr)
        return 2
    if not written["runs"]:
        print(
            "cclm iglue report: no results/<task>/<protocol>.json found under "
            + ", ".join(args.results)
            + "; every table shows ours as missing",
            file=sys.stderr,
        )
    print(written["files"][0])
    return 0
