"""The cViL recipes score their dev and test files as IGLUE and fine-tuning do (``TaskSuite.read(path,
scored=True)``): an example without a gold class (an XVNLI ``-`` record, an xGQA answer outside the vocabulary)
is kept and scored as wrong; their training files still leave it out. The models, the distillation and the
scoring are stand-ins: only what the recipes read, and what they score, is checked."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from cclm.config import CViLRecipeConfig, CViLVQARecipeConfig, load_config
from cclm.recipes import cvil, cvil_vqa
from cclm.tasks.protocols import TaskSuite
from cclm.tasks.task_data import NO_GOLD_CLASS


class FakeModel:
    """What the recipes ask of a task model outside training and scoring."""

    backbone = SimpleNamespace(cfg=SimpleNamespace(vision=SimpleNamespace(image_size=32)))

    def parameters(self):
        return iter(())

    def save(self, *args, **kwargs):
        pass


def no_gold(data) -> int:
    return sum(example.label == NO_GOLD_CLASS for example in data.examples)


@pytest.fixture
def scored(monkeypatch) -> dict[str, object]:
    """Every file a recipe scores (file -> data), its images not checked."""
    seen: dict[str, object] = {}
    monkeypatch.setattr(TaskSuite, "check_images", lambda self, datas: None)

    def score(self, model, tokenizer, data):
        seen[data.file] = data
        return {"accuracy": 0.0, "examples": len(data.examples), "no_gold_class": no_gold(data)}

    monkeypatch.setattr(TaskSuite, "score", score)
    return seen


def xvnli_line(uid: str, label: str, text: str = "a hypothesis") -> str:
    return json.dumps({"gold_label": label, "sentence2": text, "pairID": uid, "Flikr30kID": uid})


def test_cvil_scores_xvnli_dash_records_as_wrong(tmp_path, monkeypatch, scored):
    """Before, run_cvil read its test files as training files: XVNLI's '-' records were left out of the
    denominator (IGLUE scores them as wrong)."""
    ann = tmp_path / "ann"
    files = {
        "en/train.jsonl": [xvnli_line("1", "entailment"), xvnli_line("2", "-"), xvnli_line("3", "neutral")],
        "de/train.jsonl": [xvnli_line("1", "entailment"), xvnli_line("2", "-"), xvnli_line("3", "neutral")],
        "de/test.jsonl": [xvnli_line("4", "entailment"), xvnli_line("5", "-"), xvnli_line("6", "neutral")],
    }
    for name, lines in files.items():
        (ann / name).parent.mkdir(parents=True, exist_ok=True)
        (ann / name).write_text("\n".join(lines) + "\n")
    for name, value in {
        "load_teacher": lambda *a: FakeModel(),
        "load_tokenizer": lambda *a: object(),
        "check_tokenizer_fits": lambda *a: None,
        "build_student": lambda *a: FakeModel(),
        "Distiller": lambda *a: FakeModel(),
        "ParallelDataset": lambda examples, *a: examples,
        "ParallelCollator": lambda *a: None,
    }.items():
        monkeypatch.setattr(cvil, name, value)
    distilled = []
    monkeypatch.setattr(
        cvil, "run_distillation", lambda model, dataset, *a, **k: distilled.append(dataset) or {}
    )
    cfg = load_config(
        CViLRecipeConfig,
        None,
        [
            f"teacher={tmp_path / 'teacher'}",
            "languages=[de]",
            f"data.train={ann}/en/train.jsonl",
            f"data.parallel.de={ann}/de/train.jsonl",
            f"data.test.de={ann}/de/test.jsonl",
            f"data.image_roots.flickr30k={tmp_path}",
            f"output_dir={tmp_path / 'out'}",
        ],
    )
    results = cvil.run_cvil(cfg)
    test = scored[f"{ann}/de/test.jsonl"]
    assert len(test.examples) == 3 and no_gold(test) == 1  # the '-' record is scored
    assert results["languages"]["de"]["examples"] == 3 and results["languages"]["de"]["no_gold_class"] == 1
    assert [example.uid for example in distilled[0]] == ["1", "3"]  # training still leaves it out


def gqa_file(path: Path, answers: dict[str, str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    questions = {
        qid: {"question": f"question {qid}?", "answer": a, "imageId": f"n{qid}"} for qid, a in answers.items()
    }
    path.write_text(json.dumps(questions))
    return path


def test_cvil_vqa_scores_xgqa_answers_outside_the_vocabulary_as_wrong(tmp_path, monkeypatch):
    """Before, run_cvil_vqa read its dev, test and translate-test files as training files: an xGQA question
    whose answer is outside the vocabulary was left out of the denominator (IGLUE scores it as wrong)."""
    vocab = tmp_path / "trainval_ans2label.json"
    vocab.write_text(json.dumps({"yes": 0, "no": 1}))
    train = {"1": "yes", "2": "bottle cap", "3": "no"}
    files = {
        "train": gqa_file(tmp_path / "en" / "train.json", train),
        "parallel": gqa_file(tmp_path / "de" / "train.json", train),
        "dev": gqa_file(tmp_path / "en" / "dev.json", {"4": "yes", "5": "bottle cap"}),
        "test": gqa_file(tmp_path / "de" / "test.json", {"6": "yes", "7": "bottle cap", "8": "no"}),
        "translate_test": gqa_file(
            tmp_path / "de_en" / "test.json", {"6": "yes", "7": "bottle cap", "8": "no"}
        ),
    }
    monkeypatch.setattr(TaskSuite, "check_images", lambda self, datas: None)
    scored: dict[str, object] = {}

    def scorer(self, model, tokenizer, data):
        scored[data.file] = data
        return 0.0

    monkeypatch.setattr(cvil_vqa.Scorer, "__call__", scorer)
    selected_on = []

    def finetune_teacher(cfg, english, dev, *args):
        selected_on.append(dev)
        return FakeModel(), object()

    for name, value in {
        "finetune_teacher": finetune_teacher,
        "student_tokenizer": lambda *a: object(),
        "with_tokenizer": lambda *a: FakeModel(),
        "set_trainable": lambda *a: None,
        "distill": lambda cfg, teacher, tt, student, tok, pairs, *a: {"pairs": [p.uid for p in pairs]},
    }.items():
        monkeypatch.setattr(cvil_vqa, name, value)
    cfg = load_config(
        CViLVQARecipeConfig,
        None,
        [
            "languages=[de]",
            "data.task=xgqa",
            f"data.label_vocab={vocab}",
            f"data.train={files['train']}",
            f"data.dev={files['dev']}",
            f"data.parallel.de={files['parallel']}",
            f"data.test.de={files['test']}",
            f"data.translate_test.de={files['translate_test']}",
            f"data.image_roots.gqa={tmp_path}",
            f"output_dir={tmp_path / 'out'}",
        ],
    )
    results = cvil_vqa.run_cvil_vqa(cfg)
    assert no_gold(selected_on[0]) == 1 and len(selected_on[0].examples) == 2  # the teacher's dev set
    for key in ("test", "translate_test"):
        data = scored[str(files[key])]
        assert len(data.examples) == 3 and no_gold(data) == 1, key
    assert results["languages"]["de"]["examples"] == 3 and results["languages"]["de"]["no_gold_class"] == 1
    assert results["stages"]["distill"]["pairs"] == ["1", "3"]  # training still leaves it out
