"""The NLVR domain-pretraining stage of a MaRVL run (``head: cclm``) under a tester's faults: a rerun with
``resume=auto`` reuses a finished stage only when the settings that shape it are unchanged (before, a stage
trained from another ``pretrained`` model, or for fewer steps, was loaded silently); ``overwrite=true`` moves the
old run aside once, before the new stage writes (before, the new stage ended up in the old run's folder)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cclm.config import ConfigError, DecayRule, HeadInit
from cclm.model.cross_view import CrossViewModel
from cclm.runtime import trainer as trainer_module
from cclm.tasks import protocols

from ..test_domain_pretrain import marvl_config, write_caption_shards
from ..test_tasks_finetune import make_placeholder_images, pretrained_dir

__all__ = ["pretrained_dir"]  # the module-scoped fixture, shared with test_tasks_finetune
pytestmark = pytest.mark.usefixtures("one_thread")


class Crash(RuntimeError):
    pass


class Steps(list):
    crash_in: str | None = None


@pytest.fixture
def trained_steps(monkeypatch):
    """(folder name, step) of every training step; ``crash_in`` names a folder whose first step raises."""
    real_step, steps = trainer_module.Trainer.train_step, Steps()
    steps.crash_in = None

    def step(self, stats):
        if self.output_dir.name == steps.crash_in:
            raise Crash(f"injected crash in {self.output_dir}")
        real_step(self, stats)
        steps.append((self.output_dir.name, self.step))

    monkeypatch.setattr(trainer_module.Trainer, "train_step", step)
    return steps


def stage_steps(steps) -> list[int]:
    return [step for name, step in steps if name == "domain_pretrain"]


def other_pretrained(pretrained_dir, out):
    """``pretrained_dir`` with every weight moved by 0.5: another starting model."""
    model = CrossViewModel.from_pretrained(str(pretrained_dir))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.5)
    model.save_pretrained(out)
    for tokenizer_file in pretrained_dir.glob("*token*"):
        (out / tokenizer_file.name).write_bytes(tokenizer_file.read_bytes())
    return out


def test_a_finished_stage_is_reused_only_with_the_settings_it_was_trained_with(
    iglue_dir, tmp_path, pretrained_dir, trained_steps
):
    shards = write_caption_shards(tmp_path / "shards")

    def config(**changes):
        cfg = marvl_config(iglue_dir, tmp_path, pretrained_dir, shards, steps=2)
        for key, value in changes.items():
            target = cfg
            *parents, name = key.split(".")
            for parent in parents:
                target = getattr(target, parent)
            setattr(target, name, value)
        return cfg

    first = config()
    make_placeholder_images(first)
    trained_steps.crash_in = "run"  # the stage finishes, then fine-tuning dies before any checkpoint
    with pytest.raises(Crash):
        protocols.run_zero_shot(first)
    stage = tmp_path / "run" / "domain_pretrain"
    assert stage_steps(trained_steps) == [1, 2] and (stage / "model" / "task.json").is_file()
    trained_steps.crash_in = None

    other = other_pretrained(pretrained_dir, tmp_path / "other_pretrained")
    for key, value in [
        ("pretrained", str(other)),
        ("domain_pretrain.steps", 5),
        ("domain_pretrain.lr", 1e-3),
        ("train.decay_rule", DecayRule.reference),
        ("head_init", HeadInit.torch_default),
        ("train.seed", 7),
        ("data.hflip_careful", False),
    ]:
        rerun = config(**{key: value})
        rerun.resume = "auto"
        with pytest.raises(ConfigError, match=rf"resume: the finished NLVR .*{key}: .*overwrite=true"):
            protocols.run_zero_shot(rerun)
    assert not (tmp_path / "run" / "model").exists()

    # settings that do not shape the stage (the fine-tuning schedule, logging) leave it reusable
    trained_steps.clear()
    rerun = config(**{"domain_pretrain.log_every": 7, "train.lr": 1e-4})
    rerun.resume = "auto"
    protocols.run_zero_shot(rerun)
    assert stage_steps(trained_steps) == [] and [s for _, s in trained_steps] == [1, 2]
    assert (tmp_path / "run" / "model" / "task.json").is_file()


def test_overwrite_moves_the_old_run_aside_once_before_the_new_stage(
    iglue_dir, tmp_path, pretrained_dir, trained_steps
):
    shards = write_caption_shards(tmp_path / "shards")
    first = marvl_config(iglue_dir, tmp_path, pretrained_dir, shards, steps=2)
    make_placeholder_images(first)
    protocols.run_zero_shot(first)
    run = tmp_path / "run"
    old_stage = load_file(run / "domain_pretrain" / "model" / "task_head.safetensors")

    second = marvl_config(iglue_dir, tmp_path, pretrained_dir, shards, steps=3)
    second.overwrite = True
    trained_steps.crash_in = "run"  # the new stage finishes; fine-tuning dies
    with pytest.raises(Crash):
        protocols.run_zero_shot(second)
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert sorted(p.name for p in aside.iterdir() if p.name.startswith("domain_pretrain")) == [
        "domain_pretrain"
    ]
    kept = load_file(aside / "domain_pretrain" / "model" / "task_head.safetensors")
    assert all(torch.equal(kept[k], old_stage[k]) for k in old_stage), "the old run's stage is kept whole"
    new_stage = json.loads((run / "domain_pretrain" / "model" / "task.json").read_text())
    assert new_stage["domain_pretrain"]["steps"] == 3, "the new stage stays in the new run"
    assert not [p for p in run.iterdir() if ".old-" in p.name]

    # the requeued job continues the new run: the stage is reused, not trained again
    trained_steps.clear()
    trained_steps.crash_in = None
    second.overwrite, second.resume = False, "auto"
    protocols.run_zero_shot(second)
    assert stage_steps(trained_steps) == [] and (run / "model" / "task.json").is_file()
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]) == 1


def test_overwrite_moves_aside_a_run_that_holds_only_its_finished_stage(
    iglue_dir, tmp_path, pretrained_dir, trained_steps
):
    """A run that died after its stage, before fine-tuning wrote anything, is still a run of the folder."""
    shards = write_caption_shards(tmp_path / "shards")
    first = marvl_config(iglue_dir, tmp_path, pretrained_dir, shards, steps=2)
    make_placeholder_images(first)
    trained_steps.crash_in = "run"
    with pytest.raises(Crash):
        protocols.run_zero_shot(first)
    trained_steps.crash_in = None

    fresh = marvl_config(iglue_dir, tmp_path, pretrained_dir, shards, steps=2)
    with pytest.raises(protocols.UserError, match="already holds a run"):
        protocols.run_zero_shot(fresh)
    fresh.overwrite = True
    trained_steps.clear()
    protocols.run_zero_shot(fresh)
    assert stage_steps(trained_steps) == [1, 2]
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert (aside / "domain_pretrain" / "model" / "task.json").is_file()
    assert (tmp_path / "run" / "domain_pretrain" / "model" / "task.json").is_file()


@pytest.mark.parametrize("careful", [True, False])
def test_data_hflip_careful_reaches_the_stage(iglue_dir, tmp_path, pretrained_dir, monkeypatch, careful):
    """The reference's NLVR_pretrain.py flips every pair (its pretraining transform): ``data.hflip_careful=false``,
    the switch for the reference's flips, turns the stage's careful flips off too (before, only
    ``domain_pretrain.data.hflip_careful`` did)."""
    from cclm.data import pipeline

    seen = []

    class Recording(pipeline.PretrainData):
        def __init__(self, data_cfg, *args, **kwargs):
            seen.append(data_cfg.hflip_careful)
            super().__init__(data_cfg, *args, **kwargs)

    monkeypatch.setattr(pipeline, "PretrainData", Recording)
    cfg = marvl_config(
        iglue_dir, tmp_path, pretrained_dir, write_caption_shards(tmp_path / "shards"), steps=1
    )
    cfg.data.hflip_careful = careful
    make_placeholder_images(cfg)
    protocols.run_zero_shot(cfg)
    assert seen == [careful]
    saved = json.loads((tmp_path / "run" / "domain_pretrain" / "config.json").read_text())
    assert saved["data"]["hflip_careful"] is careful
