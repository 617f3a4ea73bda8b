"""Learning-rate schedule: linear warm-up, then cosine or linear decay to ``min_lr_ratio`` (or constant)."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch

from cclm.config import ScheduleName, SchedulerConfig

SCHEDULES = tuple(s.value for s in ScheduleName)


def lr_factor(
    step: float, max_steps: int, warmup_steps: int, name: str = "cosine", min_lr_ratio: float = 0.0
) -> float:
    """Multiplier of the base learning rate before optimizer step ``step`` (0-based)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown scheduler '{name}', expected one of {SCHEDULES}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if name == "cosine" else 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def warmup_steps_of(sched_cfg: SchedulerConfig, max_steps: int) -> int:
    """``warmup_steps``, or ``warmup_ratio`` of the run when the steps are 0."""
    if sched_cfg.warmup_steps > 0:
        return int(sched_cfg.warmup_steps)
    return int(round(float(sched_cfg.warmup_ratio) * max_steps))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    sched_cfg: SchedulerConfig,
    max_steps: int,
    effective_step: Callable[[int], float] | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over ``optimizer`` (group multipliers kept: each group's lr is its own base x the factor).
    ``effective_step`` maps the optimizer step to the schedule's step, e.g. to anneal by wall time when a run
    has a time limit."""
    factor = partial(
        lr_factor,
        max_steps=max_steps,
        warmup_steps=warmup_steps_of(sched_cfg, max_steps),
        name=str(sched_cfg.name),
        min_lr_ratio=float(sched_cfg.min_lr_ratio),
    )
    factor(0)  # validates at start
    if effective_step is None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(effective_step(step)))
