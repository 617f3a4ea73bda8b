"""Starting ``cclm pretrain`` on local processes from Python (the demo, tests, benchmarks). Cluster launches go
through the scripts in ``launch/``."""

from __future__ import annotations

import socket
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_pretrain_command(nproc: int, config: str | Path, overrides: list[str]) -> list[str]:
    """``torchrun --nproc_per_node=N -m cclm.train.cli CONFIG overrides...`` on a free local port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        "-m",
        "cclm.train.cli",
        str(config),
        *overrides,
    ]
