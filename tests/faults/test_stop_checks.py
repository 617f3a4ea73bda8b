"""SIGUSR1 is acted on within about ``stop_check_s`` seconds even when log steps are far apart (SLURM sends it a
fixed time before the limit, and ``log_every`` slow steps can outlast that), while fast steps still agree on
stopping only at log steps (one host sync per interval). Toy runs on the real trainer, one rank."""

from __future__ import annotations

import errno
import json
import os
import signal
import time

import pytest

from cclm.errors import RunInterrupted, UserError
from cclm.runtime import checkpoint
from cclm.runtime import trainer as trainer_module
from cclm.runtime.stop_checks import StopCheckSchedule

from .toy_run import toy_trainer


def test_the_schedule_checks_every_stop_check_s_in_steps_between_1_and_log_every():
    checks = StopCheckSchedule(log_every=100, start_step=0, every_s=1.0)
    assert checks.next_step == 1 and checks.due(1)  # the first check follows the first step
    checks.checked(1, slowest_seconds=0.05)  # 0.05 s a step: a check every 20 steps
    assert checks.next_step == 21 and not checks.due(20) and checks.due(21)
    checks.checked(21, slowest_seconds=20 * 2.0)  # 2 s a step: every step
    assert checks.next_step == 22
    checks.checked(22, slowest_seconds=1e-6)  # very fast: at most log_every apart, and log steps always
    assert checks.next_step == 122 and checks.due(100) and not checks.due(101)
    resumed = StopCheckSchedule(log_every=100, start_step=500, every_s=1.0)
    assert resumed.next_step == 501


def test_sigusr1_stops_a_slow_run_long_before_its_next_log_step(tmp_path, monkeypatch):
    real_step = trainer_module.Trainer.train_step

    def slow_step(self, stats):
        time.sleep(0.02)
        real_step(self, stats)
        if self.step == 10:
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", slow_step)
    trainer = toy_trainer(
        tmp_path / "run", steps=300, save_every=0, loop_options={"log_every": 1000, "stop_check_s": 0.2}
    )
    with pytest.raises(RunInterrupted):
        trainer.run()
    trainer.close()
    record = json.loads((tmp_path / "run" / "interrupted.json").read_text())
    # ~10 steps of 0.02 s make 0.2 s; scheduling noise on a busy machine only brings the check earlier
    assert 10 <= record["step"] <= 25, record
    assert record["checkpoint"].endswith(f"step_{record['step']:08d}")


def test_fast_steps_agree_on_stopping_only_at_the_first_step_and_at_log_steps(tmp_path, monkeypatch):
    checked_at = []
    real = trainer_module.Trainer._stop_requests

    def spy(self, checks):
        checked_at.append(self.step)
        return real(self, checks)

    monkeypatch.setattr(trainer_module.Trainer, "_stop_requests", spy)
    trainer = toy_trainer(tmp_path / "run", steps=60, save_every=0, loop_options={"log_every": 20})
    trainer.run()
    trainer.close()
    assert checked_at == [1, 20, 40, 60]


def test_a_stop_between_log_steps_leaves_the_logged_records_of_the_uninterrupted_run(tmp_path, monkeypatch):
    """log_every=4 and a stop after step 6: nothing is logged at the stop, the checkpoint keeps steps 5-6's loss
    sums, and the resumed run's record at step 8 averages steps 5-8 as the uninterrupted run's does."""
    straight = toy_trainer(tmp_path / "straight", steps=12, save_every=0, loop_options={"log_every": 4})
    straight.run()
    straight.close()

    real_step = trainer_module.Trainer.train_step

    def signal_after_6(self, stats):
        real_step(self, stats)
        if self.step == 6:
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", signal_after_6)
    options = {"log_every": 4, "stop_check_s": 1e-9}  # a check after every step
    stopped = toy_trainer(tmp_path / "run", steps=12, save_every=0, loop_options=options)
    with pytest.raises(RunInterrupted):
        stopped.run()
    stopped.close()
    assert json.loads((tmp_path / "run" / "interrupted.json").read_text())["step"] == 6
    monkeypatch.undo()
    resumed = toy_trainer(tmp_path / "run", steps=12, save_every=0, loop_options=options, resume="auto")
    resumed.run()
    resumed.close()

    def records(folder):
        return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]

    got, want = records(tmp_path / "run"), records(tmp_path / "straight")
    assert [r["step"] for r in got] == [r["step"] for r in want] == [4, 8, 12]
    for a, b in zip(got, want):
        assert a["loss"] == b["loss"], a["step"]  # bit-exact: the sums are float64 and restored exactly


def test_a_stop_whose_marker_cannot_be_written_says_so_in_one_line(tmp_path, monkeypatch):
    """A full disk right after the stop checkpoint: before, an OSError traceback, and no word that the job
    would not be requeued."""
    real_step, real_write = trainer_module.Trainer.train_step, checkpoint.atomic_write

    def step(self, stats):
        real_step(self, stats)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)

    def full_disk(path, text):
        if path.name == "interrupted.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write(path, text)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", step)
    monkeypatch.setattr(checkpoint, "atomic_write", full_disk)
    trainer = toy_trainer(tmp_path / "run", steps=20, save_every=0, loop_options={"stop_check_s": 1e-3})
    with pytest.raises(UserError) as failure:
        trainer.run()
    trainer.close()
    message = str(failure.value)
    assert "stopped at step 3 on SIGUSR1 with checkpoint" in message and "step_00000003 saved" in message
    assert "interrupted.json could not be written" in message and "will not requeue" in message
    assert checkpoint.latest_checkpoint(tmp_path / "run").name == "step_00000003"
