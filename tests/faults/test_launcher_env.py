"""A tester's fault: `srun --ntasks=2 python -m cclm.train.cli ...` (or mpirun) without RANK made each task a world
of 1, training alone into the same output folder, without a word. Such a task is refused in one line; a single
process in a SLURM allocation (a batch script with --ntasks=4 has SLURM_NTASKS=4 but is no srun step) still
trains as rank 0 of 1."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ..pretrain_runs import REPO, quiet_env

SCRIPT = """
import cclm.runtime.env as env
from cclm.errors import UserError
try:
    joined = env.init_distributed("cpu")
except UserError as err:
    print("refused:", err)
else:
    print("joined", joined.rank, joined.world_size)
"""
LAUNCHER_VARIABLES = ("SLURM_", "OMPI_", "PMI_")


def init_distributed_under(**variables: str) -> str:
    env = {k: v for k, v in quiet_env().items() if not k.startswith(LAUNCHER_VARIABLES)}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=REPO,
        env={**env, **variables},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


SRUN_TASK = {  # what srun --ntasks=2 gives its second task (a batch job's variables included)
    "SLURM_JOB_ID": "77",
    "SLURM_NNODES": "1",
    "SLURM_NTASKS": "2",
    "SLURM_NPROCS": "2",
    "SLURM_STEP_ID": "0",
    "SLURM_STEP_NUM_TASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "1",
}


@pytest.mark.parametrize(
    "variables, named",
    [
        (SRUN_TASK, "one of 2 tasks that srun started (SLURM_STEP_NUM_TASKS=2)"),
        ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3"}, "one of 4 tasks that mpirun started"),
        ({"PMI_SIZE": "2", "PMI_RANK": "0"}, "one of 2 tasks that mpirun started (PMI_SIZE=2)"),
    ],
    ids=["srun", "openmpi", "mpich"],
)
def test_one_of_several_launched_tasks_without_rank_is_refused(variables, named):
    line = init_distributed_under(**variables)
    assert line.startswith("refused: this process is " + named), line
    assert "launch/slurm.sbatch" in line and "RANK" in line


# python in a batch script of a job with --ntasks=4: the batch step's single shell, no srun step
BATCH_SCRIPT = {"SLURM_JOB_ID": "77", "SLURM_NNODES": "1", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"}
ONE_TASK_STEP = {**SRUN_TASK, "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}


@pytest.mark.parametrize(
    "variables",
    [BATCH_SCRIPT, ONE_TASK_STEP, {"OMPI_COMM_WORLD_SIZE": "1", "PMI_SIZE": "1"}],
    ids=["batch-script", "srun-ntasks-1", "mpirun-np-1"],
)
def test_a_single_process_in_an_allocation_trains_alone(variables):
    assert init_distributed_under(**variables) == "joined 0 1"


def test_tasks_that_launch_slurm_sbatch_starts_join_one_group():
    """slurm.sbatch's srun tasks export RANK and LOCAL_RANK (the script WORLD_SIZE, MASTER_ADDR and MASTER_PORT)."""
    from cclm.runtime.env import free_port

    env = {k: v for k, v in quiet_env().items() if not k.startswith(LAUNCHER_VARIABLES)}
    env.update(SRUN_TASK, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    tasks = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT],
            cwd=REPO,
            env={**env, "SLURM_PROCID": str(rank), "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [task.communicate(timeout=120) for task in tasks]
    finally:
        for task in tasks:
            if task.poll() is None:
                task.kill()
    assert [out.strip().splitlines()[-1:] for out, _ in outputs] == [["joined 0 2"], ["joined 1 2"]], outputs


def test_evaluation_under_several_tasks_without_rank_is_refused_too(monkeypatch):
    """`cclm evaluate` joins a launcher's group only where WORLD_SIZE says so: without RANK, each srun task would
    score the whole set alone and write the same results file."""
    import torch

    from cclm.errors import UserError
    from cclm.runtime.env import join_launched_group

    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in SRUN_TASK.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match="one of 2 tasks that srun started"):
        join_launched_group(torch.device("cpu"))
