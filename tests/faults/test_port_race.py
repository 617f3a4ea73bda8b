"""A process training alone picks its own rendezvous port; when another process takes that port between the
probe and the bind, it picks another instead of failing (a port held on another address counts as taken). Two
launch/torchrun.sh jobs on one node without MASTER_PORT each get a port of their own (both took 29500, and the
second died with EADDRINUSE)."""

from __future__ import annotations

import subprocess
import sys
import time

from ..pretrain_runs import REPO, quiet_env
from .test_launch_scripts import BASH, LAUNCH, make_machine, stand_in

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


WORKER = """
import pathlib, sys, time
import torch.distributed as dist
folder, job = pathlib.Path(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo")
dist.barrier()
(folder / f"joined-{job}").write_text("")
while not (folder / "release").exists():
    time.sleep(0.1)
dist.destroy_process_group()
"""


def test_two_torchrun_jobs_on_one_node_do_not_collide_on_a_port(tmp_path):
    machine = make_machine(tmp_path)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    # the real torchrun with the script's options, running the worker instead of cclm
    stand_in(
        machine.fake,
        "torchrun",
        'args=()\nfor a in "$@"; do [[ "$a" == -m ]] && break; args+=("$a"); done\n'
        f'exec {sys.executable} -m torch.distributed.run "${{args[@]}}" {worker} {tmp_path} "$JOB"\n',
    )
    jobs = {}
    try:
        for job in ("a", "b"):  # the second starts while the first holds its rendezvous
            jobs[job] = subprocess.Popen(
                [BASH, str(LAUNCH / "torchrun.sh"), "c.yaml"],
                cwd=REPO,
                env={**machine.env, "NPROC": "1", "JOB": job},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            deadline = time.monotonic() + 60
            while not (tmp_path / f"joined-{job}").exists():
                if jobs[job].poll() is not None or time.monotonic() > deadline:
                    jobs[job].kill()
                    raise AssertionError(f"job {job} did not start: {jobs[job].communicate()[1][-3000:]}")
                time.sleep(0.1)
        (tmp_path / "release").write_text("")
        for job, proc in jobs.items():
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, f"job {job}: {err[-3000:]}"
    finally:
        (tmp_path / "release").write_text("")
        for proc in jobs.values():
            if proc.poll() is None:
                proc.kill()
