"""Checkpoints: ``<output_dir>/checkpoints/step_<8-digit step>/`` holds

* the DeepSpeed engine state (model, optimizer, scheduler; ZeRO partitions per rank),
* ``rank<R>_state.json`` per rank: the data-stream state, the Python/NumPy/torch RNG states and the trainer's
  own state (e.g. the model selection of a fine-tuning run),
* ``model_fp32.safetensors`` + ``config.json``: the consolidated fp32 weights (gathered from every ZeRO stage at
  save time, so export needs no pickle and no ZeRO tooling) and the run's config,
* ``complete.json``, written last, after every rank finished: the step, the world size, the ZeRO stage and a
  sha256 manifest of every other file. Only folders with it count as checkpoints, so a crash while writing never
  leaves a broken "latest". The last ``keep_last`` complete checkpoints are kept.

Loading executes no code from the folder: the manifest is checked first (a truncated, altered or missing file
fails naming it), and DeepSpeed's ``*.pt`` files are unpickled with ``weights_only=True`` and an allow-list of
the few DeepSpeed classes they hold. ``resume=auto`` falls back to the previous checkpoint, with a warning,
when the newest fails its check.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from cclm.errors import CheckpointError
from cclm.runtime.env import barrier, dist_info
from cclm.runtime.rank_writes import (
    RankWrites,
    deferring_write_errors,
    is_write_failure,
    write_error_cause,
)
from cclm.weights_files import save_tensors

log = logging.getLogger("cclm.train")

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


def set_aside_newer(output_dir: str | Path, step: int) -> Path | None:
    """Move the checkpoints of steps after ``step`` (the one a run resumes from: an older explicit ``resume=``
    point, or the one before a newest that failed its check) into ``<output_dir>/abandoned-<time>/checkpoints``,
    with a copy of ``metrics.jsonl`` (whose later records the resumed run drops): never deleted, but no longer
    resumed from by ``resume=auto`` nor counted by keep-last rotation. Later folders without ``complete.json``
    (a save cut short) hold nothing usable and are removed. Returns the folder, or None when nothing was
    moved. Main rank only."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return None
    later = sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and TAG_RE.match(p.name) and int(TAG_RE.match(p.name).group(1)) > step
    )
    for partial in [p for p in later if not (p / COMPLETE).exists()]:
        shutil.rmtree(partial, ignore_errors=True)
        log.warning("removed %s: a checkpoint whose save never finished", partial)
    newer = [p for p in later if (p / COMPLETE).exists()]
    if not newer:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = Path(output_dir) / f"abandoned-{stamp}"
    suffix = 1
    while aside.exists():
        aside, suffix = Path(output_dir) / f"abandoned-{stamp}-{suffix}", suffix + 1
    (aside / "checkpoints").mkdir(parents=True)
    for folder in newer:
        folder.rename(aside / "checkpoints" / folder.name)
    metrics = Path(output_dir) / "metrics.jsonl"
    if metrics.exists():
        shutil.copy2(metrics, aside / metrics.name)
    log.warning(
        "resuming at step %d: the later checkpoint(s) %s were moved to %s (with a copy of metrics.jsonl); "
        "resume=auto and keep-last rotation no longer see them",
        step,
        ", ".join(folder.name for folder in newer),
        aside,
    )
    return aside


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
    the folder by rank 0, e.g. the best weights so far of a run that selects a model. A write that fails (a full
    disk, a lost mount) removes the partial folder and raises :class:`CheckpointError` naming it and the newest
    checkpoint that is intact; the run stops there and ``resume=auto`` continues from that one."""
    root = checkpoint_root(output_dir)
    tag = tag_for(step)
    path = root / tag
    if rank == 0 and path.exists():  # a leftover of a crash at this very step
        remove_checkpoint(path, ignore_errors=False)
    barrier()
    try:
        _write(engine, root, path, step, rank, run_config, data_state, trainer_state, extra_files)
    except (OSError, RuntimeError) as err:  # a write that failed outside the agreed ones (a one-rank run)
        if not is_write_failure(err):
            raise
        raise _write_failed(path, output_dir, write_error_cause(err)) from err
    barrier()
    if rank == 0:
        for old in complete_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
            remove_checkpoint(old)
    barrier()
    return path


def remove_checkpoint(path: Path, ignore_errors: bool = True) -> None:
    """Delete a checkpoint folder, ``complete.json`` first: a kill part-way leaves a folder that no longer counts
    as a checkpoint, not one that claims files it has lost."""
    (path / COMPLETE).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=ignore_errors)


def _write(engine, root, path, step, rank, run_config, data_state, trainer_state, extra_files) -> None:
    """Every rank's part of a save. A write that fails on one rank stops every rank with the same error, naming
    the rank (:mod:`cclm.runtime.rank_writes`): the ranks agree before ``complete.json`` and after it."""
    writes = RankWrites()
    with deferring_write_errors(engine, writes):
        engine.save_checkpoint(str(root), tag=path.name, save_latest=False)
    state = {"step": step, "data": data_state, "rng": rng_state(), "trainer": trainer_state or {}}
    writes.run((path / f"rank{rank}_state.json").write_text, json.dumps(state))
    weights = gather_fp32_state_dict(engine)  # a collective: also on a rank whose writes failed
    if rank == 0:
        # named_parameters lists a tied tensor once (the MLM decoder shares the word embeddings).
        writes.run(save_tensors, {k: v.contiguous() for k, v in weights.items()}, str(path / FP32_WEIGHTS))
        writes.run((path / CONFIG).write_text, json.dumps(run_config, indent=2))
        for name, source in (extra_files or {}).items():
            writes.run(shutil.copy2, source, path / name)
    _stop_on_failure(writes, path, root.parent)
    if rank == 0:
        record = {
            "step": step,
            "world_size": dist_info()[1],
            "zero_stage": int(engine.zero_optimization_stage()),
            "files": manifest(path),
        }
        writes.run(atomic_write, path / COMPLETE, json.dumps(record, indent=1))
    _stop_on_failure(writes, path, root.parent)


def _stop_on_failure(writes: RankWrites, path: Path, output_dir: Path) -> None:
    failure = writes.failure()  # a collective
    if failure is not None:
        barrier()  # every rank is done with the folder before any removes it
        raise _write_failed(path, output_dir, failure) from writes.error


def _write_failed(path: Path, output_dir: str | Path, cause: str) -> CheckpointError:
    """The partial folder removed (it frees what it took, and is never mistaken for a checkpoint); the error
    names the cause and the newest intact checkpoint."""
    shutil.rmtree(path, ignore_errors=True)
    return CheckpointError(
        f"checkpoint {path} could not be written ({cause}): the partial folder was removed; "
        f"{resume_hint(output_dir)}"
    )


def resume_hint(output_dir: str | Path) -> str:
    """What to do after a failed write: resume from the newest intact checkpoint, or start again. Both are
    ``resume=auto``: without a checkpoint it starts the run again from step 0 in the same folder (a plain rerun is
    refused: the failed run's config.json and metrics.jsonl are there)."""
    intact = latest_checkpoint(output_dir)
    if intact is None:
        return (
            "the run has no earlier checkpoint; free space (or fix the folder) and rerun with resume=auto, "
            "which starts it again from step 0"
        )
    return f"the newest intact checkpoint is {intact.name}; free space (or fix the folder) and rerun with resume=auto"


def one_line(err: BaseException) -> str:
    """``Type: message`` of an error from a library, its lines joined (PyTorch's state-dict errors span several)."""
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def load(engine, checkpoint: Path, rank: int) -> tuple[int, Any, dict]:
    """Restore engine and RNG state from a checkpoint that passed :func:`verify`; returns (step, data_state,
    trainer_state)."""
    state_file = checkpoint / f"rank{rank}_state.json"
    state = read_json(state_file)
    engine.checkpoint_engine = SafeCheckpointEngine(engine.checkpoint_engine)
    try:
        load_path, _ = engine.load_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    except CheckpointError:
        raise
    except Exception as err:  # DeepSpeed's own errors name no file
        raise CheckpointError(f"{checkpoint}: DeepSpeed could not load it ({one_line(err)})") from err
    if load_path is None:
        raise CheckpointError(f"{checkpoint}: DeepSpeed found no model states to load")
    set_rng_state(state["rng"])
    return int(state["step"]), state["data"], state.get("trainer", {})


# ------------------------------------------------------------------------------------------ integrity
def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` but ``complete.json``, by relative path."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE)
    return {p.relative_to(folder).as_posix(): sha256(p) for p in files}


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt ({err})") from None


def read_record(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's ``complete.json``."""
    record = read_json(checkpoint / COMPLETE)
    if not isinstance(record, dict) or "step" not in record:
        raise CheckpointError(f"{checkpoint / COMPLETE}: not a checkpoint record")
    return record


def check_world_size(checkpoint: Path, record: dict[str, Any], world_size: int) -> None:
    written_by = record.get("world_size")
    if written_by is not None and int(written_by) != world_size:
        raise CheckpointError(
            f"{checkpoint} was written by {written_by} ranks and this run has {world_size}: resume with "
            f"{written_by} ranks, or start a new run from its weights (cclm export)"
        )


def verify(checkpoint: Path, world_size: int | None = None, files: list[str] | None = None) -> dict[str, Any]:
    """Check ``complete.json``, the world size it was written with, and the sha256 of ``files`` (default: all
    in the manifest) before anything is loaded; raises :class:`CheckpointError` naming the first bad file."""
    record = read_record(checkpoint)
    if world_size is not None:
        check_world_size(checkpoint, record, world_size)
    expected = record.get("files")
    if expected is None:
        log.warning(
            "%s has no file manifest (written by an older cclm): its files are not checked", checkpoint
        )
        return record
    for name in files if files is not None else sorted(expected):
        path = checkpoint / name
        if name not in expected:
            raise CheckpointError(f"{path}: not listed in {checkpoint / COMPLETE}")
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        if sha256(path) != expected[name]:
            raise CheckpointError(f"{path}: corrupt or altered (sha256 differs from {COMPLETE})")
    return record


def _layout(stage: int) -> int:
    """ZeRO stages 1 and 2 write the same checkpoint layout (one can resume the other); 0 and 3 write their own."""
    return 1 if stage in (1, 2) else stage


def check_zero_stage(checkpoint: Path, stage: int) -> None:
    """Refuse, before anything is written, a checkpoint written under a ZeRO stage whose layout this run's stage
    cannot load (DeepSpeed fails on it with errors that name no stage). Checkpoints written before the stage was
    recorded are not checked."""
    written = read_record(checkpoint).get("zero_stage")
    if written is None or _layout(int(written)) == _layout(stage):
        return
    raise CheckpointError(
        f"{checkpoint} was written under ZeRO stage {written} and this run uses stage {stage}: resume with "
        f"deepspeed.zero_stage={written} (stages 1 and 2 can resume each other), or start a new run from its "
        "weights (cclm export)"
    )


def verify_on_all_ranks(checkpoint: Path) -> None:
    """:func:`verify` with the hashing split over the ranks; every rank raises if any rank found a bad file."""
    rank, world = dist_info()
    error = ""
    try:
        names = sorted(read_record(checkpoint).get("files") or {})
        verify(checkpoint, world_size=world, files=names[rank::world])
    except CheckpointError as err:
        error = str(err)
    _raise_if_any_rank(error)


def _raise_if_any_rank(error: str) -> None:
    """A collective: every rank raises the first rank's ``error`` (empty: none), so that no rank raises alone
    while the others wait in the next collective."""
    _, world = dist_info()
    if dist.is_initialized() and world > 1:
        errors: list[str] = [""] * world
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), "")
    if error:
        raise CheckpointError(error)


def _as_main_rank_lists(candidates: list[Path]) -> list[Path]:
    """Every rank tries the checkpoints rank 0 lists, in the same order: ranks that listed their own would call
    different collectives where a rank's view of the folder differs."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return candidates
    shared = [candidates]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def resume_target(output_dir: str | Path, resume: str | None) -> Path | None:
    """The checkpoint a run resumes from, verified: with ``"auto"`` the newest complete one that passes
    (a bad newer one is skipped with a warning naming its bad file), else the folder given, which must pass."""
    if not resume:
        return None
    if resume != "auto":
        target = Path(resume)
        rank, world = dist_info()
        seen_by = f", as rank {rank} sees it" if world > 1 else ""
        missing = not (target / COMPLETE).exists()  # a node that does not mount the folder, say
        _raise_if_any_rank(
            f"resume: {target} is not a complete checkpoint (no {COMPLETE}{seen_by})" if missing else ""
        )
        verify_on_all_ranks(target)
        return target
    candidates = _as_main_rank_lists(complete_checkpoints(output_dir))
    failures = []
    for candidate in reversed(candidates):
        try:
            record = read_record(candidate)
        except CheckpointError:
            record = {}  # verify_on_all_ranks names what is wrong with it
        # another world size is this run's setting, not damage: every earlier checkpoint would be refused alike
        check_world_size(candidate, record, dist_info()[1])
        try:
            verify_on_all_ranks(candidate)
            return candidate
        except CheckpointError as err:
            failures.append(str(err))
            if dist_info()[0] == 0:
                log.warning(
                    "resume=auto: skipping %s: %s; trying the previous checkpoint", candidate.name, err
                )
    if candidates:  # starting over would silently discard the run
        raise CheckpointError(
            f"resume=auto: no usable checkpoint in {checkpoint_root(output_dir)} ({len(candidates)} failed "
            f"their check; the newest: {failures[0]})"
        )
    return None


# --------------------------------------------------------------------------------------- safe loading
def _allowed_globals() -> list:
    """The classes DeepSpeed pickles into its checkpoints besides tensors and containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class SafeCheckpointEngine:
    """DeepSpeed's checkpoint engine with a loader that executes nothing: ``torch.load(weights_only=True)``
    with :func:`_allowed_globals`; everything else is delegated to the engine it wraps."""

    def __init__(self, inner):
        self._inner = inner.__dict__.get("_inner", inner)  # never wrap twice

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def load(self, path: str, map_location=None):
        try:
            with torch.serialization.safe_globals(_allowed_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(
                f"{path}: refused to load: it holds something other than tensors and DeepSpeed state ({first})"
            ) from None
        except FileNotFoundError:
            # every file the manifest lists was checked before: DeepSpeed looks for another stage's layout
            raise CheckpointError(
                f"{path}: missing: this run's ZeRO stage needs it, so the checkpoint was likely written under "
                "another stage (resume with its deepspeed.zero_stage)"
            ) from None
        except (RuntimeError, EOFError, OSError) as err:
            raise CheckpointError(f"{path}: corrupt ({one_line(err)})") from None


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
