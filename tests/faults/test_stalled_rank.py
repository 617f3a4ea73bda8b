"""A stalled rank ends the job (docs/reliability.md): after ``kill -STOP`` of one rank, the other logs which rank
is behind and exits within ``train.collective_timeout_s``, and the launcher stops the job."""

from __future__ import annotations

import json
import signal
import time

import psutil

from ..pretrain_runs import (
    logged_steps,
    overrides,
    small_world,
    start_pretrain,
    training_processes,
    wait_until,
)

TIMEOUT_S = 12


def test_a_stopped_rank_ends_the_job_naming_it_within_the_timeout(tmp_path):
    world = small_world(tmp_path / "world")
    out = tmp_path / "run"
    options = {
        "train.max_steps": 100000,
        "train.save_every": 100000,
        "train.collective_timeout_s": TIMEOUT_S,
        "train.stall_factor": 5,
    }
    log = tmp_path / "run.log"
    launcher = start_pretrain(2, overrides(world, out, **options), log)
    tree: list[psutil.Process] = []
    try:
        wait_until(lambda: logged_steps(out) >= 5, launcher)
        tree = psutil.Process(launcher.pid).children(recursive=True)
        stalled = training_processes(launcher)[1]
        stalled.send_signal(signal.SIGSTOP)
        stopped_at = time.time()
        launcher.wait(timeout=TIMEOUT_S + 120)
        ended_after = time.time() - stopped_at
        output = log.read_text()
    finally:
        for proc in [psutil.Process(launcher.pid), *tree] if launcher.poll() is None else tree:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
    assert launcher.returncode != 0
    assert "rank 0 made no progress for" in output and f"collective_timeout_s={TIMEOUT_S}" in output, output[
        -4000:
    ]
    assert (
        "rank 1 (" in output and f"pid {stalled.pid}): no heartbeat" in output and "stopped or dead" in output
    )
    assert "median step" in output, "the slow step was reported before the timeout"
    # the healthy rank gave up within the timeout (plus the watchdog's poll); the launcher then needs its own
    # grace period to kill a stopped process
    assert ended_after < TIMEOUT_S + 60, ended_after


def test_the_watchdog_names_a_rank_stuck_elsewhere_and_a_silent_one(tmp_path):
    from cclm.runtime.watchdog import EXIT_STALLED, Watchdog

    exits = []
    dogs = [
        Watchdog(tmp_path, rank, 3, timeout_s=1.0, stall_factor=2, exit_process=exits.append)
        for rank in range(3)
    ]
    for dog in dogs:
        dog.step_done(4)
    dogs[0].set_phase("computing")
    dogs[1].set_phase("loading data")  # rank 1 never reached the collective the others wait in
    for dog in dogs[:2]:
        dog._write()
    dogs[2]._write()
    silent = json.loads((tmp_path / "rank2.json").read_text())
    silent["time"] -= 60  # rank 2's thread stopped writing a minute ago
    (tmp_path / "rank2.json").write_text(json.dumps(silent))
    report = dogs[0].describe_others()
    assert "rank 1 (" in report and "loading data after step 4" in report
    assert "rank 2 (" in report and "no heartbeat for 60 s (stopped or dead)" in report
    assert "rank 0" not in report

    dogs[0].start()  # no progress for longer than its 1 s timeout: it ends the process
    deadline = time.time() + 10
    while not exits and time.time() < deadline:
        time.sleep(0.05)
    dogs[0].stop()
    assert exits == [EXIT_STALLED]
