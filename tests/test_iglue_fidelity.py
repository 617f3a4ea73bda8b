"""Where cclm's IGLUE protocol meets the official one (e-bug/iglue at 43cbac9, its volta scripts): examples
whose gold answer is no class stay in the denominator as wrong answers (xGQA's "bottle cap", XVNLI's "-"; the
CCLM reference's XVNLI drop one switch away, recorded in the scoring settings and footnoted by the report), a
few-shot file that shares image paths with its test file is noted instead of stopping the sweep, few-shot runs
train at IGLUE's batch size for their shot count and MaRVL selects on IGLUE's part of the dev set, and the
report footnotes WIT ar's missing line."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from cclm.config import FinetuneConfig, load_config
from cclm.runtime.trainer import Selection
from cclm.tasks import few_shot, protocols, report
from cclm.tasks.results import write_task_results
from cclm.tasks.task_data import NO_GOLD_CLASS
from cclm.tasks.task_model import TaskModel

from .conftest import REPO

FINETUNE = REPO / "configs" / "finetune"
# GQA testdev-balanced's two questions whose answer is not in trainval_ans2label.json (both in every
# language's few-shot test.json of xGQA, IGLUE's 9,666 questions), with the questions around them
GQA_QUESTIONS = {
    "201307251": {"imageId": "n161313", "question": "Is it overcast?", "answer": "no"},
    "201175144": {
        "imageId": "n357784",
        "question": "What is located on top of the bottle?",
        "answer": "bottle cap",
    },
    "201303229": {
        "imageId": "n518912",
        "question": "How tall is the chair in the bottom of the photo?",
        "answer": "short",
    },
    "201175142": {
        "imageId": "n357784",
        "question": "What do you think is located on top of the bottle made of plastic?",
        "answer": "bottle cap",
    },
}


def config(name: str, iglue_dir, *overrides: str) -> FinetuneConfig:
    return load_config(
        FinetuneConfig, FINETUNE / name, [f"data.root={iglue_dir}", "train.device=cpu", *overrides]
    )


def perfect_classifier(model, loader, *args, **kwargs):
    """``predict`` of a model right wherever the gold answer is one of its classes."""
    labels = torch.tensor([example.label for example in loader.dataset.examples])
    return labels.clamp(min=0), labels


# ------------------------------------------------------------------------------------ no gold class: xGQA
def test_xgqa_answers_outside_the_vocabulary_are_scored_as_wrong_answers(
    iglue_dir, tmp_path, tiny_model_dir, monkeypatch
):
    """IGLUE's GQA_score.py and the reference's get_acc count them wrong over every question; training leaves
    them out (counted), and the label survives batching."""
    vocab = iglue_dir / "gqa/annotations/trainval_ans2label.json"
    if not vocab.is_file():
        pytest.skip(f"{vocab} not found")
    path = tmp_path / "en" / "test.json"
    path.parent.mkdir()
    path.write_text(json.dumps(GQA_QUESTIONS))
    images = tmp_path / "images"
    images.mkdir()
    for record in GQA_QUESTIONS.values():
        Image.new("RGB", (40, 30), (90, 120, 30)).save(images / f"{record['imageId']}.jpg")
    cfg = config("xgqa.yaml", iglue_dir, f"pretrained={tiny_model_dir}", f"data.image_roots.gqa={images}")
    runner = protocols.TaskRunner(cfg)

    scored = runner.read(str(path), scored=True)
    assert {e.uid for e in scored.examples if e.label == NO_GOLD_CLASS} == {"201175144", "201175142"}
    assert len(scored.examples) == scored.records == 4
    training = runner.read(str(path))
    assert [e.uid for e in training.examples] == ["201307251", "201303229"]
    assert training.skipped == {"answer not in the answer vocabulary": 2}

    model, tokenizer = runner.start_model([])
    monkeypatch.setattr(TaskModel, "predict_labels", lambda self, batch, *a: batch["labels"].clamp(min=0))
    metrics = runner.score(model, tokenizer, scored)
    assert metrics["accuracy"] == pytest.approx(50.0)
    assert (metrics["examples"], metrics["no_gold_class"]) == (4, 2)
    assert "no_gold_label" not in runner.scoring_settings()  # no switch: IGLUE and the reference agree


# ----------------------------------------------------------------------------------- no gold class: XVNLI
def test_xvnli_scores_every_record_of_a_test_file_and_the_reference_drops_on_request(
    iglue_dir, tiny_model_dir, monkeypatch
):
    """A perfect model scores 1,150 / 1,164 on XVNLI ar test, as volta scores the 14 records labelled '-' (an
    all-zero target); ``data.no_gold_label=drop`` is the CCLM reference's 1,150, recorded in the scoring."""
    path = iglue_dir / "XVNLI/annotations/ar/test.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    monkeypatch.setattr(protocols, "predict", perfect_classifier)
    expected = {"iglue": (1164, 14, 100 * 1150 / 1164), "drop": (1150, 0, 100.0)}
    for setting, (examples, no_gold_class, accuracy) in expected.items():
        cfg = config("xvnli.yaml", iglue_dir, f"pretrained={tiny_model_dir}", f"data.no_gold_label={setting}")
        runner = protocols.TaskRunner(cfg)
        model, tokenizer = runner.start_model([])
        metrics = runner.score(model, tokenizer, runner.read(str(path), scored=True))
        assert (metrics["examples"], metrics["no_gold_class"]) == (examples, no_gold_class)
        assert metrics["accuracy"] == pytest.approx(accuracy)
        assert runner.scoring_settings()["no_gold_label"] == setting
        training = runner.read(str(path))  # nothing to learn from a record without a gold label
        assert len(training.examples) == 1150 and training.skipped == {"no gold label ('-')": 14}


def test_an_xvnli_table_scored_without_the_no_gold_records_is_not_extended_with_iglue_rows(
    iglue_dir, tmp_path
):
    """Rows of a cclm that dropped the '-' records record no ``no_gold_label``: they are scored otherwise."""
    cfg = config("xvnli.yaml", iglue_dir, f"output_dir={tmp_path}")
    runner = protocols.TaskRunner(cfg)
    earlier = {k: v for k, v in runner.scoring_settings().items() if k != "no_gold_label"}
    row = {"language": "ar", "accuracy": 56.87, "model": "m", "model_digest": "d", "scoring": earlier}
    write_task_results(tmp_path, "xvnli", "zero_shot", [row], ["accuracy"])
    assert "no_gold_label: None -> 'iglue'" in runner.table_conflict("zero_shot", "model", "d")


def xvnli_table(folder: Path, scoring: dict) -> None:
    rows = [{"language": lang, "accuracy": 60.0, "scoring": scoring} for lang in ("ar", "es", "fr", "ru")]
    write_task_results(folder, "xvnli", "zero_shot", rows, ["accuracy"])


def report_notes(folders, task: str, protocol: str = "zero_shot", shots=None) -> list[str]:
    tables = report.build_tables(report.load_results(folders), report.iglue_baselines())
    (table,) = [t for t in tables if t.key == (task, protocol, shots) and t.metric in ("accuracy", "img_r1")]
    return table.notes


def test_the_report_footnotes_xvnli_columns_scored_without_the_records_labelled_dash(tmp_path):
    settings = {"precision": "fp32", "no_gold_label": "iglue"}
    xvnli_table(tmp_path / "iglue", settings)
    xvnli_table(tmp_path / "drop", {**settings, "no_gold_label": "drop"})
    # a cclm that recorded no such setting dropped them
    xvnli_table(tmp_path / "older", {"precision": "fp32"})
    notes = report_notes([tmp_path / "iglue", tmp_path / "drop", tmp_path / "older"], "xvnli")
    dropped = {note.split(": ")[1]: note for note in notes if "labelled '-'" in note}
    assert sorted(dropped) == [str(tmp_path / "drop"), str(tmp_path / "older")]
    assert "data.no_gold_label=drop" in dropped[str(tmp_path / "drop")]
    assert all("1,164" in note for note in dropped.values())
    (mixed,) = [note for note in notes if note.startswith("our columns were scored with different settings")]
    assert "no_gold_label" in mixed


# ---------------------------------------------------------------------------------------------- few-shot
@pytest.fixture
def stub_training(monkeypatch):
    """Training and scoring replaced: ``calls`` records each training run's batch size and selection data."""
    from tests.test_iglue_protocols import FakeModel

    calls = []

    def train(self, model, tokenizer, train_datas, dev_datas, lr, output_dir, run_info=None, batch_size=None):
        calls.append(
            {
                "train": train_datas[0].file,
                "batch_size": batch_size,
                "dev": [len(d.examples) for d in dev_datas],
            }
        )
        return model, Selection(best_score=50.0, best_step=1, steps=1)

    monkeypatch.setattr(protocols.TaskRunner, "load_checkpoint", lambda self, directory: (FakeModel(), None))
    monkeypatch.setattr(protocols.TaskRunner, "train", train)
    monkeypatch.setattr(protocols.TaskRunner, "score", lambda self, model, tok, data: {"accuracy": 50.0})
    monkeypatch.setattr(protocols.TaskRunner, "check_images", lambda self, datas: None)
    return calls


def test_marvl_zh_few_shot_images_named_by_the_test_file_are_noted_not_fatal(
    iglue_dir, tmp_path, stub_training
):
    """marvl-zh_train10 shares 5 image paths with marvl-zh.jsonl; IGLUE publishes zh 10-shot results (its
    few-shot images come from a feature file of their own). The sweep goes on, the row lists them, the report
    says so; each run trains at IGLUE's batch for its shot count and selects on IGLUE's first 448 dev
    examples."""
    annotations = iglue_dir / "marvl"
    needed = [
        "few_shot/annotations/marvl-zh_train1.jsonl",
        "few_shot/annotations/marvl-zh_train10.jsonl",
        "zero_shot/annotations/marvl-zh.jsonl",
    ]
    if not all((annotations / name).is_file() for name in needed) or not (iglue_dir / "nlvr2").is_dir():
        pytest.skip("MaRVL zh few-shot / test files not found")
    cfg = config(
        "marvl_few_shot.yaml",
        iglue_dir,
        "languages=[zh]",
        f"checkpoint={tmp_path / 'english'}",
        f"output_dir={tmp_path / 'out'}",
        "train.lr_sweep=[1e-5]",
    )
    cfg.data.few_shot_train = {"zh": str(annotations / "few_shot/annotations/marvl-zh_train{1,10}.jsonl")}
    cfg.data.dev = [str(iglue_dir / "nlvr2/annotations/test.jsonl")]  # NLVR2 dev's stand-in (same layout)
    tables = few_shot.run_few_shot(cfg)

    assert [(c["train"].rsplit("_", 1)[1], c["batch_size"], c["dev"]) for c in stub_training] == [
        ("train1.jsonl", 2, [448]),
        ("train10.jsonl", 16, [448]),
    ]
    (ten,) = tables["few_shot_10"]["rows"]
    assert len(ten["shared_test_images"]) == 5 and all(
        p.startswith("zh/images/73-") for p in ten["shared_test_images"]
    )
    assert "shared_test_images" not in tables["few_shot_1"]["rows"][0]
    (note,) = [
        n for n in report_notes([tmp_path / "out"], "marvl", "few_shot", "10") if "test file also names" in n
    ]
    assert "zh 5" in note


def test_a_shot_count_without_its_own_batch_size_trains_at_train_batch_size():
    train = SimpleNamespace(batch_size=64, batch_size_by_shots={"1": 2, "10x2": 32})
    assert [few_shot.few_shot_batch_size(train, shots) for shots in ("1", "10x2", "48")] == [2, 32, 64]


# IGLUE's --batch_size per shot count (e-bug/iglue experiments/few_shot/<model>/<task>/<lang>/<shots>/
# train.dtu.sh: the batch of one update, the same for every language and model); UC2's and the CTRL models'
# MaRVL runs select on --max_val_batches 15 unshuffled dev batches of 32, which volta stops after 14: 448
IGLUE_FEW_SHOT_BATCH = {
    "xvnli": {"1": 2, "5": 16, "10": 32, "20": 64, "25": 64, "48": 64},
    "xgqa": {"1": 8, "5": 16, "10": 32, "20": 64, "25": 64, "48": 64},
    "marvl": {"1": 2, "2": 4, "4": 8, "10": 16, "10x2": 32},
}


@pytest.mark.parametrize("task", sorted(IGLUE_FEW_SHOT_BATCH))
def test_the_few_shot_configs_train_every_shot_count_at_iglues_batch_size(task):
    cfg = config(f"{task}_few_shot.yaml", "data/iglue")
    assert dict(cfg.train.batch_size_by_shots) == IGLUE_FEW_SHOT_BATCH[task]
    assert {run.shots for run in few_shot.few_shot_runs(cfg.data)} <= set(cfg.train.batch_size_by_shots)
    assert cfg.data.dev_max_examples == (448 if task == "marvl" else 0)


def test_xflickrco_few_shot_trains_every_shot_count_at_one_batch_size():
    """IGLUE's xFlickr&CO batch of 1 (5 shots: 2) draws negatives from the whole file; cclm's losses draw them
    from the batch, where a batch of 1 has none: its contrastive loss is 0 with no gradient."""
    import torch

    from cclm.losses import contrastive_loss

    cfg = config("xflickrco_few_shot.yaml", "data/iglue")
    assert not cfg.train.batch_size_by_shots and cfg.train.batch_size == 64
    one = torch.nn.functional.normalize(torch.randn(1, 8, requires_grad=True), dim=-1)
    loss = contrastive_loss(one, one.detach().flip(-1), 0.07, gather=False)
    assert float(loss) == 0.0


# ------------------------------------------------------------------------------------------------ WIT ar
def test_the_report_footnotes_wit_ar_scored_on_the_released_file_one_line_short(tmp_path):
    """IGLUE's WIT ar numbers are whole counts over 891 captions / 793 images; test_ar.jsonl has 890 / 792."""
    for folder, captions in (("released", 890), ("complete", 891)):
        row = {"language": "ar", "img_r1": 8.0, "txt_r1": 9.0, "images": captions - 98, "captions": captions}
        write_task_results(tmp_path / folder, "wit", "zero_shot", [row], ["img_r1", "txt_r1"])
    notes = report_notes([tmp_path / "released", tmp_path / "complete"], "wit")
    (note,) = [n for n in notes if "wit-test_7382" in n]
    assert note.startswith(f"ours: {tmp_path / 'released'}: ar scored on 890 captions")
