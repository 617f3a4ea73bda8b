"""Learning-rate schedule: linear warm-up, then cosine or linear decay to ``min_lr_ratio`` (or constant).

Two ways to count the schedule's steps (``scheduler.counting``):

* ``updates`` (default): one schedule step per optimizer update; warm-up factor ``(u + 1) / warmup``.
* ``iterations``: the reference's LambdaLR, stepped once per iteration, an iteration being one update of each
  view (parallel text, then image-caption): update ``u`` is at iteration ``u // views_per_iteration``, both
  updates of an iteration share its factor, and warm-up is ``i / warmup`` (0 at the first iteration).
  ``warmup_steps`` then counts iterations; ``max_steps`` still counts optimizer updates (the run has
  ``ceil(max_steps / views_per_iteration)`` iterations).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch

from cclm.config import ScheduleCounting, ScheduleName, SchedulerConfig, ViewSchedule

SCHEDULES = tuple(s.value for s in ScheduleName)
log = logging.getLogger(__name__)


def lr_factor(
    step: float,
    max_steps: int,
    warmup_steps: int,
    name: str = "cosine",
    min_lr_ratio: float = 0.0,
    counting: ScheduleCounting | str = ScheduleCounting.updates,
) -> float:
    """Multiplier of the base learning rate at schedule step ``step`` (0-based) of ``max_steps``. Warm-up is
    ``(step + 1) / warmup_steps`` when counting ``updates``, ``step / warmup_steps`` when counting
    ``iterations`` (the reference's, 0 at the first iteration)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown scheduler '{name}', expected one of {SCHEDULES}")
    if warmup_steps > 0 and step < warmup_steps:
        offset = 1 if ScheduleCounting(counting) == ScheduleCounting.updates else 0
        return (step + offset) / warmup_steps
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


def warn_if_warmup_covers_run(
    sched_cfg: SchedulerConfig, max_steps: int, per_iteration: int = 1, key: str = "train.scheduler"
) -> bool:
    """Warn, naming the key, when warm-up is as long as the run or longer: the learning rate then rises for the
    whole run (reaching its peak at the last step at best) and never decays. True when it does."""
    counting = counting_of(sched_cfg)
    length = schedule_length(sched_cfg, max_steps, per_iteration)
    warmup = warmup_steps_of(sched_cfg, length)
    if warmup < length:
        return False
    if sched_cfg.warmup_steps > 0:
        setting = f"{key}.warmup_steps={sched_cfg.warmup_steps}"
    else:
        setting = f"{key}.warmup_ratio={sched_cfg.warmup_ratio}"
    unit = "iterations" if counting == ScheduleCounting.iterations else "optimizer updates"
    log.warning(
        "%s: the warm-up (%d %s) is as long as the run (%d) or longer: the learning rate rises for the whole run "
        "and never decays",
        setting,
        warmup,
        unit,
        length,
    )
    return True


def views_per_iteration(view_schedule: ViewSchedule | str, views: Sequence[str] | int) -> int:
    """Optimizer updates per iteration: the number of views when each view takes its own update
    (``alternate``, ``interleave``) and there are two of them; 1 otherwise (``sum`` steps once over both)."""
    count = views if isinstance(views, int) else len(views)
    if ViewSchedule(view_schedule) in (ViewSchedule.alternate, ViewSchedule.interleave) and count == 2:
        return count
    return 1


def counting_of(sched_cfg: SchedulerConfig) -> ScheduleCounting:
    """``sched_cfg.counting`` (``updates`` for a config object that predates it)."""
    return ScheduleCounting(getattr(sched_cfg, "counting", ScheduleCounting.updates))


def schedule_length(sched_cfg: SchedulerConfig, max_steps: int, per_iteration: int = 1) -> int:
    """The schedule's length in its own steps: ``max_steps`` updates, or the iterations they make."""
    if counting_of(sched_cfg) == ScheduleCounting.iterations:
        return math.ceil(max_steps / max(1, per_iteration))
    return max_steps


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    sched_cfg: SchedulerConfig,
    max_steps: int,
    effective_step: Callable[[int], float] | None = None,
    views_per_iteration: int = 1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over ``optimizer`` (group multipliers kept: each group's lr is its own base x the factor),
    stepped once per optimizer update; ``max_steps`` counts optimizer updates.

    ``effective_step`` maps the optimizer update to the update the schedule should be at, e.g. further along
    to anneal by wall time when a run has a time limit; with ``counting: iterations`` that update is then
    turned into its iteration (``floor(update / views_per_iteration)``), so the time mapping works in updates
    either way."""
    counting = counting_of(sched_cfg)
    per_iteration = max(1, int(views_per_iteration)) if counting == ScheduleCounting.iterations else 1
    length = schedule_length(sched_cfg, max_steps, per_iteration)
    warmup = warmup_steps_of(sched_cfg, length)
    name, min_lr_ratio = str(sched_cfg.name), float(sched_cfg.min_lr_ratio)

    def factor(update: int) -> float:
        at = update if effective_step is None else effective_step(update)
        if counting == ScheduleCounting.iterations:
            at = math.floor(at / per_iteration)
        return lr_factor(at, length, warmup, name, min_lr_ratio, counting)

    lr_factor(0, length, warmup, name, min_lr_ratio, counting)  # validates at start
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
