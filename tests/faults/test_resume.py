"""Exact resume (docs/reliability.md): a run resumed from a checkpoint logs the very losses of the uninterrupted
run, with DataLoader workers, alternating views, region batches with parallel pairs, one rank and two, and after
every training process was killed."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from cclm.runtime import checkpoint

from ..pretrain_runs import (
    metrics,
    overrides,
    run_pretrain,
    small_world,
    start_pretrain,
    training_processes,
    wait_until,
)

LOSSES = (
    "loss",
    "image/loss",
    "text/loss",
    "image/itc",
    "image/itm",
    "image/mlm",
    "text/ttc",
    "text/ttm",
    "text/mlm",
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return small_world(tmp_path_factory.mktemp("world") / "w")


def assert_same_losses(expected: list[dict], got: list[dict], steps: range) -> None:
    by_step = {r["step"]: r for r in expected}
    resumed = {r["step"]: r for r in got}
    assert sorted(resumed) == sorted(by_step), "the resumed run did not log every step once"
    views = set()
    for step in steps:
        compared = [key for key in LOSSES if key in by_step[step]]
        assert compared and set(compared) == {k for k in LOSSES if k in resumed[step]}, step
        views |= {key.split("/")[0] for key in compared if "/" in key}
        for key in compared:
            assert resumed[step][key] == pytest.approx(by_step[step][key], abs=1e-6), (step, key)
    assert views == {"image", "text"}, "the compared steps must cover both views"


@pytest.mark.parametrize("workers", [1, 2])
def test_resume_with_data_workers_is_exact(world, tmp_path, workers):
    """The issue's probe: copy step 10 of a 20-step run into a fresh folder and resume there."""
    common = {"train.max_steps": 20, "train.save_every": 10, "data.num_workers": workers}
    straight = tmp_path / "straight"
    run_pretrain(1, overrides(world, straight, **common))
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints" / "step_00000010", resumed / "checkpoints" / "step_00000010")
    proc = run_pretrain(1, overrides(world, resumed, **common, resume="auto"))
    assert "resumed from" in proc.stderr + proc.stdout
    assert not (resumed / "config_changes.jsonl").exists(), "only resume and output_dir changed: no record"
    got = metrics(resumed)
    assert [r["step"] for r in got] == list(range(11, 21)), "the resumed run must train steps 11-20 itself"
    assert_same_losses([r for r in metrics(straight) if r["step"] > 10], got, range(11, 21))


def kill_every_process(launcher: subprocess.Popen) -> int:
    """SIGKILL the launcher and every process it started (workers may sit in sessions of their own); returns
    how many were killed."""
    tree = [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(recursive=True)]
    for proc in tree:
        proc.kill()
    gone, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive, f"still running after SIGKILL: {alive}"
    launcher.wait()
    return len(gone)


def test_resume_after_killing_every_training_process_is_exact(world, tmp_path):
    steps = 30
    common = {"deepspeed.zero_stage": 2, "train.max_steps": steps, "train.save_every": 4}
    straight = tmp_path / "straight"
    run_pretrain(2, overrides(world, straight, **common))

    resumed = tmp_path / "resumed"
    launcher = start_pretrain(2, overrides(world, resumed, **common), tmp_path / "killed.log")
    first = resumed / "checkpoints" / "step_00000004" / checkpoint.COMPLETE
    wait_until(first.exists, launcher)
    assert kill_every_process(launcher) >= 3  # the launcher and both ranks
    start = checkpoint.latest_checkpoint(resumed)
    start_step = int(checkpoint.read_record(start)["step"])
    assert start_step < steps, "the killed run had finished: nothing left to compare"

    proc = run_pretrain(2, overrides(world, resumed, **common, resume="auto"))
    assert f"at step {start_step}" in proc.stderr + proc.stdout
    got = [r for r in metrics(resumed) if r["step"] > start_step]
    assert [r["step"] for r in got] == list(range(start_step + 1, steps + 1))
    assert_same_losses(
        [r for r in metrics(straight) if r["step"] > start_step], got, range(start_step + 1, steps + 1)
    )


def heartbeat_step(output_dir: Path) -> int:
    try:
        return int(json.loads((output_dir / "heartbeats" / "rank0.json").read_text())["step"])
    except (FileNotFoundError, ValueError, KeyError):
        return 0


@pytest.mark.parametrize("checks", ["log steps", "timed"])
def test_sigusr1_saves_a_checkpoint_and_ends_every_rank_cleanly(world, tmp_path, checks):
    """SLURM's warning before the time limit: one rank gets SIGUSR1, both save the same step and exit 0; the
    resumed run starts there and the marker is gone. "timed": no log step before the end (log_every=1000), so
    the ranks must agree through the checks timed by their measured step time (stop_check_s=0.2)."""
    out = tmp_path / "run"
    common = {"train.max_steps": 400, "train.save_every": 1000}
    if checks == "timed":
        common.update({"train.log_every": 1000, "train.stop_check_s": 0.2})
    log = tmp_path / "run.log"
    launcher = start_pretrain(2, overrides(world, out, **common), log)
    wait_until(lambda: heartbeat_step(out) >= 3, launcher)
    training_processes(launcher)[1].send_signal(signal.SIGUSR1)
    launcher.wait(timeout=120)
    output = log.read_text()
    assert launcher.returncode == 0, output[-3000:]
    record = json.loads((out / "interrupted.json").read_text())
    stopped = int(record["step"])
    assert 3 <= stopped < 400 and record["signal"] == "SIGUSR1"
    saved = Path(record["checkpoint"])
    assert saved.name == checkpoint.tag_for(stopped) and (saved / checkpoint.COMPLETE).exists()
    assert f"stopped at step {stopped}" in output

    proc = run_pretrain(2, overrides(world, out, **{**common, "train.max_steps": stopped + 2}, resume="auto"))
    assert f"at step {stopped}" in proc.stderr + proc.stdout
    assert not (out / "interrupted.json").exists()
    if checks == "log steps":
        assert [r["step"] for r in metrics(out)][-2:] == [stopped + 1, stopped + 2]
    else:  # the only record is the last step's
        assert [r["step"] for r in metrics(out)] == [stopped + 2]


def test_resume_with_region_batches_and_their_parallel_pairs_is_exact(tmp_path):
    """Region batches carrying parallel pairs (model.objectives.xlc_weight) beside image and text steps: the text
    stream serves both text steps and the pairs, and a resumed run logs the uninterrupted run's losses."""
    from ..conftest import build_test_world
    from ..pretrain_runs import shard_pattern

    world = build_test_world(tmp_path / "w", num_images=48, image_size=32, heldout_images=4, xvnli_images=2,
                             seed=4, regions=True, region_langs=["en"])  # fmt: skip
    common = {
        "train.max_steps": 12,
        "train.save_every": 6,
        "model.objectives.bbox": True,
        "model.objectives.xlc_weight": 1.0,
        "data.regions.shards": shard_pattern(world / "image_caption"),
        "data.regions.prob": 0.5,
        "data.regions.batch_size": 8,
        "data.regions.max_images": 4,
    }
    straight = tmp_path / "straight"
    run_pretrain(1, overrides(world, straight, **common))
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints" / "step_00000006", resumed / "checkpoints" / "step_00000006")
    run_pretrain(1, overrides(world, resumed, **common, resume="auto"))
    expected = {r["step"]: r for r in metrics(straight)}
    got = {r["step"]: r for r in metrics(resumed)}
    assert sorted(got) == list(range(7, 13))
    region_keys = ("region/xlc", "region/bbox", "region/giou", "region/itc")
    keys = (*LOSSES, *region_keys)
    seen = set()
    for step, record in got.items():
        compared = [k for k in keys if k in expected[step]]
        assert set(compared) == {k for k in keys if k in record}, step
        seen |= {k.split("/")[0] for k in compared if "/" in k}
        for key in compared:
            assert record[key] == pytest.approx(expected[step][key], abs=1e-6), (step, key)
    assert seen == {"image", "text", "region"}, "the compared steps must cover every view"
    assert any("region/xlc" in r for r in got.values())
