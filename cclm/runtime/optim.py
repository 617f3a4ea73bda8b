"""The optimizer every workflow uses: AdamW over parameter groups built by a weight-decay rule (``shape``,
ours, or ``reference``, CCLM's), with a learning-rate multiplier per parameter (new cross-attention, heads, a
task head)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from cclm.config import ConfigError, DecayRule, OptimizerName

# Leaf names that never decay under the ``shape`` rule, whatever their shape: the temperature, the ViT's
# embeddings (decaying a position table or the class token towards zero only hurts; CLIP/open_clip exclude
# them as well) and Swin's relative position bias table (2-D, but timm's Swin excludes it from decay too).
NO_DECAY_LEAVES = frozenset(
    {"temp", "logit_scale", "class_embedding", "positional_embedding", "relative_position_bias_table"}
)

# The reference's rule (CCLM optim.py): a parameter whose name holds any of these strings, anywhere, does not
# decay; every other one does (the temperature included). "bias" alone already covers the ``*.bias`` entries,
# and, as a substring, Swin's ``relative_position_bias_table``. Norms named otherwise (open_clip's ViT
# ``ln_1``/``ln_pre``/``ln_post``, the ITM head's ``net.1``) decay under it, as they would in the reference.
REFERENCE_NO_DECAY = (
    "bias",
    "LayerNorm.bias",
    "LayerNorm.weight",
    "norm.bias",
    "norm.weight",
    "norm1.bias",
    "norm1.weight",
    "norm2.bias",
    "norm2.weight",
)


def decays(name: str, param: nn.Parameter, rule: DecayRule | str = DecayRule.shape) -> bool:
    """Whether ``name`` takes weight decay. ``shape`` (ours): matrices decay; biases, norms (every tensor
    below 2-D) and the leaves in :data:`NO_DECAY_LEAVES` do not. ``reference``: all but the names holding one
    of :data:`REFERENCE_NO_DECAY`."""
    if DecayRule(rule) == DecayRule.reference:
        return not any(part in name for part in REFERENCE_NO_DECAY)
    return param.ndim >= 2 and name.rsplit(".", 1)[-1] not in NO_DECAY_LEAVES


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    lr_mults: Mapping[str, float] | None = None,
    decay_rule: DecayRule | str = DecayRule.shape,
) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters, one per (decay, multiplier), decay by ``decay_rule``
    (:func:`decays`); ``lr_mults`` maps parameter names to their learning-rate multiplier (1 for the rest).
    Each group records its ``lr_mult``."""
    rule = DecayRule(decay_rule)
    lr_mults = lr_mults or {}
    unknown = set(lr_mults) - {name for name, _ in model.named_parameters()}
    if unknown:
        raise ValueError(f"learning-rate multipliers for unknown parameters: {sorted(unknown)[:5]}")
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((decays(name, param, rule), float(lr_mults.get(name, 1.0))), []).append(param)
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
    decay_rule: DecayRule | str = DecayRule.shape,
    cpu_adam: bool = False,
) -> torch.optim.Optimizer:
    """torch's AdamW (``fused`` on CUDA when the optimizer state stays on the GPU): DeepSpeed's own fused Adam
    would JIT-compile for ~40 s and needs a GPU. ``decay_rule``: which parameters decay (:func:`decays`).
    ``cpu_adam``: DeepSpeed's ``DeepSpeedCPUAdam`` in its AdamW mode instead, over the same groups (their lr
    multipliers and decay): the optimizer ZeRO-Offload steps on the CPU (:func:`cpu_adam_unavailable` first)."""
    if OptimizerName(name) != OptimizerName.adamw:
        raise ConfigError(f"optimizer.name: unknown optimizer '{name}'")
    groups = param_groups(model, lr, weight_decay, lr_mults, decay_rule)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    if cpu_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(
            groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, adamw_mode=True
        )
        optimizer.register_load_state_dict_pre_hook(_as_cpu_adam_state)
    else:
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None)
        optimizer.register_load_state_dict_pre_hook(_as_torch_adamw_state)
    return optimizer


# A checkpoint's optimizer state resumes under either AdamW: DeepSpeed's CPU Adam (ZeRO-Offload where its op
# loads) counts ``step`` in a Python int and wants ``bias_correction`` in every group; torch's AdamW counts it in a
# float tensor. Without these hooks a run saved under one and resumed under the other (the op built on one
# machine and not on another, or offload switched) fails on the missing key or never advances its step count.
def _as_cpu_adam_state(optimizer, state_dict: dict) -> dict:
    groups = [{"bias_correction": True, "amsgrad": False, **group} for group in state_dict["param_groups"]]
    state = {
        key: {**value, "step": int(value["step"])} if torch.is_tensor(value.get("step")) else value
        for key, value in state_dict["state"].items()
    }
    return {**state_dict, "state": state, "param_groups": groups}


def _as_torch_adamw_state(optimizer, state_dict: dict) -> dict:
    state = {
        key: {**value, "step": torch.tensor(float(value["step"]), dtype=torch.float32)}
        if isinstance(value.get("step"), (int, float))
        else value
        for key, value in state_dict["state"].items()
    }
    return {**state_dict, "state": state}


def cpu_adam_unavailable() -> str | None:
    """Why DeepSpeed's CPU Adam cannot run in this process (one line), or None when its ``cpu_adam`` op loads:
    prebuilt (``DS_BUILD_CPU_ADAM=1`` at install), or compiled by DeepSpeed on first use into
    ``TORCH_EXTENSIONS_DIR`` (a minute or two, once; it needs a C++ compiler and ninja)."""
    try:
        from deepspeed.ops.op_builder import CPUAdamBuilder

        CPUAdamBuilder().load(verbose=False)
    except Exception as err:  # DeepSpeed raises RuntimeError, a compiler or import error anything else
        cause = err.__cause__ or err
        text = " ".join(str(cause).split())[:300]
        return f"{type(cause).__name__}: {text}" if text else type(cause).__name__
    return None


Bound = tuple[nn.Parameter, float, float]


def bounded_parameters(model: nn.Module) -> list[Bound]:
    """Every ``(parameter, low, high)`` that a module of ``model`` declares with a ``bounded_parameters()``
    method: parameters the model clamps in place before use, as the reference clamps its learnable temperature."""
    return [
        bound
        for module in model.modules()
        if hasattr(module, "bounded_parameters")
        for bound in module.bounded_parameters()
    ]


def clamp_bounded(bounds: Iterable[Bound], optimizer=None) -> None:
    """After an optimizer update: each bounded parameter back within its bounds, in the optimizer's fp32 copy
    too. ZeRO (any stage) and DeepSpeed's bf16/fp16 optimizers keep such a copy and rewrite the model's parameter
    from it at every update, so a clamp of the model's parameter alone is undone and the optimizer's value drifts
    past the bound (and takes as many steps to come back). Clamping both after each update gives the forward
    passes and gradients of the reference's in-place clamp of a single fp32 parameter. ``optimizer``: the
    engine's. A clamp works element by element, so each rank clamps only the shard it holds: no collective, and
    no host synchronisation of cclm's own."""
    with torch.no_grad():
        for param, low, high in bounds:
            if hasattr(param, "ds_id"):  # ZeRO-3: this rank's shard of the parameter and of its fp32 copy
                _clamp_zero3_shard(param, low, high)
                param.clamp_(low, high)  # a persistent (small) parameter is also whole on every rank
                continue
            mapping = getattr(param, "_hp_mapping", None)  # ZeRO-1/2, the bf16 optimizer
            if mapping is not None:
                mapping.get_hp_fragment().clamp_(low, high)  # this rank's fragment; None where it holds none
            elif not hasattr(param, "_hp_mapping"):
                copy = _fp32_copy(optimizer, param)
                if copy is not None:
                    copy.clamp_(low, high)
            param.clamp_(low, high)


def _clamp_zero3_shard(param: nn.Parameter, low: float, high: float) -> None:
    from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

    shard = param.ds_tensor  # flat, padded to the same size on every rank
    first = torch.distributed.get_rank(group=param.ds_process_group) * shard.numel()
    real = max(0, min(shard.numel(), param.ds_numel - first))  # the rest is padding
    if real == 0:
        return
    shard.narrow(0, 0, real).clamp_(low, high)
    master = safe_get_local_fp32_param(param)
    if master is not None:
        master = master.flatten()
        master.narrow(0, 0, real).clamp_(low, high)
        safe_set_local_fp32_param(param, master)


def _fp32_copy(optimizer, param: nn.Parameter) -> torch.Tensor | None:
    """The fp32 copy of ``param`` that DeepSpeed's fp16-style optimizer keeps without ZeRO (bf16 at stage 0: one
    tensor per parameter in ``fp32_groups``, beside the model's ``fp16_groups``)."""
    for low_precision_group, fp32_group in zip(
        getattr(optimizer, "fp16_groups", None) or [], getattr(optimizer, "fp32_groups", None) or []
    ):
        for low_precision, copy in zip(low_precision_group, fp32_group):
            if low_precision is param:
                return copy
    return None
