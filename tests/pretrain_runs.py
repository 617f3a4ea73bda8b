"""Running ``cclm pretrain`` on a test world under torchrun, for the pretraining and fault-injection tests."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import psutil

from cclm.train.launch import local_pretrain_command

from .conftest import build_test_world

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "pretrain" / "demo.yaml"


def small_world(folder: Path) -> Path:
    """The demo world at test size: 96 training images, 16 held out, with its tokenizer."""
    return build_test_world(folder, num_images=96, image_size=32, heldout_images=16, xvnli_images=10, seed=3)


def shard_pattern(folder: Path) -> str:
    count = len(list(folder.glob("shard-*.tar")))
    return str(folder / f"shard-{{000000..{count - 1:06d}}}.tar")


def overrides(world: Path, output_dir: Path, **extra) -> list[str]:
    base = {
        "model.text.tokenizer": str(world / "tokenizer"),
        "data.image_caption.shards": shard_pattern(world / "image_caption"),
        "data.parallel_text.shards": shard_pattern(world / "parallel"),
        "data.image_caption.batch_size": 8,
        "data.parallel_text.batch_size": 8,
        "data.num_workers": 1,
        "output_dir": str(output_dir),
        "train.log_every": 1,
        "train.scheduler.warmup_steps": 2,
        "train.optimizer.lr": 2e-3,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def command(nproc: int, overrides: list[str]) -> list[str]:
    return local_pretrain_command(nproc, CONFIG, overrides)


# Set in this test process by in-process runs (init_distributed alone): a child must not try to join that group.
DISTRIBUTED_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def quiet_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_VARIABLES}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_pretrain(nproc: int, overrides: list[str], timeout: int = 400) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        command(nproc, overrides), cwd=REPO, env=quiet_env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------ runs a fault test interrupts
def start_pretrain(nproc: int, overrides: list[str], log: Path) -> subprocess.Popen:
    """A pretraining run in the background writing its output (stdout and stderr) to ``log`` (a file, not a
    pipe: nobody reads a pipe while the test waits, and a full one would stall the run)."""
    with log.open("w") as sink:
        return subprocess.Popen(
            command(nproc, overrides),
            cwd=REPO,
            env=quiet_env(),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_until(ready, launcher: subprocess.Popen, timeout: float = 300, poll: float = 0.05) -> None:
    """Poll ``ready()`` while the run is alive; fail if the run ends or the time runs out first."""
    deadline = time.time() + timeout
    while not ready():
        assert launcher.poll() is None, "the run ended before the awaited moment"
        assert time.time() < deadline, "timed out waiting for the run"
        time.sleep(poll)


def logged_steps(output_dir: Path) -> int:
    path = output_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def training_processes(launcher: subprocess.Popen) -> dict[int, psutil.Process]:
    """The training processes under a launcher, by rank (they may sit in process sessions of their own), not
    their DataLoader workers (which share their command line and environment)."""

    def trains(proc: psutil.Process) -> bool:  # the launcher's command line names the module too
        line = " ".join(proc.cmdline())
        return "cclm.train.cli" in line and "torch.distributed.run" not in line

    ranks = {}
    for proc in psutil.Process(launcher.pid).children(recursive=True):
        if trains(proc) and not trains(proc.parent()):
            ranks[int(proc.environ()["RANK"])] = proc
    return ranks
