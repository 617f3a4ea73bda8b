"""A tiny training run in this process on the real runtime (Trainer, DeepSpeed engine, checkpoints): a linear
regression whose batches come from :class:`cclm.runtime.sources.EpochBatches`."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cclm.config import DeepSpeedConfig, OptimizerConfig, SchedulerConfig
from cclm.runtime.env import init_distributed, seed_everything
from cclm.runtime.sources import EpochBatches
from cclm.runtime.trainer import LoopSettings, Trainer


class Regression(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, batch, view):
        return {"loss": nn.functional.mse_loss(self.linear(batch["x"]).squeeze(1), batch["y"])}


def _examples() -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=generator)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    return [{"x": x[i], "y": y[i]} for i in range(64)]


def _collate(rows: list[dict]) -> dict:
    return {"x": torch.stack([r["x"] for r in rows]), "y": torch.stack([r["y"] for r in rows])}


def toy_trainer(
    output_dir: Path,
    steps: int = 6,
    save_every: int = 2,
    zero_stage: int = 0,
    loop_options: dict | None = None,
    **options,
) -> Trainer:
    """A Trainer ready to ``run()``; ``options``: ``resume``, ``overwrite``, ``run_config`` (default
    ``{"toy": True}``); ``loop_options``: more :class:`LoopSettings` fields (``log_every`` is 1 and ``keep_last`` 5 unless given)."""
    run_config = options.pop("run_config", {"toy": True})
    env = init_distributed("cpu")
    seed_everything(0)
    source = EpochBatches(_examples(), 8, _collate, seed=0)
    loop = LoopSettings(
        max_steps=steps,
        save_every=save_every,
        progress_bar=False,
        **{"log_every": 1, "keep_last": 5, **(loop_options or {})},
    )
    return Trainer(
        Regression(),
        source,
        loop,
        env=env,
        optimizer_cfg=OptimizerConfig(lr=0.05),
        scheduler_cfg=SchedulerConfig(),
        deepspeed_cfg=DeepSpeedConfig(zero_stage=zero_stage),
        micro_batch=8,
        output_dir=output_dir,
        run_config=run_config,
        **options,
    )


def trained(output_dir: Path, steps: int = 6, save_every: int = 2, zero_stage: int = 0) -> Path:
    """Run a toy training to the end; returns its output_dir."""
    trainer = toy_trainer(output_dir, steps, save_every, zero_stage)
    trainer.run()
    trainer.close()
    return output_dir
