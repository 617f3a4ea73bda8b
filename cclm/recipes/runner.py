"""The training loop shared by the recipes: one *stage* = a number of optimizer steps of a model's
``forward(batch, stage) -> {"loss": ..., other named losses}`` over a batch source, through the same DeepSpeed
engine, checkpoints and logging as pretraining. Only parameters with ``requires_grad`` are optimised.

Per stage, under ``<output_dir>/<stage>/``: ``metrics.jsonl`` + TensorBoard logs, and checkpoints every
``train.save_every`` steps and at the end (``checkpoints/step_<8-digit step>``, as pretraining writes them).
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from cclm.config import ConfigError, to_dict
from cclm.train import checkpoint
from cclm.train.engine import DistInfo, build_engine
from cclm.train.logging import RunLogger, truncate_metrics

log = logging.getLogger("cclm.recipes")
RESULTS_FILE = "results.json"


@dataclass
class StageSpec:
    name: str
    steps: int
    micro_batch: int
    next_batch: Callable[[], dict[str, Any]]
    lr: float | None = None  # None = train.optimizer.lr
    data_state: Callable[[], Any] | None = None  # saved with every checkpoint (resume bookkeeping)


class _StageConfig:
    """What ``build_engine`` reads (``.train``, ``.deepspeed``), with the stage's steps and learning rate."""

    def __init__(self, cfg, spec: StageSpec):
        override: dict[str, Any] = {"max_steps": spec.steps}
        if spec.lr is not None:
            override["optimizer"] = {"lr": float(spec.lr)}
        self.train = OmegaConf.merge(cfg.train, override)
        self.deepspeed = cfg.deepspeed


def check_train_config(cfg) -> None:
    train = cfg.train
    if train.save_every <= 0 or train.log_every <= 0:
        raise ConfigError("train.save_every and train.log_every must be positive")
    if train.activation_checkpointing:
        raise ConfigError(
            "train.activation_checkpointing is not supported by the recipes (small trained parts)"
        )


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def run_stage(model: torch.nn.Module, cfg, spec: StageSpec, dist: DistInfo) -> dict[str, float]:
    """Train ``model`` for one stage; returns the last logged interval means (losses, lr, samples/s) plus the
    stage's wall time."""
    if spec.steps <= 0:
        raise ConfigError(f"{spec.name}.steps must be positive, got {spec.steps}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"stage {spec.name}: the model has no trainable parameters")
    stage_cfg = _StageConfig(cfg, spec)
    engine, _, scheduler = build_engine(model, stage_cfg, spec.micro_batch, dist.world_size)
    out_dir = Path(cfg.output_dir) / spec.name
    if dist.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        truncate_metrics(out_dir, 0)  # a fresh stage: no records of an earlier run in this folder
    logger = RunLogger(out_dir, dist.rank, spec.steps, 0, enabled_bar=False)
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    samples, last = 0, {}
    start = interval_start = time.perf_counter()
    cpu_start = time.process_time()
    engine.train()
    try:
        for step in range(1, spec.steps + 1):
            batch = spec.next_batch()
            samples += _batch_size(batch)
            out = engine(to_device(batch, dist.device), spec.name)
            engine.backward(out["loss"])
            engine.step()
            for key, value in out.items():
                sums[key] += float(value.detach().float())
                counts[key] += 1
            logger.advance()
            if step % cfg.train.log_every == 0 or step == spec.steps:
                elapsed = time.perf_counter() - interval_start
                last = {f"{spec.name}/{k}": sums[k] / counts[k] for k in sums}
                last[f"{spec.name}/lr"] = float(scheduler.get_last_lr()[0])
                last[f"{spec.name}/samples_per_s"] = samples / max(elapsed, 1e-9)
                logger.log(step, last)
                sums.clear()
                counts.clear()
                samples, interval_start = 0, time.perf_counter()
            if step % cfg.train.save_every == 0 or step == spec.steps:
                state = spec.data_state() if spec.data_state else None
                checkpoint.save(engine, out_dir, step, dist.rank, to_dict(cfg), state, cfg.train.keep_last)
    finally:
        logger.close()
    last[f"{spec.name}/seconds"] = time.perf_counter() - start
    last[f"{spec.name}/cpu_seconds"] = time.process_time() - cpu_start  # this process, all its threads
    return last


def _batch_size(batch: dict[str, Any]) -> int:
    for value in batch.values():
        if torch.is_tensor(value):
            return int(value.shape[0])
    return 0


def write_results(
    output_dir: str | Path,
    languages: dict[str, dict[str, float]],
    trained_params: int,
    total_params: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """``<output_dir>/results.json``: ``{"languages": {lang: metrics}, "trained_params", "total_params", ...}``."""
    path = Path(output_dir) / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    results = {
        "languages": languages,
        "trained_params": int(trained_params),
        "total_params": int(total_params),
        **(extra or {}),
    }
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False))
    return path
