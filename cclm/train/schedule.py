"""Learning-rate schedule: linear warm-up, then linear or cosine decay to ``min_lr_ratio`` (or constant)."""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "constant")


def lr_factor(
    step: int, max_steps: int, warmup_steps: int, name: str = "cosine", min_lr_ratio: float = 0.0
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
