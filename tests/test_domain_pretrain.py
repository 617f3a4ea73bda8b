"""The NLVR domain-pretraining step of the MaRVL protocol (``domain_pretrain``, ``head: cclm``): text assignment on
image-caption shards at the pretrained image size, then fine-tuning at the configured size; the stage is saved and a
resumed run reuses it; a config that cannot run it is refused before anything runs."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cclm.config import ConfigError, StreamConfig, TaskHeadStyle
from cclm.data.shards import VIEW_IMAGE_CAPTION, ShardSink
from cclm.tasks import protocols
from cclm.tasks.nlvr_fusion import TextAssignment

from .test_tasks_finetune import make_placeholder_images, pretrained_dir, task_config, task_setups

__all__ = ["pretrained_dir"]  # the module-scoped fixture, shared with test_tasks_finetune
pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def write_caption_shards(folder) -> str:
    with ShardSink(folder, VIEW_IMAGE_CAPTION, max_samples=8) as sink:
        for i in range(16):
            name, rgb = list(COLOURS.items())[i % len(COLOURS)]
            image = io.BytesIO()
            Image.new("RGB", (40, 40), rgb).save(image, format="JPEG")
            meta = {"captions": {"en": f"a {name} picture"}}
            sink.write(f"img{i:04d}", {"jpg": image.getvalue(), "json": json.dumps(meta).encode()}, ["en"])
        sink.close()
    return str(folder / "*.tar")


def marvl_config(iglue_dir, tmp_path, pretrained_dir, shards: str | None, steps: int = 3):
    setup = dict(task_setups(iglue_dir)["marvl"], translate_test={})
    setup["test"] = {"id": setup["test"]["id"]}
    cfg = task_config("marvl", iglue_dir, tmp_path, pretrained_dir, **setup)
    cfg.head = TaskHeadStyle.cclm
    cfg.domain_pretrain.steps = steps
    cfg.domain_pretrain.data.num_workers = 0
    if shards:
        cfg.domain_pretrain.data.image_caption = StreamConfig(shards=shards, batch_size=6)
    return cfg


def test_domain_pretraining_runs_before_fine_tuning_at_the_pretrained_size(
    iglue_dir, tmp_path, pretrained_dir, monkeypatch
):
    cfg = marvl_config(iglue_dir, tmp_path, pretrained_dir, write_caption_shards(tmp_path / "shards"))
    pretrained_size = json.loads((pretrained_dir / "config.json").read_text())["model"]["vision"][
        "image_size"
    ]
    cfg.image_size = pretrained_size + 16  # fine-tuning at a larger size, as the reference (224 -> 384)
    make_placeholder_images(cfg)
    seen_sizes = []
    forward = TextAssignment.forward

    def recording_forward(self, batch, view="task"):
        seen_sizes.append(tuple(batch["images"].shape[-2:]))
        return forward(self, batch, view)

    monkeypatch.setattr(TextAssignment, "forward", recording_forward)
    protocols.run_zero_shot(cfg)

    assert seen_sizes == [(pretrained_size, pretrained_size)] * 3
    stage = tmp_path / "run" / "domain_pretrain"
    logged = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == 3 and torch.isfinite(torch.tensor(logged[-1]["image/ta"]))
    after_stage = load_file(stage / "model" / "task_head.safetensors")
    start = load_file(pretrained_dir / "model.safetensors")
    stage_backbone = load_file(stage / "model" / "model.safetensors")
    changed = [k for k in start if not torch.equal(start[k], stage_backbone[k])]
    assert changed, "the stage left the backbone unchanged"
    # the right-image copies start as the fusion layers (DualImageFusion) and the stage trained them
    query = "fusion.layers.0.attention.self.query.weight"
    assert query in after_stage and not torch.equal(after_stage[query], start[query])
    final = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert final["model"]["vision"]["image_size"] == cfg.image_size

    # a resumed run of the same folder reuses the finished stage instead of training it again
    cfg.resume = "auto"
    seen_sizes.clear()
    protocols.run_zero_shot(cfg)
    assert seen_sizes == []


def test_a_domain_pretraining_stage_stopped_by_sigusr1_resumes_from_its_checkpoint(
    iglue_dir, tmp_path, pretrained_dir, monkeypatch
):
    """SLURM's signal during the NLVR stage of a MaRVL job: the stage saves and the job exits 0; the requeued job
    (resume=auto) continues the stage from that checkpoint, trains only its remaining steps, then fine-tunes."""
    import os
    import signal

    from cclm.errors import RunInterrupted
    from cclm.runtime import trainer as trainer_module

    cfg = marvl_config(
        iglue_dir, tmp_path, pretrained_dir, write_caption_shards(tmp_path / "shards"), steps=4
    )
    cfg.domain_pretrain.log_every = 1  # the stage agrees on stopping at every step
    make_placeholder_images(cfg)
    real_step, trained = trainer_module.Trainer.train_step, []

    def step(self, stats):
        real_step(self, stats)
        trained.append((self.output_dir.name, self.step))
        if self.output_dir.name == "domain_pretrain" and self.step == 2 and cfg.resume is None:
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", step)
    with pytest.raises(RunInterrupted):
        protocols.run_zero_shot(cfg)
    stage = tmp_path / "run" / "domain_pretrain"
    assert json.loads((stage / "interrupted.json").read_text())["step"] == 2
    assert not (stage / "model").exists()

    trained.clear()
    cfg.resume = "auto"
    protocols.run_zero_shot(cfg)
    assert [s for name, s in trained if name == "domain_pretrain"] == [3, 4]  # from the step-2 checkpoint
    assert (stage / "model" / "task.json").is_file() and (tmp_path / "run" / "model" / "task.json").is_file()
    assert [json.loads(line)["step"] for line in (stage / "metrics.jsonl").read_text().splitlines()][-1] == 4


def test_a_resumed_domain_pretraining_stage_ends_with_the_weights_of_an_uninterrupted_one(
    iglue_dir, tmp_path, pretrained_dir, monkeypatch
):
    """Exact resume of the NLVR stage: the draws of the images each caption is shown with come from the trainer's
    sampling generator, which its checkpoints keep, so a stage stopped at step 2 and resumed ends bit-identical to
    one that ran straight through (before, the draws restarted from their seed)."""
    import os
    import signal

    from cclm.errors import RunInterrupted
    from cclm.runtime import trainer as trainer_module

    shards = write_caption_shards(tmp_path / "shards")
    real_step = trainer_module.Trainer.train_step
    stop = {"at": None}

    def step(self, stats):
        real_step(self, stats)
        if self.output_dir.name == "domain_pretrain" and self.step == stop["at"]:
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", step)

    def stage_weights(root, stop_at):
        cfg = marvl_config(iglue_dir, root, pretrained_dir, shards, steps=4)
        cfg.domain_pretrain.log_every = 1
        cfg.train.max_steps = 1  # the fine-tuning after the stage is not compared
        make_placeholder_images(cfg)
        stop["at"] = stop_at
        if stop_at is not None:
            with pytest.raises(RunInterrupted):
                protocols.run_zero_shot(cfg)
            stop["at"], cfg.resume = None, "auto"
        protocols.run_zero_shot(cfg)
        stage = root / "run" / "domain_pretrain" / "model"
        return {name: load_file(stage / name) for name in ("model.safetensors", "task_head.safetensors")}

    straight, resumed = stage_weights(tmp_path / "a", None), stage_weights(tmp_path / "b", 2)
    for name, tensors in straight.items():
        assert tensors.keys() == resumed[name].keys()
        different = [k for k in tensors if not torch.equal(tensors[k], resumed[name][k])]
        assert not different, f"{name}: {different[:5]}"


def test_a_config_that_cannot_run_the_stage_is_refused_before_anything_runs(
    iglue_dir, tmp_path, pretrained_dir
):
    cfg = marvl_config(iglue_dir, tmp_path, pretrained_dir, shards=None)
    with pytest.raises(ConfigError, match="needs domain_pretrain.data.image_caption.shards"):
        protocols.run_zero_shot(cfg)
    cfg = marvl_config(iglue_dir, tmp_path, pretrained_dir, shards="unused/*.tar")
    cfg.head = TaskHeadStyle.iglue
    with pytest.raises(ConfigError, match="head: cclm"):
        protocols.run_zero_shot(cfg)
    assert not (tmp_path / "run" / "domain_pretrain").exists()
