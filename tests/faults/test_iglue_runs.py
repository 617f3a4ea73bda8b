"""IGLUE runs under a tester's faults: a file with no usable example stops the run before a model is built; result
tables are never silently replaced (``cclm evaluate`` into a zero-shot run's folder, a second few-shot run into the
same output_dir); a few-shot sweep checks every run folder before the first one trains, and a resumed run must be
on the file it was trained on; the report averages ours over the baselines' languages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cclm.cli import main as cclm_main
from cclm.config import Protocol
from cclm.data.tokenize import load_tokenizer
from cclm.errors import UserError
from cclm.tasks import protocols
from cclm.tasks.annotations import AnnotationError, language_from_path
from cclm.tasks.few_shot import run_few_shot
from cclm.tasks.task_model import TaskModel

from ..test_tasks_finetune import iglue, make_placeholder_images, pretrained_dir, task_config

__all__ = ["pretrained_dir"]  # the module-scoped fixture, shared with test_tasks_finetune
pytestmark = pytest.mark.usefixtures("one_thread")


def xvnli(iglue_dir, tmp_path, pretrained_dir, **data):
    files = dict(
        train=[iglue(iglue_dir, "XVNLI/annotations/en/train_48.jsonl")],
        dev=[iglue(iglue_dir, "XVNLI/annotations/en/train_5.jsonl")],
        test={lang: iglue(iglue_dir, f"XVNLI/annotations/{lang}/test.jsonl") for lang in ("en", "ar", "fr")},
    )
    cfg = task_config("xvnli", iglue_dir, tmp_path, pretrained_dir, **{**files, **data})
    make_placeholder_images(cfg)
    return cfg


def retrained_copy(model_dir: Path, out: Path) -> Path:
    """``model_dir`` saved again to ``out`` with one head weight changed: another model."""
    model = TaskModel.load(model_dir)
    with torch.no_grad():
        next(model.head.parameters()).add_(0.01)
    model.save(out, load_tokenizer(str(model_dir)))
    return out


def rows(table_path: Path) -> list[str]:
    return [row["language"] for row in json.loads(table_path.read_text())["rows"]]


# ----------------------------------------------------------------------------------- no usable example
@pytest.mark.parametrize("content", ["", '{"gold_label": "-", "sentence2": "x", "Flikr30kID": "1.jpg"}\n'])
@pytest.mark.parametrize("key", ["test", "dev"])
def test_a_file_with_no_usable_example_stops_the_run_before_training(
    iglue_dir, tmp_path, pretrained_dir, monkeypatch, content, key
):
    """Before, the run trained and saved its model, then failed in torch.cat naming no file, and wrote no table."""
    empty = tmp_path / "ar" / "test.jsonl"
    empty.parent.mkdir()
    empty.write_text(content)
    cfg = xvnli(iglue_dir, tmp_path, pretrained_dir)
    if key == "test":
        cfg.data.test["ar"] = str(empty)
    else:
        cfg.data.dev = [str(empty)]
    monkeypatch.setattr(protocols.TaskRunner, "start_model", lambda *a: pytest.fail("a model was built"))
    with pytest.raises(AnnotationError, match=rf"{empty}: no usable example \({1 if content else 0} record"):
        protocols.run_zero_shot(cfg)


def test_inspect_fails_a_file_with_no_usable_example(tmp_path, capsys):
    empty = tmp_path / "test.jsonl"
    empty.write_text('{"gold_label": "-", "sentence2": "x", "Flikr30kID": "1.jpg"}\n')
    assert cclm_main(["iglue", "inspect", "--task", "xvnli", str(empty)]) == 1
    out, err = capsys.readouterr()
    assert (
        json.loads(out)["usable"] == 0 and f"{empty}: no usable example (1 record(s) read; skipped: 1" in err
    )


# ------------------------------------------------------------------------------------------ result tables
def test_evaluate_keeps_the_rows_of_its_model_and_refuses_another_models_table(
    iglue_dir, tmp_path, pretrained_dir
):
    cfg = xvnli(iglue_dir, tmp_path, pretrained_dir)
    protocols.run_zero_shot(cfg)
    run, table = tmp_path / "run", tmp_path / "run" / "results" / "xvnli" / "zero_shot.json"
    first = json.loads(table.read_text())
    digest = TaskModel.weights_digest(run / "model")
    assert {(r["model"], r["model_digest"]) for r in first["rows"]} == {(str(run / "model"), digest)}

    # re-scoring one language of the same model replaces that row and keeps the others (before: only ar was left)
    again = xvnli(iglue_dir, tmp_path, pretrained_dir)
    again.checkpoint, again.languages = str(run / "model"), ["ar"]
    protocols.evaluate_checkpoint(again)
    assert rows(table) == ["en", "ar", "fr"]
    assert json.loads(table.read_text())["rows"] == first["rows"]  # the same model scores the same

    # another model's numbers never land silently in this table
    other = retrained_copy(run / "model", tmp_path / "other")
    foreign = xvnli(iglue_dir, tmp_path, pretrained_dir)
    foreign.checkpoint = str(other)
    with pytest.raises(UserError, match=r"zero_shot\.json holds rows of another model .*overwrite=true"):
        protocols.evaluate_checkpoint(foreign)
    assert json.loads(table.read_text()) == first


def test_evaluate_with_overwrite_moves_the_other_models_table_aside(iglue_dir, tmp_path, pretrained_dir):
    cfg = xvnli(iglue_dir, tmp_path, pretrained_dir)
    protocols.run_zero_shot(cfg)
    results = tmp_path / "run" / "results" / "xvnli"
    before = (results / "zero_shot.json").read_text()
    retrained = xvnli(iglue_dir, tmp_path, pretrained_dir)
    retrained.output_dir, retrained.train.max_steps = str(tmp_path / "second"), 3
    protocols.run_zero_shot(retrained)
    overwrite = xvnli(iglue_dir, tmp_path, pretrained_dir)
    overwrite.checkpoint, overwrite.overwrite = str(tmp_path / "second" / "model"), True
    protocols.evaluate_checkpoint(overwrite)
    (aside,) = results.glob("zero_shot.old-*.json")
    assert aside.read_text() == before and {p.suffix for p in results.glob("zero_shot.old-*")} == {
        ".json",
        ".csv",
        ".md",
    }
    assert {r["model"] for r in json.loads((results / "zero_shot.json").read_text())["rows"]} == {
        str(tmp_path / "second" / "model")
    }


def test_evaluate_refuses_a_few_shot_model(iglue_dir, tmp_path, pretrained_dir):
    cfg = xvnli(iglue_dir, tmp_path, pretrained_dir)
    protocols.run_zero_shot(cfg)
    few_shot_model = tmp_path / "few"
    shutil.copytree(tmp_path / "run" / "model", few_shot_model)
    info = json.loads((few_shot_model / "task.json").read_text())
    (few_shot_model / "task.json").write_text(
        json.dumps({**info, "few_shot": {"language": "ar", "shots": "48"}})
    )
    evaluate = xvnli(iglue_dir, tmp_path, pretrained_dir)
    evaluate.checkpoint = str(few_shot_model)
    with pytest.raises(protocols.ConfigError, match="is a few-shot model \\(ar, 48 shots\\)"):
        protocols.evaluate_checkpoint(evaluate)


# ------------------------------------------------------------------------------------------------ few-shot
def few_shot(iglue_dir, tmp_path, pretrained_dir, **few_shot_train):
    cfg = xvnli(iglue_dir, tmp_path, pretrained_dir, few_shot_train=few_shot_train)
    cfg.protocol, cfg.checkpoint = Protocol.few_shot, str(tmp_path / "run" / "model")
    cfg.output_dir, cfg.train.lr_sweep = str(tmp_path / "few"), [1e-4]
    make_placeholder_images(cfg)
    return cfg


@pytest.fixture
def english_model(iglue_dir, tmp_path, pretrained_dir):
    protocols.run_zero_shot(xvnli(iglue_dir, tmp_path, pretrained_dir))


def test_a_second_few_shot_run_keeps_the_first_runs_rows(iglue_dir, tmp_path, pretrained_dir, english_model):
    """Before, a run for fr into the output_dir of an ar run rewrote few_shot.json with fr alone."""
    table = tmp_path / "few" / "results" / "xvnli" / "few_shot.json"
    ar = iglue(iglue_dir, "XVNLI/annotations/ar/train_5.jsonl")
    run_few_shot(few_shot(iglue_dir, tmp_path, pretrained_dir, ar=ar))
    first = json.loads(table.read_text())["rows"]
    fr = iglue(iglue_dir, "XVNLI/annotations/fr/train_5.jsonl")
    run_few_shot(few_shot(iglue_dir, tmp_path, pretrained_dir, fr=fr))
    now = json.loads(table.read_text())["rows"]
    assert [r["language"] for r in now] == ["ar", "fr"] and now[0] == first[0]
    assert now[1]["model"] == str(tmp_path / "few" / "few_shot" / "fr")


def test_a_sweep_checks_every_run_folder_before_the_first_one_trains(
    iglue_dir, tmp_path, pretrained_dir, english_model
):
    """Before, a sweep over ar and fr, fr already run there, trained ar for nothing and then stopped."""
    fr = iglue(iglue_dir, "XVNLI/annotations/fr/train_5.jsonl")
    run_few_shot(few_shot(iglue_dir, tmp_path, pretrained_dir, fr=fr))
    both = few_shot(
        iglue_dir, tmp_path, pretrained_dir, ar=iglue(iglue_dir, "XVNLI/annotations/ar/train_5.jsonl"), fr=fr
    )
    with pytest.raises(UserError, match=r"few_shot/fr/lr_0\.0001 already holds a run"):
        run_few_shot(both)
    assert not (tmp_path / "few" / "few_shot" / "ar").exists()


def test_resuming_a_few_shot_run_with_another_training_file_is_refused(
    iglue_dir, tmp_path, pretrained_dir, english_model
):
    """Before, the finished 48-shot run was resumed (no step taken) and reported as the 5-shot result."""
    shots_48 = few_shot(
        iglue_dir, tmp_path, pretrained_dir, ar=iglue(iglue_dir, "XVNLI/annotations/ar/train_48.jsonl")
    )
    run_few_shot(shots_48)
    shots_5 = few_shot(
        iglue_dir, tmp_path, pretrained_dir, ar=iglue(iglue_dir, "XVNLI/annotations/ar/train_5.jsonl")
    )
    shots_5.resume = "auto"
    with pytest.raises(
        protocols.ConfigError, match=r"was trained on .*train_48\.jsonl \(48 shots\), not .*train_5"
    ):
        run_few_shot(shots_5)
    shots_48.resume = "auto"  # the same file resumes
    (row,) = run_few_shot(shots_48)["few_shot"]["rows"]
    assert row["shots"] == "48"


# ---------------------------------------------------------------------------------------------------- report
def test_report_averages_ours_over_the_baselines_languages(tmp_path, capsys):
    """Before, an extra language (de, which no baseline reports) entered ours' average beside theirs."""
    for run, languages in (
        ("a", ["en", "ar", "es", "fr", "ru", "de"]),
        ("b", ["en", "ar", "es", "fr", "de"]),
    ):
        path = tmp_path / run / "results" / "xvnli" / "zero_shot.json"
        path.parent.mkdir(parents=True)
        scores = [{"language": lang, "accuracy": 0.0 if lang == "de" else 60.0} for lang in languages]
        path.write_text(
            json.dumps({"task": "xvnli", "protocol": "zero_shot", "metrics": ["accuracy"], "rows": scores})
        )
    assert (
        cclm_main(
            ["iglue", "report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "rep")]
        )
        == 0
    )
    report = (tmp_path / "rep" / "report.md").read_text()
    (average,) = [line for line in report.splitlines() if line.startswith("| **avg**") and "60.00" in line]
    cells = [cell.strip() for cell in average.split("|")[2:4]]
    assert cells == [
        "60.00 (de not in the avg (no baseline reports them))",
        "60.00 (avg over 3 of 4 languages; de not in the avg (no baseline reports them))",
    ]


@pytest.mark.parametrize(
    "path, language",
    [
        ("out/my_test.jsonl", "en"),
        ("mydata/train_all.jsonl", "en"),
        ("wit/test_zh-TW.jsonl", "en"),
        ("annotations/de/test.jsonl", "de"),
        ("marvl-tr_train10x2.jsonl", "tr"),
        ("test_ar_gmt.jsonl", "ar"),
    ],
)
def test_only_known_language_codes_are_read_from_a_path(path, language):
    """Before, any two or three letters were a language: ``out/`` gave "out", ``train_all`` gave "all"."""
    assert language_from_path(path) == language
