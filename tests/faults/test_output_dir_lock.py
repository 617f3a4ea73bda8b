"""One live run per output folder, seen by every rank (docs/reliability.md): a second job into a folder another
job holds is refused naming the holder and writes nothing; a killed holder leaves no stale lock; a checkpoint
another job wrote while this run was starting is not silently passed over; node-local output folders are refused
at the start, not found out at the first resume; a stop signal during the last step finishes the run normally."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

import cclm.runtime.trainer as trainer_module
from cclm.errors import UserError
from cclm.runtime import checkpoint
from cclm.runtime.output_dir import INTERRUPTED
from cclm.runtime.run_lock import LOCK_FILE

from ..pretrain_runs import REPO, command, overrides, quiet_env, small_world
from .test_output_dir import snapshot
from .toy_run import toy_trainer, trained

# Another job: holds the folder's lock as a run's main rank does, prints READY, then sleeps.
HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from cclm.runtime.run_lock import hold_output_dir
    lock = hold_output_dir(Path(sys.argv[1]), True, lambda: None)
    print("READY", flush=True)
    time.sleep(600)
    """
)


@pytest.fixture
def other_job(tmp_path):
    """Start a process holding a folder's lock; yields a function (folder -> process)."""
    started: list[subprocess.Popen] = []

    def hold(folder: Path) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True
        )
        started.append(proc)
        assert proc.stdout.readline().strip() == "READY"
        return proc

    yield hold
    for proc in started:
        proc.kill()
        proc.wait()


def test_a_second_job_into_a_folder_a_running_job_holds_is_refused_naming_it_and_writes_nothing(
    tmp_path, other_job
):
    run = trained(tmp_path / "run", steps=4, save_every=2)
    holder = other_job(run)
    before = snapshot(run)
    with pytest.raises(UserError) as refused:  # what launch/slurm.sbatch gives every job: resume=auto
        toy_trainer(run, steps=8, save_every=2, resume="auto")
    message = str(refused.value)
    assert f"output_dir={run} is in use by a running job (pid {holder.pid} on " in message, message
    assert "\n" not in message
    assert snapshot(run) == before, "nothing of the running job's folder was touched"


def test_a_fresh_run_into_a_new_folder_another_job_just_claimed_is_refused(tmp_path, other_job):
    other_job(tmp_path / "new")
    with pytest.raises(UserError, match="is in use by a running job"):
        toy_trainer(tmp_path / "new", steps=4)
    assert not (tmp_path / "new" / "metrics.jsonl").exists()


def test_overwrite_does_not_move_a_running_jobs_folder_aside(tmp_path, other_job):
    run = trained(tmp_path / "run", steps=4, save_every=2)
    other_job(run)
    with pytest.raises(UserError, match="is in use by a running job"):
        toy_trainer(run, steps=4, overwrite=True)
    assert not list(tmp_path.glob("run.old-*")), "the live run stays where its job writes"


def test_a_killed_job_leaves_no_stale_lock(tmp_path, other_job):
    run = trained(tmp_path / "run", steps=4, save_every=2)
    holder = other_job(run)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    trainer = toy_trainer(run, steps=6, save_every=2, resume="auto")
    assert trainer.step == 4
    trainer.run()
    trainer.close()
    holder_record = json.loads((run / LOCK_FILE).read_text())
    assert holder_record["pid"] == os.getpid(), "the lock file names its last holder"


def test_stages_of_one_process_share_its_lock_and_release_it(tmp_path):
    first = toy_trainer(tmp_path / "run", steps=2, save_every=2)
    first.run()
    second = toy_trainer(
        tmp_path / "run", steps=4, save_every=2, resume="auto"
    )  # one process: not a second job
    first.close()
    second.run()
    second.close()
    probe = subprocess.run(
        [sys.executable, "-c", HOLDER.replace("time.sleep(600)", ""), str(tmp_path / "run")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert probe.returncode == 0 and "READY" in probe.stdout, probe.stderr


def test_a_file_system_without_locks_is_warned_about_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl
    import logging

    from cclm.runtime import run_lock

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    # only the lock module's flock fails (an NFS mount without lock support)
    no_lock_fcntl = SimpleNamespace(
        flock=no_locks, LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB, LOCK_UN=fcntl.LOCK_UN
    )
    monkeypatch.setattr(run_lock, "fcntl", no_lock_fcntl)
    with caplog.at_level(logging.WARNING):
        trainer = toy_trainer(tmp_path / "run", steps=4, save_every=2)
        trainer.run()
        trainer.close()
    assert f"{tmp_path / 'run' / LOCK_FILE} cannot be locked (No locks available)" in caplog.text
    assert checkpoint.latest_checkpoint(tmp_path / "run").name == "step_00000004"
    assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_checkpoint_written_by_another_job_while_this_run_started_is_not_passed_over(tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_build = trainer_module.build_engine
    raced = []

    def build_while_another_job_trains(*args, **kwargs):
        if not raced:  # the other job starts, trains and saves while this one builds its engine
            raced.append(True)
            trained(run, steps=2, save_every=2)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "build_engine", build_while_another_job_trains)
    with pytest.raises(UserError) as refused:
        toy_trainer(run, steps=4, save_every=2, resume="auto")
    assert "another job wrote step_00000002 while this run was starting (from nothing)" in str(refused.value)
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_stop_signal_during_the_last_step_finishes_the_run_without_a_requeue_marker(tmp_path, monkeypatch):
    real_step = trainer_module.Trainer.train_step

    def step_signalled_at_the_end(self, stats):
        if self.step == self.loop.max_steps - 1:  # SLURM's --signal=USR1@600 landing in the last step
            os.kill(os.getpid(), signal.SIGUSR1)
        real_step(self, stats)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", step_signalled_at_the_end)
    trainer = toy_trainer(tmp_path / "run", steps=4, save_every=2)
    trainer.run()  # no RunInterrupted: launch/slurm.sbatch requeues a job that leaves interrupted.json
    trainer.close()
    assert not (tmp_path / "run" / INTERRUPTED).exists()
    assert checkpoint.latest_checkpoint(tmp_path / "run").name == "step_00000004"


# Each training process works in its own "node" folder, so a relative output_dir is a different disk per rank, as
# /local/scratch/run is on several nodes.
NODE_LOCAL = textwrap.dedent(
    """
    import os
    if "RANK" in os.environ and "LOCAL_RANK" in os.environ:
        node = os.path.join(os.environ["NODE_LOCAL_ROOT"], "node" + os.environ["RANK"])
        os.makedirs(node, exist_ok=True)
        os.chdir(node)
    """
)


def test_a_node_local_output_dir_is_refused_at_the_start_in_one_line(tmp_path):
    world = small_world(tmp_path / "world")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NODE_LOCAL)
    env = quiet_env()
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO), env.get("PYTHONPATH", "")])
    env["NODE_LOCAL_ROOT"] = str(tmp_path / "nodes")
    options = {"train.max_steps": 4, "train.save_every": 2, "train.collective_timeout_s": 60}
    proc = subprocess.run(
        command(2, overrides(world, Path("run"), **options)),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "output_dir=run is not one folder shared by every rank: rank(s) 1 (" in output, output[-3000:]
    assert "node-local disks?" in output
    assert not (tmp_path / "nodes" / "node0" / "run" / "checkpoints").exists(), "refused before training"


def test_a_recipe_holds_its_stage_folders_until_its_last_write_then_lets_them_go(tmp_path, monkeypatch):
    """A recipe writes its results into a stage's folder after the stage's trainer is done: the folder stays
    locked until then (another job cannot take it in between), and is let go when the recipe returns. Before,
    the lock went whenever the garbage collector reached the stage's trainer (a reference cycle): possibly in
    between, possibly long after the recipe had returned."""
    import gc

    from cclm.config import MLARecipeConfig, load_config
    from cclm.recipes import english_clip
    from cclm.runtime import run_lock

    from ..conftest import build_test_world

    world = build_test_world(tmp_path / "world", 300, num_images=40, image_size=32, heldout_images=10)
    out = tmp_path / "out"
    lock_file = out / "english_clip" / LOCK_FILE
    take = "import fcntl, sys; fcntl.flock(open(sys.argv[1], 'a'), fcntl.LOCK_EX | fcntl.LOCK_NB)"

    def another_job_can_lock() -> bool:
        return (
            subprocess.run([sys.executable, "-c", take, str(lock_file)], capture_output=True).returncode == 0
        )

    during = []
    retrieval = english_clip.english_retrieval

    def retrieval_after_the_stage(*args, **kwargs):  # after the stage, before the recipe's own writes
        gc.collect()  # the stage's trainer collected: its lock object is gone
        during.append(another_job_can_lock())
        return retrieval(*args, **kwargs)

    monkeypatch.setattr(english_clip, "english_retrieval", retrieval_after_the_stage)
    overrides = [f"world={world}", f"clip.pretrained={out / 'clip.safetensors'}", f"output_dir={out}"]
    cfg = load_config(
        MLARecipeConfig, REPO / "configs" / "recipes" / "mla_demo.yaml", [*overrides, "english_clip.steps=2"]
    )
    gc.disable()  # what a collection that has not come yet looks like
    try:  # the Python API (docs/recipes.md), as `cclm recipe english-clip` calls it
        english_clip.run_english_clip(cfg)
        assert _lock_key(out / "english_clip") not in run_lock._held
    finally:
        gc.enable()
    assert during == [False]
    assert another_job_can_lock()


def _lock_key(folder: Path) -> tuple[int, int]:
    """How this process's lock registry names the folder's lock (other tests' runs may hold others)."""
    stat = (folder / LOCK_FILE).stat()
    return stat.st_dev, stat.st_ino


def _another_job_can_lock(folder: Path) -> bool:
    take = "import fcntl, sys; fcntl.flock(open(sys.argv[1], 'a'), fcntl.LOCK_EX | fcntl.LOCK_NB)"
    return (
        subprocess.run([sys.executable, "-c", take, str(folder / LOCK_FILE)], capture_output=True).returncode
        == 0
    )


def test_a_lock_object_outliving_its_recipe_releases_nothing_of_a_later_run(tmp_path):
    """A trainer's lock object that the garbage collector reaches after its recipe let the folder go must not
    let go of the folder again when a later run in this process holds it; a lock held before a recipe began
    stays held after it."""
    from cclm.runtime import run_lock

    stage, before = tmp_path / "stage", tmp_path / "before"
    earlier = run_lock._acquire(before)
    with run_lock.held_until_exit():
        stale = run_lock._acquire(stage)  # never released by its owner
        shared = run_lock._acquire(before)
        shared.release()
    assert _another_job_can_lock(stage) and not _another_job_can_lock(before)
    later = run_lock._acquire(stage)
    stale.release()  # collected now
    assert not _another_job_can_lock(stage)
    later.release()
    earlier.release()
    assert _another_job_can_lock(stage) and _another_job_can_lock(before)
    assert _lock_key(stage) not in run_lock._held and _lock_key(before) not in run_lock._held
