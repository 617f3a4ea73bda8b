"""The optimizer every workflow uses: AdamW over parameter groups built by one weight-decay rule, with a
learning-rate multiplier per parameter (new cross-attention, heads, a task head)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from cclm.config import ConfigError, OptimizerName

# Leaf names that never decay, whatever their shape: the temperature and the ViT's embeddings (decaying a
# position table or the class token towards zero only hurts; CLIP/open_clip exclude them as well).
NO_DECAY_LEAVES = frozenset({"temp", "logit_scale", "class_embedding", "positional_embedding"})


def decays(name: str, param: nn.Parameter) -> bool:
    """The one weight-decay rule: matrices decay; biases, norms (every tensor below 2-D) and the leaves in
    :data:`NO_DECAY_LEAVES` do not."""
    return param.ndim >= 2 and name.rsplit(".", 1)[-1] not in NO_DECAY_LEAVES


def param_groups(
    model: nn.Module, lr: float, weight_decay: float, lr_mults: Mapping[str, float] | None = None
) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters, one per (decay, multiplier); ``lr_mults`` maps parameter names
    to their learning-rate multiplier (1 for the rest). Each group records its ``lr_mult``."""
    lr_mults = lr_mults or {}
    unknown = set(lr_mults) - {name for name, _ in model.named_parameters()}
    if unknown:
        raise ValueError(f"learning-rate multipliers for unknown parameters: {sorted(unknown)[:5]}")
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((decays(name, param), float(lr_mults.get(name, 1.0))), []).append(param)
    return [
        {"params": params, "weight_decay": weight_decay if decay else 0.0, "lr": lr * mult, "lr_mult": mult}
        for (decay, mult), params in sorted(groups.items())
    ]


def multipliers(names: Iterable[str], mult: float) -> dict[str, float]:
    """``{name: mult}`` for ``names``; an empty map when the multiplier is 1."""
    return {} if mult == 1.0 else dict.fromkeys(names, float(mult))


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    lr_mults: Mapping[str, float] | None = None,
    name: OptimizerName | str = OptimizerName.adamw,
    fused: bool = False,
) -> torch.optim.Optimizer:
    """torch's AdamW (``fused`` on CUDA when the optimizer state stays on the GPU): DeepSpeed's own fused Adam
    would JIT-compile for ~40 s and needs a GPU."""
    if OptimizerName(name) != OptimizerName.adamw:
        raise ConfigError(f"optimizer.name: unknown optimizer '{name}'")
    groups = param_groups(model, lr, weight_decay, lr_mults)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None)
