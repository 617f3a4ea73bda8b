"""The worker of tests/test_real_weights.py's two-process check of :func:`cclm.runtime.env.local_main_first`, in
a module of its own so that the spawned processes import only what it needs."""

from __future__ import annotations

import contextlib
import os
import time

import torch.distributed as dist

from cclm.runtime.env import local_main_first


def ordered_worker(rank: int, store: str, log: str) -> None:
    """Two blocks: in the first rank 0 "downloads" for half a second; in the second it fails doing so."""
    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        for block, rank_zero_fails in enumerate((False, True)):
            with contextlib.suppress(OSError), local_main_first():
                with open(log, "a") as f:
                    f.write(f"{block} start {rank}\n")
                if rank == 0:
                    time.sleep(0.5)
                    if rank_zero_fails:
                        raise OSError("no network")
                with open(log, "a") as f:
                    f.write(f"{block} end {rank}\n")
            dist.barrier()  # the blocks' lines apart in the log
    finally:
        dist.destroy_process_group()
