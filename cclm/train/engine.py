"""Building the DeepSpeed engine: distributed init (gloo on CPU), parameter groups, optimizer, schedule, and the
DeepSpeed JSON config generated from the typed config."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from cclm.config import ConfigError
from cclm.train.launch import free_port
from cclm.train.schedule import lr_factor

OPTIMIZERS = ("adamw",)
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_distributed() -> DistInfo:
    """Initialise torch.distributed through DeepSpeed: NCCL on GPUs, gloo on CPU (without compiling DeepSpeed's
    shared-memory op, which takes ~25 s and is not needed for correctness). Works without a launcher too."""
    import importlib

    import deepspeed

    # importlib, not `import deepspeed.comm.torch as m`: deepspeed.comm re-exports the torch library under the
    # name `torch`, so attribute-style import would hand back torch itself.
    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")

    if "RANK" not in os.environ:  # plain `cclm pretrain` on one process
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    cuda = torch.cuda.is_available()
    if not cuda:
        ds_comm_torch.build_shm_op = lambda: None
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)


def _no_decay(name: str, param: torch.nn.Parameter) -> bool:
    return param.ndim < 2 or name == "temp" or name.endswith(("class_embedding", "positional_embedding"))


def param_groups(model, lr: float, weight_decay: float, new_param_lr_mult: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay for biases, norms and the temperature; ``new_param_lr_mult`` x lr for
    parameters the pretrained towers did not provide (cross-attention, projections, heads)."""
    new = set(model.new_parameter_names()) if hasattr(model, "new_parameter_names") else set()
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((_no_decay(name, param), name in new), []).append(param)
    out = []
    for (no_decay, is_new), params in sorted(groups.items()):
        mult = new_param_lr_mult if is_new else 1.0
        out.append(
            {
                "params": params,
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr": lr * mult,
                "lr_mult": mult,
            }
        )
    return out


def build_optimizer(model, opt_cfg) -> torch.optim.Optimizer:
    if opt_cfg.name not in OPTIMIZERS:
        raise ConfigError(
            f"train.optimizer.name: unknown optimizer '{opt_cfg.name}', expected one of {OPTIMIZERS}"
        )
    groups = param_groups(model, opt_cfg.lr, opt_cfg.weight_decay, opt_cfg.new_param_lr_mult)
    # A torch optimizer: DeepSpeed's fused Adam would JIT-compile for ~40 s and needs a compiler/GPU.
    return torch.optim.AdamW(groups, lr=opt_cfg.lr, betas=tuple(opt_cfg.betas), eps=opt_cfg.eps)


def build_scheduler(optimizer, train_cfg) -> torch.optim.lr_scheduler.LambdaLR:
    sched = train_cfg.scheduler
    factor = partial(
        lr_factor,
        max_steps=train_cfg.max_steps,
        warmup_steps=sched.warmup_steps,
        name=sched.name,
        min_lr_ratio=sched.min_lr_ratio,
    )
    factor(0)  # validates the name at start
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def deepspeed_config(cfg, micro_batch_size: int, world_size: int) -> dict[str, Any]:
    """DeepSpeed JSON from the typed config, over an optional user file; inconsistent batch sizes fail here."""
    ds_cfg, train = cfg.deepspeed, cfg.train
    base: dict[str, Any] = {}
    if ds_cfg.config_file:
        path = Path(ds_cfg.config_file)
        if not path.exists():
            raise ConfigError(f"deepspeed.config_file: {path} does not exist")
        base = json.loads(path.read_text())
    expected = micro_batch_size * train.grad_accum * world_size
    for key, value in (
        ("train_micro_batch_size_per_gpu", micro_batch_size),
        ("gradient_accumulation_steps", train.grad_accum),
        ("train_batch_size", expected),
    ):
        if key in base and base[key] not in (value, "auto"):
            raise ConfigError(
                f"batch size mismatch: {key}={base[key]} in {ds_cfg.config_file}, but micro-batch {micro_batch_size}"
                f" x grad_accum {train.grad_accum} x world size {world_size} gives {key}={value}"
            )
    zero = dict(base.get("zero_optimization", {}))
    stage = ds_cfg.zero_stage if ds_cfg.zero_stage is not None else int(zero.get("stage", 0))
    precision = ds_cfg.precision or _file_precision(base)
    if precision not in PRECISIONS:
        raise ConfigError(f"deepspeed.precision: '{precision}' is not one of {PRECISIONS}")
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
        gradient_accumulation_steps=train.grad_accum,
        train_batch_size=expected,
        gradient_clipping=train.grad_clip,
        zero_optimization=zero,
        bf16={"enabled": precision == "bf16"},
        fp16={**base.get("fp16", {}), "enabled": precision == "fp16"},
        steps_per_print=10**9,
        zero_allow_untested_optimizer=True,
        wall_clock_breakdown=False,
    )
    return config


def _file_precision(base: dict[str, Any]) -> str:
    if base.get("bf16", {}).get("enabled"):
        return "bf16"
    if base.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


def build_engine(model, cfg, micro_batch_size: int, world_size: int):
    """-> (engine, optimizer, scheduler); activation checkpointing is switched on in the model's stacks."""
    import deepspeed

    optimizer = build_optimizer(model, cfg.train.optimizer)
    scheduler = build_scheduler(optimizer, cfg.train)
    if cfg.train.activation_checkpointing:
        model.text.gradient_checkpointing = True
        model.fusion.gradient_checkpointing = True
        model.vision.visual.set_grad_checkpointing(True)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, micro_batch_size, world_size),
    )
    return engine, optimizer, scheduler
