"""A process training alone picks its own rendezvous port; when another process takes that port between the
probe and the bind, it picks another instead of failing (a port held on another address counts as taken)."""

from __future__ import annotations

import subprocess
import sys

from ..pretrain_runs import REPO, quiet_env

SCRIPT = """
import socket
import cclm.runtime.env as env

taken = socket.socket()
taken.bind(("", 0))
taken.listen()
port = taken.getsockname()[1]
probes = iter([port])
real_free_port = env.free_port
env.free_port = lambda: next(probes, None) or real_free_port()
joined = env.init_distributed("cpu")
import os
assert joined.world_size == 1 and int(os.environ["MASTER_PORT"]) != port, os.environ["MASTER_PORT"]
print("joined on another port")
"""


def test_a_taken_rendezvous_port_is_replaced_when_training_alone():
    env = {
        k: v for k, v in quiet_env().items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR")
    }
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "joined on another port" in proc.stdout
