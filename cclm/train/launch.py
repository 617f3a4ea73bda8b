"""Starting ``cclm pretrain`` on local processes from Python (the demo, tests, benchmarks). Cluster launches go
through the scripts in ``launch/``."""

from __future__ import annotations

import sys
from pathlib import Path

from cclm.runtime.env import free_port

PRETRAIN_CLI = ("-m", "cclm.train.cli")  # run in the child processes, not imported here


def local_torchrun_command(nproc: int, *args: str) -> list[str]:
    """``torchrun --nproc_per_node=N ARGS...`` (``-m MODULE ...``) on a free local port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        *args,
    ]


def local_pretrain_command(nproc: int, config: str | Path, overrides: list[str]) -> list[str]:
    """``torchrun --nproc_per_node=N -m cclm.train.cli CONFIG overrides...`` on a free local port."""
    return local_torchrun_command(nproc, *PRETRAIN_CLI, str(config), *overrides)
