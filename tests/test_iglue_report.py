"""``cclm iglue report``: our result tables (as fine-tuning writes them) beside the published IGLUE baselines."""

from __future__ import annotations

import json

import pytest

from cclm.tasks.report import iglue_baselines, main, shots_of
from cclm.tasks.results import write_task_results

# The IGLUE paper's zero-shot averages (UC2, M3P), the numbers the built-in per-language files must reproduce.
PAPER_AVERAGES = {
    ("xvnli", "accuracy"): (62.05, 58.25),
    ("xgqa", "accuracy"): (29.35, 28.17),
    ("marvl", "accuracy"): (57.28, 56.00),
    ("xflickrco", "img_r1"): (20.31, 12.91),
    ("xflickrco", "txt_r1"): (17.89, 11.90),
    ("wit", "img_r1"): (7.83, 8.12),
    ("wit", "txt_r1"): (9.09, 9.98),
}


def accuracy_rows(values: dict[str, float], **extra) -> list[dict]:
    return [
        {"language": lang, "accuracy": v, "examples": 10, "skipped": 0, **extra} for lang, v in values.items()
    ]


def write_runs(tmp_path):
    """Run A: XVNLI zero-shot (no es, ru), xFlickr&CO zero-shot (en, de), XVNLI few-shot (48 shots, ar)."""
    run = tmp_path / "run_a"
    write_task_results(
        run,
        "xvnli",
        "zero_shot",
        accuracy_rows({"en": 81.25, "ar": 61.5, "fr": 71.75}),
        ["accuracy"],
        ["examples", "skipped"],
    )
    retrieval = [
        {"language": "en", "img_r1": 41.5, "txt_r1": 42.5, "images": 5, "captions": 5},
        {"language": "de", "img_r1": 31.5, "txt_r1": 32.5, "images": 5, "captions": 5},
    ]
    write_task_results(run, "xflickrco", "zero_shot", retrieval, ["img_r1", "txt_r1"], ["images", "captions"])
    few = accuracy_rows(
        {"ar": 63.25}, shots_file="iglue/XVNLI/annotations/ar/train_48.jsonl", lr=1e-5, dev=50.0
    )
    write_task_results(run, "xvnli", "few_shot", few, ["accuracy"], ["examples", "skipped", "lr", "dev"])
    return run


def section(report: str, title: str) -> str:
    start = report.index(f"## {title}\n")
    end = report.find("\n## ", start + 1)
    return report[start : end if end >= 0 else None]


def test_built_in_baselines_reproduce_the_iglue_paper_averages():
    zero_shot = {(b.task, b.metric, b.model): b for b in iglue_baselines() if b.protocol == "zero_shot"}
    for (task, metric), (uc2, m3p) in PAPER_AVERAGES.items():
        assert round(zero_shot[task, metric, "UC2"].average(), 2) == pytest.approx(uc2)
        assert round(zero_shot[task, metric, "M3P"].average(), 2) == pytest.approx(m3p)
    assert all("IGLUE" in b.source and "github.com/e-bug/iglue" in b.source for b in iglue_baselines())


def test_report_puts_our_numbers_beside_the_baselines_with_sources(tmp_path, capsys):
    run = write_runs(tmp_path)
    out = tmp_path / "report"
    assert main([str(run), "--out", str(out), "--no-png"]) == 0
    report = (out / "report.md").read_text(encoding="utf-8")

    xvnli = section(report, "XVNLI -- zero-shot")
    assert f"| language | ours: {run} | UC2 | M3P |" in xvnli
    assert "| en | 81.25 | 76.38 | 76.89 |" in xvnli
    assert "| ar | 61.50 | 56.19 | 55.24 |" in xvnli
    assert "| fr | 71.75 | 69.67 | 56.36 |" in xvnli
    # our average is over the two languages we have, and says so; the baselines' are IGLUE's
    assert "| **avg** (non-English) | 66.62 (avg over 2 of 4 languages) | 62.05 | 58.25 |" in xvnli
    assert "results/xvnli/zero_shot.json" in xvnli
    assert "UC2, M3P: IGLUE (Bugliarello et al., ICML 2022)" in xvnli and "xvnli/XVNLI_0.csv" in xvnli

    flickr = section(report, "xFlickr&CO -- zero-shot")
    assert "IR R@1 (%)" in flickr and "TR R@1 (%)" in flickr
    assert "| de | 31.50 | 28.60 | 13.35 |" in flickr  # IR
    assert "| de | 32.50 | 23.90 | 11.85 |" in flickr  # TR
    assert "xFlickrCO_ir_0.csv" in flickr and "xFlickrCO_tr_0.csv" in flickr

    few = section(report, "XVNLI -- few-shot (48 shots)")
    assert "| ar | 63.25 | 56.87 | 56.01 |" in few and "xvnli/XVNLI_48.csv" in few

    # the per-table files hold the same table
    assert "| ar | 61.50 | 56.19 | 55.24 |" in (out / "xvnli_zero_shot.md").read_text(encoding="utf-8")
    document = json.loads((out / "report.json").read_text(encoding="utf-8"))
    table = next(t for t in document["tables"] if (t["task"], t["protocol"]) == ("xvnli", "zero_shot"))
    assert table["columns"][0]["values"]["es"] is None and table["columns"][0]["values"]["ar"] == 61.5


def test_missing_tasks_and_languages_are_missing_not_zero(tmp_path):
    run = write_runs(tmp_path)
    out = tmp_path / "report"
    assert main([str(run), "--out", str(out), "--no-png"]) == 0
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "| es | missing | 57.47 | 58.85 |" in section(report, "XVNLI -- zero-shot")
    for title in ("xGQA -- zero-shot", "MaRVL -- zero-shot", "WIT -- zero-shot"):
        text = section(report, title)
        assert "ours: missing" in text
        assert "| **avg** (non-English) | missing |" in text
        assert "| 0.00 |" not in text and "| 0 |" not in text
    assert "| de | missing | 42.85 | 33.42 |" in section(report, "xGQA -- zero-shot")
    # few-shot was run for one task: the other tasks' few-shot tables are there, ours missing
    assert "ours: missing" in section(report, "xGQA -- few-shot (48 shots)")
    document = json.loads((out / "report.json").read_text(encoding="utf-8"))
    xgqa = next(t for t in document["tables"] if (t["task"], t["protocol"]) == ("xgqa", "zero_shot"))
    assert xgqa["columns"][0]["ours"] and set(xgqa["columns"][0]["values"].values()) == {None}


def test_png_chart_per_task_and_protocol(tmp_path):
    run = write_runs(tmp_path)
    out = tmp_path / "report"
    assert main([str(run), "--out", str(out)]) == 0
    for name in (
        "xvnli_zero_shot",
        "xflickrco_zero_shot",
        "xgqa_zero_shot",
        "wit_zero_shot",
        "xvnli_few_shot_48",
    ):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert (out / f"{name}.md").is_file()


def test_several_runs_and_folder_forms(tmp_path):
    run_a = write_runs(tmp_path)
    run_b = tmp_path / "run_b"
    write_task_results(run_b, "xvnli", "zero_shot", accuracy_rows({"ar": 50.0}), ["accuracy"])
    out = tmp_path / "report"
    # an output_dir, a results/<task>/ folder: both runs show up as columns
    assert main([str(run_a), str(run_b / "results" / "xvnli"), "--out", str(out), "--no-png"]) == 0
    xvnli = section((out / "report.md").read_text(encoding="utf-8"), "XVNLI -- zero-shot")
    assert f"| language | ours: {run_a} | ours: {run_b} | UC2 | M3P |" in xvnli
    assert "| ar | 61.50 | 50.00 | 56.19 | 55.24 |" in xvnli
    assert not list(out.glob("*.png"))


def test_extra_published_numbers_need_a_source(tmp_path, capsys):
    run = write_runs(tmp_path)
    extra = tmp_path / "published.json"
    entry = {
        "model": "Paper model",
        "source": "Someone et al. 2099, Table 9",
        "task": "xvnli",
        "protocol": "zero_shot",
        "metric": "accuracy",
        "values": {"avg": 70.0},
    }
    extra.write_text(json.dumps([entry]), encoding="utf-8")
    out = tmp_path / "report"
    assert main([str(run), "--out", str(out), "--baselines", str(extra), "--no-png"]) == 0
    xvnli = section((out / "report.md").read_text(encoding="utf-8"), "XVNLI -- zero-shot")
    assert f"| language | ours: {run} | UC2 | M3P | Paper model |" in xvnli
    assert "| ar | 61.50 | 56.19 | 55.24 | \u2014 |" in xvnli  # no per-language number published
    assert "62.05 | 58.25 | 70.00 |" in xvnli
    assert "Paper model: Someone et al. 2099, Table 9" in xvnli

    del entry["source"]
    extra.write_text(json.dumps([entry]), encoding="utf-8")
    assert main([str(run), "--out", str(out), "--baselines", str(extra)]) == 2
    assert "'source' must be a non-empty string" in capsys.readouterr().err


def test_bad_paths_and_empty_folders(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    (empty / "results").mkdir(parents=True)
    (empty / "results" / "config.json").write_text("{}", encoding="utf-8")
    assert main([str(empty), "--out", str(tmp_path / "out"), "--no-png"]) == 0
    assert "every table shows ours as missing" in capsys.readouterr().err
    report = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    titles = [line for line in report.splitlines() if line.startswith("## ")]
    assert len(titles) == 5 and all(title.endswith("-- zero-shot") for title in titles)  # the IGLUE tasks
    assert all("ours: missing" in section(report, title[3:]) for title in titles)


def test_shots_from_the_few_shot_files():
    assert shots_of([{"shots_file": "a/ar/train_48.jsonl"}, {"shots_file": "a/es/train_48.jsonl"}]) == "48"
    assert shots_of([{"shots_file": "marvl/few_shot/annotations/marvl-id_train10x2.jsonl"}]) == "10x2"
    assert shots_of([{"shots_file": "xGQA/few_shot/de/train_5.json"}]) == "5"
    assert shots_of([{"shots_file": "a/train_5.json"}, {"shots_file": "b/train_10.json"}]) is None
    assert shots_of([{"language": "de"}]) is None


def test_few_shot_tables_selected_on_test_are_labelled(tmp_path):
    run = tmp_path / "run_t"
    rows = accuracy_rows({"ar": 70.0, "es": 71.0}, shots="48", selected_on="test")
    written = write_task_results(run, "xvnli", "few_shot", rows, ["accuracy"], ["examples", "skipped"])
    # the header fine-tuning writes for a test-selected table of one shot count
    path = run / "results" / "xvnli" / "few_shot.json"
    path.rename(path.with_name("few_shot_48_selected_on_test.json"))
    path = path.with_name("few_shot_48_selected_on_test.json")
    path.write_text(json.dumps({**written, "shots": "48", "selected_on": "test"}), encoding="utf-8")
    out = tmp_path / "report"
    assert main([str(run), "--out", str(out), "--no-png"]) == 0
    few = section((out / "report.md").read_text(encoding="utf-8"), "XVNLI -- few-shot (48 shots)")
    assert f"| language | ours: {run} [SELECTED ON TEST] | UC2 | M3P |" in few
    assert "| ar | 70.00 | 56.87 | 56.01 |" in few
    assert "not a held-out number" in few


def scored(rows: list[dict], **scoring) -> list[dict]:
    base = {"max_examples": 0, "max_length": 0, "precision": "fp32", "k_test": 0}
    return [{**row, "scoring": {**base, **scoring}} for row in rows]


def test_numbers_scored_on_part_of_the_test_files_or_with_merged_images_say_so(tmp_path):
    partial, merged = tmp_path / "partial", tmp_path / "merged"
    rows = scored(accuracy_rows({"ar": 70.0, "fr": 72.0}), max_examples=100, first_token_twice=False)
    write_task_results(partial, "xvnli", "zero_shot", rows, ["accuracy"])
    wit = [{"language": "de", "img_r1": 30.0, "txt_r1": 31.0}]
    write_task_results(
        merged, "wit", "zero_shot", scored(wit, duplicate_images="merge"), ["img_r1", "txt_r1"]
    )
    out = tmp_path / "report"
    assert main([str(partial), str(merged), "--out", str(out), "--no-png"]) == 0
    report = (out / "report.md").read_text(encoding="utf-8")
    xvnli = section(report, "XVNLI -- zero-shot")
    assert f"- ours: {partial}: first 100 examples of each test file only (data.max_examples)" in xvnli
    wit_table = section(report, "WIT -- zero-shot")
    assert f"- ours: {merged}: duplicate_images=merge" in wit_table and "IGLUE's baselines" in wit_table
    assert "max_examples" not in wit_table and "duplicate_images" not in xvnli
    document = json.loads((out / "report.json").read_text(encoding="utf-8"))
    notes = [n for t in document["tables"] if t["task"] == "xvnli" for n in t["notes"]]
    assert any("first 100 examples" in n for n in notes)


def test_columns_scored_with_different_settings_are_named(tmp_path):
    runs = {}
    for name, precision in (("run_a", "bf16"), ("run_b", "fp32"), ("run_c", "fp32")):
        runs[name] = tmp_path / name
        rows = scored(accuracy_rows({"ar": 60.0}), precision=precision)
        write_task_results(runs[name], "xvnli", "zero_shot", rows, ["accuracy"])
    out = tmp_path / "report"
    assert main([*map(str, runs.values()), "--out", str(out), "--no-png"]) == 0
    xvnli = section((out / "report.md").read_text(encoding="utf-8"), "XVNLI -- zero-shot")
    expected = (
        f"- our columns were scored with different settings: precision: bf16 ({runs['run_a']}), "
        f"fp32 ({runs['run_b']}, {runs['run_c']})"
    )
    assert expected in xvnli
    assert "max_examples" not in xvnli  # the same in every column: not named


def test_a_table_whose_rows_were_scored_differently_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    rows = scored(accuracy_rows({"ar": 60.0}), precision="bf16") + scored(accuracy_rows({"fr": 61.0}))
    write_task_results(run, "xvnli", "zero_shot", rows, ["accuracy"])
    assert main([str(run), "--out", str(tmp_path / "report"), "--no-png"]) != 0
    err = capsys.readouterr().err
    assert "zero_shot.json: its rows were scored with different settings" in err and "bf16" in err


def test_xgqa_scored_on_its_full_testdev_files_is_marked_not_comparable(tmp_path):
    split, testdev = tmp_path / "xgqa", tmp_path / "xgqa_testdev"
    rows = accuracy_rows({"de": 40.0, "ko": 38.0})
    for row in rows:
        row["file"] = f"/iglue/xGQA/annotations/few_shot/{row['language']}/test.json"
    write_task_results(split, "xgqa", "zero_shot", rows, ["accuracy"], ["file"])
    for row in rows:
        row["file"] = f"/iglue/xGQA/annotations/zero_shot/testdev_balanced_questions_{row['language']}.json"
    write_task_results(testdev, "xgqa", "zero_shot", rows, ["accuracy"], ["file"])
    out = tmp_path / "report"
    assert main([str(split), str(testdev), "--out", str(out), "--no-png"]) == 0
    xgqa = section((out / "report.md").read_text(encoding="utf-8"), "xGQA -- zero-shot")
    assert f"- ours: {testdev}: every language scored on xGQA's full testdev files" in xgqa
    assert xgqa.count("full testdev files") == 1  # the few-shot split's run is IGLUE's test set
