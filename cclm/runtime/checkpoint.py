"""Checkpoints: ``<output_dir>/checkpoints/step_<8-digit step>/`` holds

* the DeepSpeed engine state (model, optimizer, scheduler; ZeRO partitions per rank),
* ``rank<R>_state.json`` per rank: the data-stream state, the Python/NumPy/torch RNG states and the trainer's
  own state (e.g. the model selection of a fine-tuning run),
* ``model_fp32.safetensors`` + ``config.json``: the consolidated fp32 weights (gathered from every ZeRO stage at
  save time, so export needs no pickle and no ZeRO tooling) and the run's config,
* ``complete.json``, written last, after every rank finished. Only folders with it count as checkpoints, so a
  crash while writing never leaves a broken "latest". The last ``keep_last`` complete checkpoints are kept.
"""

from __future__ import annotations

import base64
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from cclm.runtime.env import barrier, dist_info

COMPLETE = "complete.json"
FP32_WEIGHTS = "model_fp32.safetensors"
CONFIG = "config.json"
TAG_RE = re.compile(r"^step_(\d{8})$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    root = checkpoint_root(output_dir)
    if not root.exists():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name) and (p / COMPLETE).exists()]
    return sorted(found, key=lambda p: int(TAG_RE.match(p.name).group(1)))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": base64.b64encode(repr(random.getstate()).encode()).decode(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "cuda": [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
        if torch.cuda.is_available()
        else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    import ast

    random.setstate(_tuplify(ast.literal_eval(base64.b64decode(state["python"]).decode())))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in state["cuda"]]
        )


def _tuplify(value):
    return tuple(_tuplify(v) for v in value) if isinstance(value, (list, tuple)) else value


def tied_aliases(module) -> set[str]:
    """State-dict names that alias an earlier tensor (e.g. an MLM decoder tied to the word embeddings): a
    consolidated state dict stores such a tensor once."""
    seen, aliases = set(), set()
    for name, tensor in module.state_dict(keep_vars=True).items():
        if tensor.data_ptr() in seen:
            aliases.add(name)
        seen.add(tensor.data_ptr())
    return aliases


def gather_fp32_state_dict(engine) -> dict[str, torch.Tensor]:
    """Full fp32 weights on every rank (a collective under ZeRO-3: all ranks must call it)."""
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)
        state[name] = (full if full is not None else param.detach()).float().cpu().clone()
    persistent = set(engine.module.state_dict().keys())
    for name, buf in engine.module.named_buffers():
        if name in persistent:
            state[name] = buf.detach().cpu().clone()
    return state


def save(
    engine,
    output_dir: str | Path,
    step: int,
    rank: int,
    run_config: dict,
    data_state: Any,
    keep_last: int,
    trainer_state: dict | None = None,
    extra_files: dict[str, Path] | None = None,
) -> Path:
    """Write a checkpoint (a collective: every rank calls it). ``extra_files`` (name -> file) are copied into
    the folder by rank 0, e.g. the best weights so far of a run that selects a model."""
    root = checkpoint_root(output_dir)
    tag = tag_for(step)
    path = root / tag
    if rank == 0 and path.exists():  # a leftover of a crash at this very step
        shutil.rmtree(path)
    barrier()
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    (path / f"rank{rank}_state.json").write_text(
        json.dumps({"step": step, "data": data_state, "rng": rng_state(), "trainer": trainer_state or {}})
    )
    weights = gather_fp32_state_dict(engine)
    if rank == 0:
        # named_parameters lists a tied tensor once (the MLM decoder shares the word embeddings).
        save_file({k: v.contiguous() for k, v in weights.items()}, str(path / FP32_WEIGHTS))
        (path / CONFIG).write_text(json.dumps(run_config, indent=2))
        for name, source in (extra_files or {}).items():
            shutil.copy2(source, path / name)
    barrier()
    if rank == 0:
        (path / COMPLETE).write_text(json.dumps({"step": step, "world_size": dist_info()[1]}))
        for old in complete_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return path


def load(engine, checkpoint: Path, rank: int) -> tuple[int, Any, dict]:
    """Restore engine and RNG state; returns (step, data_state, trainer_state)."""
    state_file = checkpoint / f"rank{rank}_state.json"
    if not state_file.exists():
        raise FileNotFoundError(
            f"{state_file} is missing: was {checkpoint} written with a different number of ranks?"
        )
    load_path, _ = engine.load_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {checkpoint}")
    state = json.loads(state_file.read_text())
    set_rng_state(state["rng"])
    return int(state["step"]), state["data"], state.get("trainer", {})
