"""Where a process runs: distributed init (torchrun, the deepspeed launcher, srun, or none), rank and world, the
device, one precision vocabulary, seeding, and moving a batch to the device."""

from __future__ import annotations

import contextlib
import importlib
import os
import random
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from cclm.config import Precision
from cclm.errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port free on every address (the rendezvous store listens on all of them)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


NODE_INDEX_VARIABLES = ("GROUP_RANK", "CROSS_RANK", "SLURM_NODEID")  # torchrun, the deepspeed launcher, srun


def node_name() -> str:
    """This process's node: its host name, followed by the launcher's node index where the launcher sets one
    (containers on different nodes may share a host name, and ranks grouped by host name alone would then be
    taken for one node)."""
    host = socket.gethostname()
    for variable in NODE_INDEX_VARIABLES:
        index = os.environ.get(variable, "").strip()
        if index:
            return f"{host}#node{index}"
    return host


DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None): this process's GPU (``cuda:LOCAL_RANK``) when there is one, else the CPU. ``cuda``
    without an index is this process's GPU too. A device this machine does not have, or a name that is no
    device, is a :class:`UserError` naming the choices."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(str(name).strip().lower())
    except RuntimeError:
        raise UserError(f"unknown device '{name}': use {DEVICE_CHOICES}") from None
    if device.type == "cpu":
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"device '{name}': this machine has no MPS device; use {DEVICE_CHOICES}")
        return device
    if device.type != "cuda":
        raise UserError(f"device '{name}' is not supported: use {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        why = "this torch was built without CUDA" if torch.version.cuda is None else "no GPU is visible"
        raise UserError(f"device '{name}': no CUDA device is available ({why}); use auto or cpu")
    index = local_rank() if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise UserError(
            f"device '{name}': this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0"
        )
    return torch.device("cuda", index)


def _join_group(device: torch.device, timeout_s: float | None = None) -> None:
    """Join the process group through DeepSpeed: NCCL on GPUs, gloo on CPU (without compiling DeepSpeed's
    shared-memory op, which takes ~25 s and is not needed for correctness)."""
    import deepspeed

    # importlib, not `import deepspeed.comm.torch as m`: deepspeed.comm re-exports the torch library under the
    # name `torch`, so attribute-style import would hand back torch itself.
    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")
    if device.type != "cuda":
        ds_comm_torch.build_shm_op = lambda: None
    else:
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if timeout_s is None:
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    else:
        deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timedelta(seconds=timeout_s))


# Set in every process of a launch step by launchers that start each process themselves and leave RANK unset:
# srun sets SLURM_STEP_NUM_TASKS per step (unlike SLURM_NTASKS, which a batch script's single shell has too),
# OpenMPI's mpirun OMPI_COMM_WORLD_SIZE, MPICH's and Intel MPI's PMI_SIZE.
STEP_TASK_COUNTS = {"SLURM_STEP_NUM_TASKS": "srun", "OMPI_COMM_WORLD_SIZE": "mpirun", "PMI_SIZE": "mpirun"}


def check_not_one_of_several_tasks() -> None:
    """A process without ``RANK`` that a launcher started as one of several tasks would train alone, as would
    each of the others, into the same output folder: refused."""
    for name, launcher in STEP_TASK_COUNTS.items():
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 1:
            raise UserError(
                f"this process is one of {value} tasks that {launcher} started ({name}={value}), but RANK and "
                "WORLD_SIZE are not set, so each task would train alone: start the job with launch/slurm.sbatch "
                "or launch/torchrun.sh, or set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in "
                "every task"
            )


def init_distributed(device: str | torch.device | None = "auto", timeout_s: float | None = None) -> DistEnv:
    """Join (or create) the process group and describe this process. Works under any launcher and alone: a
    plain single process becomes rank 0 of 1 (DeepSpeed needs a group even then); one of several tasks of an
    srun or mpirun step without ``RANK`` is refused. ``timeout_s``: the collectives' timeout (a training run's
    watchdog speaks first: the group waits a minute longer)."""
    alone = "RANK" not in os.environ
    if alone:
        check_not_one_of_several_tasks()
    our_port = alone and "MASTER_PORT" not in os.environ
    if alone:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    device = resolve_device(device)
    timeout = None if timeout_s is None else float(timeout_s) + 60.0
    for attempt in range(3):
        if dist.is_initialized():
            break
        try:
            _join_group(device, timeout)
        except dist.DistNetworkError as err:
            # Alone, the port is ours to choose: another process may have taken it between the probe and the
            # store's bind. Under a launcher the port is the launcher's, and the error is the user's to see.
            if not our_port or "EADDRINUSE" not in str(err) or attempt == 2:
                raise
            os.environ["MASTER_PORT"] = str(free_port())
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank(), device)


def join_launched_group(device: torch.device) -> bool:
    """Join the process group only when a launcher started several processes (evaluation, inference); returns
    whether this call created it (and so should :func:`leave_group` afterwards). One of several srun or mpirun
    tasks without ``RANK`` is refused: each would score the whole set alone and write the same results."""
    if "RANK" not in os.environ:
        check_not_one_of_several_tasks()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    _join_group(device)
    return True


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def current_env(device: str | torch.device | None = "auto") -> DistEnv:
    """This process as it stands (no initialisation)."""
    rank, world = dist_info()
    return DistEnv(rank, world, local_rank(), resolve_device(device))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def local_main_first():
    """Run the block on each node's local rank 0 first, then on that node's other ranks: pretrained weights are
    downloaded once per node into the node's cache (``HF_HOME``), not by every rank at once, and the other ranks
    read them from there. Outside a process group the block just runs.

    A collective: every rank enters it. Local rank 0 reaches the barrier even when its block fails, so the
    others are released (and usually fail the same way, with the same message) instead of hanging."""
    together = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    first = local_rank() == 0
    if together and not first:
        dist.barrier()
    try:
        yield
    finally:
        if together and first:
            dist.barrier()


# ------------------------------------------------------------------------------------------------ precision
def uses_bf16(device: torch.device, precision: str | Precision = Precision.auto) -> bool:
    """``auto``: bf16 on a GPU that supports it, fp32 elsewhere (bf16 matmuls are slow on most CPUs)."""
    precision = Precision(precision)
    if precision == Precision.auto:
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return precision == Precision.bf16


def resolve_precision(device: torch.device, precision: str | Precision = Precision.auto) -> Precision:
    """``auto`` made concrete for ``device``: bf16 or fp32."""
    precision = Precision(precision)
    if precision != Precision.auto:
        return precision
    return Precision.bf16 if uses_bf16(device, precision) else Precision.fp32


def compute_dtype(device: torch.device, precision: str | Precision = Precision.auto) -> torch.dtype:
    return {
        Precision.fp32: torch.float32,
        Precision.bf16: torch.bfloat16,
        Precision.fp16: torch.float16,
    }[resolve_precision(device, precision)]


def autocast(device: torch.device, precision: str | Precision = Precision.auto):
    """Autocast to the half type of ``precision`` on ``device``; a no-op context for fp32."""
    dtype = compute_dtype(device, precision)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ------------------------------------------------------------------------------------------------- seeding
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors of a batch moved to ``device``; other values (texts, language codes) as they are.

    To a GPU the copies are asynchronous: the host queues them and goes on to queue the step. That needs
    page-locked host memory (pageable memory is copied synchronously whatever ``non_blocking`` says): a
    DataLoader with ``pin_memory`` delivers it from its own thread; other host tensors are staged into it here,
    from torch's caching pinned allocator, which keeps each buffer until its copy has run."""
    if device.type != "cuda":
        return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    return {
        k: _pinned(v).to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
    }


def _pinned(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.device.type != "cpu" or tensor.is_pinned():
        return tensor
    return tensor.pin_memory()
