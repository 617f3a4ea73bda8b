"""Fine-tuning reruns under a tester's faults: a few-shot sweep requeued after SIGUSR1 keeps every finished
(language, lr) run even without checkpoints (before, with the default ``train.save_every=0`` it trained them all
again, so a sweep longer than the job's time limit never finished); result tables never mix rows scored with
other settings, nor few-shot rows fine-tuned from another English model; the fine-tuning switches are recorded
with the model and its rows, and a ``head_init`` changed on resume (which cannot apply) is warned about."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import pytest
from safetensors.torch import load_file

from cclm.config import ConfigError, DecayRule, HeadInit, Protocol
from cclm.errors import RunInterrupted, UserError
from cclm.runtime import trainer as trainer_module
from cclm.tasks import few_shot, protocols
from cclm.tasks.task_model import TaskModel

from ..test_tasks_finetune import iglue, make_placeholder_images, pretrained_dir
from .test_iglue_runs import retrained_copy, xvnli

__all__ = ["pretrained_dir"]  # the module-scoped fixture, shared with test_tasks_finetune
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def english(iglue_dir, tmp_path, pretrained_dir):
    """An English xvnli model in ``run/model`` (its zero-shot table tests en, ar, fr)."""
    protocols.run_zero_shot(xvnli(iglue_dir, tmp_path, pretrained_dir))
    return tmp_path / "run" / "model"


def sweep_config(iglue_dir, tmp_path, pretrained_dir, checkpoint, languages=("ar", "fr")):
    files = {lang: iglue(iglue_dir, f"XVNLI/annotations/{lang}/train_5.jsonl") for lang in languages}
    cfg = xvnli(iglue_dir, tmp_path, pretrained_dir, few_shot_train=files)
    cfg.data.test = {lang: cfg.data.test[lang] for lang in languages}
    cfg.protocol, cfg.checkpoint, cfg.output_dir = Protocol.few_shot, str(checkpoint), str(tmp_path / "few")
    cfg.train.lr_sweep, cfg.train.max_steps, cfg.train.log_every = [1e-4, 3e-4], 4, 1
    assert cfg.train.save_every == 0  # the default: no checkpoints
    make_placeholder_images(cfg)
    return cfg


@pytest.fixture
def trained(monkeypatch):
    """(language/lr folder, step) of every step; SIGUSR1 arrives in ``signal_at`` = (folder, step) once."""
    real_step, steps = trainer_module.Trainer.train_step, Steps()

    def step(self, stats):
        real_step(self, stats)
        where = f"{self.output_dir.parent.name}/{self.output_dir.name}"
        steps.append((where, self.step))
        if (where, self.step) == steps.signal_at:
            steps.signal_at = None
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", step)
    return steps


class Steps(list):
    signal_at: tuple[str, int] | None = None


# ------------------------------------------------------------------------------------------- few-shot requeue
def test_a_requeued_sweep_keeps_its_finished_runs_without_checkpoints(
    iglue_dir, tmp_path, pretrained_dir, english, trained
):
    straight = sweep_config(iglue_dir, tmp_path, pretrained_dir, english)
    straight.output_dir = str(tmp_path / "straight")
    expected = few_shot.run_few_shot(straight)["few_shot"]["rows"]

    trained.clear()
    trained.signal_at = ("fr/lr_0.0003", 2)  # SLURM's warning in the last run of the sweep
    with pytest.raises(RunInterrupted):
        few_shot.run_few_shot(sweep_config(iglue_dir, tmp_path, pretrained_dir, english))
    assert len(trained) == 14

    trained.clear()
    requeued = sweep_config(iglue_dir, tmp_path, pretrained_dir, english)
    requeued.resume = "auto"
    rows = few_shot.run_few_shot(requeued)["few_shot"]["rows"]
    assert trained == [("fr/lr_0.0003", 3), ("fr/lr_0.0003", 4)], "only the signalled run goes on"
    for got, want in zip(rows, expected, strict=True):
        for key in ("language", "lr", "dev", "accuracy", "dev_by_lr"):
            assert got[key] == pytest.approx(want[key], abs=1e-6), key

    # one language's selected weights are kept: the best lr's, not one model per lr
    for language in ("ar", "fr"):
        folder = tmp_path / "few" / "few_shot" / language
        kept = [p.parent.parent.name for p in folder.glob("lr_*/best/model_fp32.safetensors")]
        best = json.loads((folder / "task.json").read_text())["few_shot"]["lr"]
        assert kept == [f"lr_{best:g}"]

    # a job requeued once more (the sweep had finished) trains and scores nothing again
    trained.clear()
    scored = []
    score = protocols.TaskRunner.score
    protocols.TaskRunner.score = lambda self, *a: scored.append(1) or score(self, *a)
    try:
        again = few_shot.run_few_shot(requeued)["few_shot"]["rows"]
    finally:
        protocols.TaskRunner.score = score
    assert trained == [] and scored == [] and again == rows


def test_a_requeued_sweep_refuses_another_starting_checkpoint(
    iglue_dir, tmp_path, pretrained_dir, english, trained
):
    trained.signal_at = ("ar/lr_0.0003", 2)
    with pytest.raises(RunInterrupted):
        few_shot.run_few_shot(sweep_config(iglue_dir, tmp_path, pretrained_dir, english, ["ar"]))
    other = retrained_copy(english, tmp_path / "other")
    requeued = sweep_config(iglue_dir, tmp_path, pretrained_dir, other, ["ar"])
    requeued.resume = "auto"
    with pytest.raises(
        protocols.ConfigError, match=r"few_shot/ar was fine-tuned from checkpoint=.*run/model"
    ):
        few_shot.run_few_shot(requeued)


def test_a_requeued_sweep_refuses_a_training_file_whose_content_changed(
    iglue_dir, tmp_path, pretrained_dir, english, trained
):
    copy = tmp_path / "shots" / "ar" / "train_5.jsonl"
    copy.parent.mkdir(parents=True)
    copy.write_bytes(Path(iglue(iglue_dir, "XVNLI/annotations/ar/train_5.jsonl")).read_bytes())
    cfg = sweep_config(iglue_dir, tmp_path, pretrained_dir, english, ["ar"])
    cfg.data.few_shot_train = {"ar": str(copy)}
    trained.signal_at = ("ar/lr_0.0003", 2)  # lr 1e-4 finished on the file as it was
    with pytest.raises(RunInterrupted):
        few_shot.run_few_shot(cfg)
    lines = copy.read_text(encoding="utf-8").splitlines(keepends=True)
    copy.write_text("".join(lines[:-1]), encoding="utf-8")  # the same name, one example fewer
    cfg.resume = "auto"
    trained.clear()
    with pytest.raises(ConfigError, match=r"few_shot/ar's sweep began on .*train_5\.jsonl"):
        few_shot.run_few_shot(cfg)
    assert trained == []  # refused before training anything


def test_a_requeued_sweep_refuses_another_batch_size(iglue_dir, tmp_path, pretrained_dir, english, trained):
    """A sweep resumed at another batch size (a config changed between jobs, or by an upgrade that gave shot
    counts their own) trained its other learning rates at it, and selection compared the two."""
    cfg = sweep_config(iglue_dir, tmp_path, pretrained_dir, english, ["ar"])
    trained.signal_at = ("ar/lr_0.0003", 2)
    with pytest.raises(RunInterrupted):
        few_shot.run_few_shot(cfg)
    cfg.resume = "auto"
    cfg.train.batch_size_by_shots = {
        few_shot.shots_of(cfg.data.few_shot_train["ar"]): cfg.train.batch_size + 1
    }
    trained.clear()
    with pytest.raises(ConfigError, match=r"few_shot/ar's sweep trained at batch size"):
        few_shot.run_few_shot(cfg)
    assert trained == []


# ------------------------------------------------------------------------------------------------ result tables
def test_evaluate_refuses_to_merge_rows_scored_with_other_settings(
    iglue_dir, tmp_path, pretrained_dir, english
):
    table = tmp_path / "run" / "results" / "xvnli" / "zero_shot.json"
    before = json.loads(table.read_text())
    for key, value in [("max_examples", 3), ("k_test", 1), ("first_token_twice", True)]:
        again = xvnli(iglue_dir, tmp_path, pretrained_dir)
        again.checkpoint, again.languages = str(english), ["ar"]
        section = again.eval if key in ("k_test", "first_token_twice") else again.data
        setattr(section, key, value)
        with pytest.raises(
            UserError, match=rf"zero_shot\.json holds rows scored with other settings .*{key}"
        ):
            protocols.evaluate_checkpoint(again)
        assert json.loads(table.read_text()) == before
    assert before["rows"][0]["scoring"]["k_test"] == 4 and before["rows"][0]["scoring"]["max_examples"] == 6
    # with overwrite the table is moved aside: the new one holds only rows scored one way
    again.overwrite = True
    protocols.evaluate_checkpoint(again)
    assert [r["language"] for r in json.loads(table.read_text())["rows"]] == ["ar"]
    assert list(table.parent.glob("zero_shot.old-*.json"))


def refused_before_training(cfg, match: str) -> None:
    """``cfg``'s few-shot run is refused (``match``) before any of its languages trains."""
    with pytest.raises(UserError, match=match):
        few_shot.run_few_shot(cfg)
    for language in cfg.data.few_shot_train:
        assert not (Path(cfg.output_dir) / "few_shot" / language).exists(), "refused before training"


def test_a_few_shot_table_never_mixes_languages_from_two_english_models(
    iglue_dir, tmp_path, pretrained_dir, english
):
    table = tmp_path / "few" / "results" / "xvnli" / "few_shot.json"
    ar = sweep_config(iglue_dir, tmp_path, pretrained_dir, english, ["ar"])
    ar.train.lr_sweep = [1e-4]
    few_shot.run_few_shot(ar)

    other = retrained_copy(english, tmp_path / "other")
    fr = sweep_config(iglue_dir, tmp_path, pretrained_dir, other, ["fr"])
    fr.train.lr_sweep = [1e-4]
    refused_before_training(fr, r"few_shot\.json holds rows fine-tuned from another model .*run/model")
    (row,) = json.loads(table.read_text())["rows"]
    assert row["checkpoint"] == str(english)
    assert row["checkpoint_digest"] == TaskModel.weights_digest(english)
    fr.overwrite = True
    (row,) = few_shot.run_few_shot(fr)["few_shot"]["rows"]
    assert row["language"] == "fr" and row["checkpoint"] == str(other)
    assert list(table.parent.glob("few_shot.old-*.json"))


def test_a_few_shot_table_never_mixes_shot_counts(iglue_dir, tmp_path, pretrained_dir, english):
    """Two one-shot-count sweeps into one output_dir both write ``few_shot``: the second, with another shot
    count, must not join the first's rows (the table's average would mix 48-shot and 5-shot numbers)."""
    table = tmp_path / "few" / "results" / "xvnli" / "few_shot.json"
    ar = sweep_config(iglue_dir, tmp_path, pretrained_dir, english, ["ar"])
    ar.data.few_shot_train = {"ar": iglue(iglue_dir, "XVNLI/annotations/ar/train_1.jsonl")}
    make_placeholder_images(ar)
    ar.train.lr_sweep = [1e-4]
    few_shot.run_few_shot(ar)
    assert json.loads(table.read_text())["shots"] == "1"

    fr = sweep_config(iglue_dir, tmp_path, pretrained_dir, english, ["fr"])
    fr.train.lr_sweep = [1e-4]
    refused_before_training(fr, r"few_shot\.json holds rows of another shot count \(1; this run: 5\)")
    fr.overwrite = True
    few_shot.run_few_shot(fr)
    document = json.loads(table.read_text())
    assert document["shots"] == "5" and [row["language"] for row in document["rows"]] == ["fr"]
    assert list(table.parent.glob("few_shot.old-*.json"))

    ar_5 = sweep_config(iglue_dir, tmp_path, pretrained_dir, english, ["ar"])  # the same shot count joins
    ar_5.train.lr_sweep, ar_5.overwrite = [1e-4], True  # replaces few_shot/ar, the 1-shot run's folder
    few_shot.run_few_shot(ar_5)
    document = json.loads(table.read_text())
    assert document["shots"] == "5" and sorted(row["language"] for row in document["rows"]) == ["ar", "fr"]


# ----------------------------------------------------------------------------------------- recorded switches
def test_the_fine_tuning_switches_are_recorded_with_the_model_and_its_rows(
    iglue_dir, tmp_path, pretrained_dir, monkeypatch, caplog
):
    cfg = xvnli(iglue_dir, tmp_path, pretrained_dir)
    cfg.data.hflip_careful, cfg.train.decay_rule, cfg.head_init = (
        False,
        DecayRule.reference,
        HeadInit.torch_default,
    )
    cfg.train.max_steps, cfg.train.save_every = 4, 2
    real_step = trainer_module.Trainer.train_step

    def crash_at_3(self, stats):
        if self.step == 2 and cfg.resume is None:
            raise RuntimeError("injected crash")
        real_step(self, stats)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", crash_at_3)
    with pytest.raises(RuntimeError, match="injected"):
        protocols.run_zero_shot(cfg)
    cfg.resume, cfg.head_init = "auto", HeadInit.normal  # the head comes from the checkpoint: cannot apply
    with caplog.at_level(logging.WARNING):
        tables = protocols.run_zero_shot(cfg)
    assert "head_init=normal does not apply to this resumed run" in caplog.text
    want = {"data.hflip_careful": False, "train.decay_rule": "reference", "head_init": "torch_default"}
    run = tmp_path / "run"
    assert json.loads((run / "model" / "task.json").read_text())["fine_tuning"] == want
    assert all(row["fine_tuning"] == want for row in tables["zero_shot"]["rows"])
    assert json.loads((run / "config.json").read_text())["head_init_applied"] == "torch_default"
    assert load_file(run / "model" / "model.safetensors")  # a complete model folder


def test_a_finished_run_stopped_while_scoring_is_scored_again_not_trained_again(
    iglue_dir, tmp_path, pretrained_dir, monkeypatch
):
    """A tester's fault: with the default ``train.save_every=0`` a run that failed while scoring (after its model
    was saved) was trained again from step 0 by ``resume=auto``."""
    cfg = xvnli(iglue_dir, tmp_path, pretrained_dir)
    assert cfg.train.save_every == 0
    real_table = protocols.TaskRunner.table

    def scoring_fails(self, *args, **kwargs):
        raise RuntimeError("injected scoring failure")

    monkeypatch.setattr(protocols.TaskRunner, "table", scoring_fails)
    with pytest.raises(RuntimeError, match="injected scoring failure"):
        protocols.run_zero_shot(cfg)
    monkeypatch.setattr(protocols.TaskRunner, "table", real_table)
    model_dir = tmp_path / "run" / "model"
    digest = TaskModel.weights_digest(model_dir)
    real_step, steps = trainer_module.Trainer.train_step, []

    def counted_step(self, stats):
        steps.append(self.step)
        real_step(self, stats)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", counted_step)
    cfg.resume = "auto"
    cfg.train.lr = cfg.train.lr * 2  # shapes the training: the finished model is not this config's
    with pytest.raises(
        ConfigError, match=r"holds this run's finished model, trained with other settings \(train.lr"
    ):
        protocols.run_zero_shot(cfg)
    cfg.train.lr = cfg.train.lr / 2
    tables = protocols.run_zero_shot(cfg)
    assert steps == [], "nothing trained again"
    assert TaskModel.weights_digest(model_dir) == digest
    assert {row["language"] for row in tables["zero_shot"]["rows"]} == set(cfg.data.test)
    assert all(row["model_digest"] == digest for row in tables["zero_shot"]["rows"])
