"""The DeepSpeed engine: its JSON config generated from the typed ``deepspeed`` section (over an optional user
file), and ``deepspeed.initialize`` around a model, optimizer and schedule built by :mod:`cclm.runtime`."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from cclm.config import ConfigError, DecayRule, DeepSpeedConfig, OptimizerConfig, Precision, SchedulerConfig
from cclm.jsonl import json_kind, read_json
from cclm.runtime.compile import compile_towers, wants_compile
from cclm.runtime.env import DistEnv, resolve_precision
from cclm.runtime.optim import build_optimizer, cpu_adam_unavailable
from cclm.runtime.schedule import build_scheduler

log = logging.getLogger(__name__)


def deepspeed_config(
    ds_cfg: DeepSpeedConfig,
    micro_batch_size: int,
    world_size: int,
    grad_accum: int = 1,
    grad_clip: float = 1.0,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """DeepSpeed JSON from a :class:`cclm.config.DeepSpeedConfig`; inconsistent batch sizes fail here.
    ``precision: auto`` becomes bf16 on a GPU with bf16 support and fp32 elsewhere (``device``)."""
    base: dict[str, Any] = {}
    if ds_cfg.config_file:
        path = Path(ds_cfg.config_file)
        if not path.exists():
            raise ConfigError(f"deepspeed.config_file: {path} does not exist")
        base = _read_config_file(path)
    expected = micro_batch_size * grad_accum * world_size
    for key, value in (
        ("train_micro_batch_size_per_gpu", micro_batch_size),
        ("gradient_accumulation_steps", grad_accum),
        ("train_batch_size", expected),
    ):
        if key in base and base[key] not in (value, "auto"):
            raise ConfigError(
                f"batch size mismatch: {key}={base[key]} in {ds_cfg.config_file}, but micro-batch {micro_batch_size}"
                f" x grad_accum {grad_accum} x world size {world_size} gives {key}={value}"
            )
    zero = dict(base.get("zero_optimization", {}))
    stage = ds_cfg.zero_stage if ds_cfg.zero_stage is not None else int(zero.get("stage", 0))
    precision = resolve_precision(device or torch.device("cpu"), configured_precision(ds_cfg, base))
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage: {stage} is not 0, 1, 2 or 3")
    zero["stage"] = stage
    if ds_cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds_cfg.offload_params:
        if stage != 3:
            raise ConfigError("deepspeed.offload_params needs deepspeed.zero_stage=3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {**base}
    config.update(
        train_micro_batch_size_per_gpu=micro_batch_size,
        gradient_accumulation_steps=grad_accum,
        train_batch_size=expected,
        gradient_clipping=grad_clip,
        zero_optimization=zero,
        bf16={**base.get("bf16", {}), "enabled": precision == Precision.bf16},
        fp16={**base.get("fp16", {}), "enabled": precision == Precision.fp16},
        steps_per_print=10**9,
        zero_allow_untested_optimizer=True,
        wall_clock_breakdown=False,
    )
    if offloads_optimizer(config):
        # DeepSpeed refuses any client optimizer but its compiled CPU Adam under offload unless told it may run
        # it: cclm steps DeepSpeed's CPU Adam when its op loads (build_engine), else its own AdamW (slower).
        # A user's file that sets the key true asks for the CPU Adam only (refused where it cannot load).
        config.setdefault("zero_force_ds_cpu_optimizer", False)
    return config


def offload_uses_cpu_adam(config: dict[str, Any], env: DistEnv) -> bool:
    """Under ZeRO-Offload of the optimizer, which optimizer steps on the CPU: DeepSpeed's CPU Adam (vectorised,
    several times faster) when its ``cpu_adam`` op loads on every rank, else torch's AdamW with one warning (the
    slower path: ``zero_force_ds_cpu_optimizer`` is false in the generated config). Both step AdamW over cclm's
    parameter groups (lr multipliers, decay rule), so the updates agree to float rounding; a resume keeps the
    optimizer state of either. A config file with ``zero_force_ds_cpu_optimizer: true`` where the op cannot load
    is refused."""
    if env.rank == 0:
        log.info(
            "deepspeed.offload_optimizer: loading DeepSpeed's CPU Adam (compiled on its first use: a minute or two)"
        )
    reason = cpu_adam_unavailable()
    if torch.distributed.is_available() and torch.distributed.is_initialized() and env.world_size > 1:
        loaded = torch.tensor([0 if reason else 1], device=env.device)
        torch.distributed.all_reduce(loaded, op=torch.distributed.ReduceOp.MIN)
        if not loaded.item() and reason is None:
            reason = "another rank could not load it"
    if reason is None:
        return True
    if config.get("zero_force_ds_cpu_optimizer") is True:
        raise ConfigError(
            "zero_force_ds_cpu_optimizer: true in deepspeed.config_file asks for DeepSpeed's CPU Adam under "
            f"offload_optimizer, which cannot load here ({reason}); remove the key to step torch's AdamW instead"
        )
    config["zero_force_ds_cpu_optimizer"] = False
    if env.rank == 0:
        log.warning(
            "deepspeed.offload_optimizer: DeepSpeed's CPU Adam cannot load (%s): stepping torch's AdamW on the "
            "CPU instead, the slower path",
            reason,
        )
    return False


# DeepSpeed would build these itself from the file; cclm hands it the optimizer and schedule of train.optimizer and
# train.scheduler (parameter groups, lr multipliers, decay rule), and DeepSpeed then ignores the file's in silence.
BUILT_BY_CCLM = {"optimizer": "train.optimizer", "scheduler": "train.scheduler"}


def _read_config_file(path: Path) -> dict[str, Any]:
    """A ``deepspeed.config_file``: a JSON object without the sections cclm builds itself (refused, naming the
    key to use instead); DeepSpeed's older ``bfloat16`` section is read as ``bf16``."""
    base = read_json(path)
    if not isinstance(base, dict):
        raise ConfigError(f"deepspeed.config_file: {path} holds {json_kind(base)}, not a JSON object")
    ours = [f"'{key}' (set {where})" for key, where in BUILT_BY_CCLM.items() if key in base]
    if ours:
        raise ConfigError(
            f"deepspeed.config_file: {path} sets {' and '.join(ours)}: cclm builds the optimizer and schedule "
            "itself and DeepSpeed would ignore the file's; remove the section"
        )
    for section in ("bf16", "bfloat16", "fp16", "zero_optimization"):
        if section in base and not isinstance(base[section], dict):
            raise ConfigError(
                f"deepspeed.config_file: {path}: '{section}' holds {json_kind(base[section])}, not an object"
            )
    if "bfloat16" in base:
        base["bf16"] = {**base.pop("bfloat16"), **base.get("bf16", {})}
    return base


def configured_precision(ds_cfg: DeepSpeedConfig, base: dict[str, Any] | None = None) -> Precision:
    """``deepspeed.precision``, else the one of ``deepspeed.config_file`` (its ``bf16``/``fp16`` section, fp32
    without), else ``auto`` (bf16 on a GPU that has it). ``base``: the file, when already read."""
    if ds_cfg.precision is not None:
        return Precision(ds_cfg.precision)
    if not ds_cfg.config_file:
        return Precision.auto
    if base is None:
        path = Path(ds_cfg.config_file)
        if not path.exists():
            raise ConfigError(f"deepspeed.config_file: {path} does not exist")
        base = _read_config_file(path)
    return _file_precision(base)


def _file_precision(base: dict[str, Any]) -> Precision:
    if base.get("bf16", {}).get("enabled"):
        return Precision.bf16
    if base.get("fp16", {}).get("enabled"):
        return Precision.fp16
    return Precision.fp32


def zero_stage(config: dict[str, Any]) -> int:
    return int(config["zero_optimization"]["stage"])


def offloads_optimizer(config: dict[str, Any]) -> bool:
    offload = config["zero_optimization"].get("offload_optimizer")
    return isinstance(offload, dict) and offload.get("device", "cpu") not in (None, "none")


def build_engine(
    model,
    *,
    env: DistEnv,
    optimizer_cfg: OptimizerConfig,
    scheduler_cfg: SchedulerConfig,
    deepspeed_cfg: DeepSpeedConfig,
    micro_batch: int,
    max_steps: int,
    grad_accum: int = 1,
    grad_clip: float = 1.0,
    lr_mults: Mapping[str, float] | None = None,
    effective_step: Callable[[int], float] | None = None,
    views_per_iteration: int = 1,
):
    """AdamW (:mod:`cclm.runtime.optim`; DeepSpeed's CPU Adam under ZeRO-Offload, :func:`offload_uses_cpu_adam`)
    + the schedule + ``deepspeed.initialize`` around ``model``, its tower
    layers compiled first when its config says ``compile: true`` (:mod:`cclm.runtime.compile`).

    ``optimizer_cfg``: ``lr``, ``weight_decay``, ``betas``, ``eps``, ``decay_rule`` (an
    :class:`OptimizerConfig`); ``scheduler_cfg``: a :class:`SchedulerConfig`; ``deepspeed_cfg``: a
    :class:`DeepSpeedConfig`.
    ``max_steps`` counts optimizer updates; ``views_per_iteration`` (updates per iteration, one per view) is
    what a schedule counting ``iterations`` divides them by (:func:`cclm.runtime.schedule.build_scheduler`).
    Returns (engine, optimizer, scheduler, the DeepSpeed JSON config)."""
    import deepspeed

    config = deepspeed_config(deepspeed_cfg, micro_batch, env.world_size, grad_accum, grad_clip, env.device)
    model.to(env.device)
    if wants_compile(model):
        if zero_stage(config) == 3:
            raise ConfigError(
                "model.compile: not with deepspeed.zero_stage=3 (its parameter gathering runs inside the layers "
                "and is untested under torch.compile); use zero_stage <= 2 or model.compile=false"
            )
        compile_towers(model)
    optimizer = build_optimizer(
        model,
        lr=float(optimizer_cfg.lr),
        weight_decay=float(optimizer_cfg.weight_decay),
        betas=tuple(optimizer_cfg.betas),
        eps=float(optimizer_cfg.eps),
        lr_mults=lr_mults,
        name=getattr(optimizer_cfg, "name", "adamw"),
        fused=env.device.type == "cuda" and not offloads_optimizer(config),
        decay_rule=getattr(optimizer_cfg, "decay_rule", DecayRule.shape),
        cpu_adam=offloads_optimizer(config) and offload_uses_cpu_adam(config, env),
    )
    scheduler = build_scheduler(optimizer, scheduler_cfg, max_steps, effective_step, views_per_iteration)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
    )
    return engine, optimizer, scheduler, config


def engine_keeps_grad_norm(engine) -> bool:
    """Whether ``engine.get_global_grad_norm()`` answers: DeepSpeed's ZeRO and half-precision optimizers keep the
    global gradient norm; under ZeRO-0 in fp32 the engine computes it only to clip, and drops it."""
    return bool(engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled())


def global_grad_norm(module: torch.nn.Module) -> torch.Tensor:
    """The 2-norm of every gradient of ``module``, as one tensor on their device (read it when logging: no host
    sync here). Under ZeRO-0 the gradients are whole and already averaged over ranks after the backward pass."""
    return torch.nn.utils.get_total_norm([p.grad for p in module.parameters() if p.grad is not None])


def full_parameters(engine):
    """A context in which every parameter of the engine's module is whole on every rank (ZeRO-3 partitions
    them; other stages need nothing): for evaluation during training. A collective: all ranks enter it."""
    if engine.zero_optimization_stage() != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
