"""A run's life in its output_dir (docs/reliability.md): resuming another run's checkpoint into a folder holding a
run is refused naming both (``overwrite=true`` moves the old run aside whole); the hint after a failed write gives
a command that works; a checkpoint past ``max_steps`` is refused; a changed ZeRO stage is named as such; library
errors met while loading stay on one line; ``cclm plot`` skips a last record torn by a kill."""

from __future__ import annotations

import errno
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

from cclm.errors import CheckpointError, UserError
from cclm.jsonl import JsonFileError
from cclm.runtime import checkpoint
from cclm.train import plot

from ..pretrain_runs import CONFIG, REPO, overrides, quiet_env, run_pretrain, small_world
from . import toy_run
from .test_output_dir import _pretrain, planted_run, snapshot
from .toy_run import toy_trainer, trained


def steps_logged(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def finish(trainer) -> None:
    trainer.run()
    trainer.close()


# ------------------------------------------------------------------------------------- another run's checkpoint
@pytest.fixture
def two_runs(tmp_path) -> tuple[Path, Path]:
    """Run A and run B (another seed), six steps each, a checkpoint every two."""
    run_a = trained(tmp_path / "fa", steps=6, save_every=2)
    run_b = toy_trainer(tmp_path / "fb", steps=6, save_every=2, run_config={"toy": True, "seed": 7})
    finish(run_b)
    return run_a, tmp_path / "fb"


def test_resuming_another_runs_checkpoint_into_a_folder_holding_a_run_is_refused_naming_both(two_runs):
    run_a, run_b = two_runs
    before = snapshot(run_b)
    foreign = run_a / "checkpoints" / "step_00000002"
    with pytest.raises(UserError) as failure:
        toy_trainer(run_b, steps=6, resume=str(foreign))
    message = str(failure.value)
    assert f"resume={foreign} is not a checkpoint of the run that output_dir={run_b} holds" in message
    assert "resume=auto" in message and "overwrite=true" in message and "\n" not in message
    assert snapshot(run_b) == before, "run B's checkpoints, metrics and config are untouched"


def test_overwrite_moves_the_other_run_aside_whole_before_resuming_another_runs_checkpoint(two_runs):
    run_a, run_b = two_runs
    before_a, before_b = snapshot(run_a), snapshot(run_b)
    trainer = toy_trainer(run_b, steps=6, resume=str(run_a / "checkpoints" / "step_00000002"), overwrite=True)
    assert trainer.step == 2
    finish(trainer)
    (aside,) = run_b.parent.glob("fb.old-*")
    assert snapshot(aside) == before_b, "run B is kept whole, its step_00000002 included"
    assert snapshot(run_a) == before_a
    assert steps_logged(run_b) == [3, 4, 5, 6], "no record of run B is read as this run's"
    assert [p.name for p in checkpoint.complete_checkpoints(run_b)] == ["step_00000004", "step_00000006"]


def test_a_checkpoint_inside_the_folder_overwrite_would_move_is_refused(two_runs):
    _, run_b = two_runs
    trainer = toy_trainer(run_b, steps=6, resume=str(run_b / "checkpoints" / "step_00000002"))
    trainer.close()  # steps 4 and 6 are set aside inside run B's folder
    (set_aside,) = run_b.glob("abandoned-*/checkpoints/step_00000006")
    with pytest.raises(UserError, match="which overwrite=true would move aside"):
        toy_trainer(run_b, steps=8, resume=str(set_aside), overwrite=True)


def test_a_copied_run_and_a_branch_into_a_fresh_folder_still_resume(two_runs, tmp_path):
    run_a, _ = two_runs
    copy = tmp_path / "copy"
    shutil.copytree(run_a, copy)
    # a copy is one run in its new folder: by resume=auto and by naming one of its checkpoints
    finish(toy_trainer(copy, steps=8, resume="auto"))
    finish(toy_trainer(copy, steps=8, resume=str(copy / "checkpoints" / "step_00000006")))
    assert steps_logged(copy) == list(range(1, 9))
    # another run's checkpoint into a folder without a run starts a branch of that run there
    branch = toy_trainer(tmp_path / "branch", steps=6, resume=str(run_a / "checkpoints" / "step_00000004"))
    assert branch.step == 4
    finish(branch)
    assert steps_logged(tmp_path / "branch") == [5, 6]


def test_cclm_pretrain_refuses_another_runs_checkpoint_in_one_line_before_reading_data(
    tmp_path, tokenizer_dir
):
    held = tmp_path / "fb"
    before = planted_run(held)
    foreign = tmp_path / "fa" / "checkpoints" / "step_00000002"
    proc = _pretrain(held, tokenizer_dir, f"resume={foreign}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"resume={foreign} is not a checkpoint of the run that output_dir={held} holds" in proc.stderr
    assert snapshot(held) == before


# ------------------------------------------------------------------------------------------ the restart hint
def test_the_hint_after_a_full_disk_before_the_first_checkpoint_works(tmp_path, monkeypatch):
    """The failed run left config.json and metrics.jsonl: a plain rerun is refused, the hint's resume=auto starts
    the run again from step 0."""
    run = tmp_path / "run"
    monkeypatch.setattr(
        checkpoint, "save_tensors", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space"))
    )
    trainer = toy_trainer(run, steps=4, save_every=2)
    with pytest.raises(CheckpointError) as failed:
        trainer.run()
    trainer.close()
    monkeypatch.undo()
    message = str(failed.value)
    assert "no earlier checkpoint" in message and "rerun with resume=auto" in message
    with pytest.raises(UserError, match="already holds a run"):
        toy_trainer(run, steps=4, save_every=2)
    again = toy_trainer(run, steps=4, save_every=2, resume="auto")
    assert again.step == 0
    finish(again)
    assert steps_logged(run) == [1, 2, 3, 4]
    assert checkpoint.latest_checkpoint(run).name == "step_00000004"


# -------------------------------------------------------------------------------------------- past max_steps
def test_resuming_a_checkpoint_past_max_steps_is_refused_naming_both(tmp_path):
    run = trained(tmp_path / "run", steps=6, save_every=2)
    before = snapshot(run)
    with pytest.raises(UserError) as failure:
        toy_trainer(run, steps=4, resume="auto")
    message = str(failure.value)
    assert "step_00000006 is at step 6, past max_steps=4" in message and "\n" not in message
    assert snapshot(run) == before, "config.json still says what the run trained"


def test_resuming_a_finished_run_says_it_trains_nothing(tmp_path, caplog):
    run = trained(tmp_path / "run", steps=4, save_every=2)
    with caplog.at_level(logging.WARNING, logger="cclm.train"):
        trainer = toy_trainer(run, steps=4, resume="auto")
    assert "step_00000004 is at step 4 = max_steps" in caplog.text
    finish(trainer)
    assert steps_logged(run) == [1, 2, 3, 4]


def test_a_run_its_time_limit_ended_trains_nothing_more_when_resumed(tmp_path, caplog):
    """Before, every resume=auto of a time-limited run that had finished trained (and saved) one more step."""
    run = tmp_path / "run"
    finish(toy_trainer(run, steps=100, save_every=50, loop_options={"time_limit_s": 1e-4}))
    assert steps_logged(run) == [1]
    for _ in range(2):
        with caplog.at_level(logging.WARNING, logger="cclm.train"):
            finish(
                toy_trainer(run, steps=100, save_every=50, loop_options={"time_limit_s": 1e-4}, resume="auto")
            )
        assert "the run ended at step 1 on its time limit" in caplog.text
        assert steps_logged(run) == [1] and [p.name for p in checkpoint.complete_checkpoints(run)] == [
            "step_00000001"
        ]
    # a larger limit trains on
    finish(toy_trainer(run, steps=3, save_every=50, loop_options={"time_limit_s": 3600.0}, resume="auto"))
    assert steps_logged(run) == [1, 2, 3]


# ------------------------------------------------------------------------------------- load errors, one line
@pytest.mark.parametrize(("saved", "resumed"), [(0, 1), (1, 0), (2, 0)])
def test_another_zero_stage_is_refused_naming_both_not_called_corrupt(tmp_path, saved, resumed):
    run = trained(tmp_path / "run", steps=2, save_every=2, zero_stage=saved)
    before = snapshot(run)
    with pytest.raises(CheckpointError) as failure:
        toy_trainer(run, steps=4, zero_stage=resumed, resume="auto")
    message = str(failure.value)
    assert f"written under ZeRO stage {saved} and this run uses stage {resumed}" in message
    assert "corrupt" not in message and "\n" not in message
    assert snapshot(run) == before


def test_an_older_checkpoint_of_another_zero_stage_is_not_called_corrupt(tmp_path):
    """Written before complete.json recorded the stage: DeepSpeed looks for a file of another layout."""
    run = trained(tmp_path / "run", steps=2, save_every=2, zero_stage=0)
    folder = checkpoint.latest_checkpoint(run)
    record = checkpoint.read_record(folder)
    del record["zero_stage"]
    (folder / checkpoint.COMPLETE).write_text(json.dumps(record))
    with pytest.raises(CheckpointError) as failure:
        toy_trainer(run, steps=4, zero_stage=1, resume="auto")
    message = str(failure.value)
    assert "optim_states.pt: missing: this run's ZeRO stage needs it" in message
    assert "corrupt" not in message and "\n" not in message


def test_zero_stages_1_and_2_still_resume_each_other(tmp_path):
    run = trained(tmp_path / "run", steps=2, save_every=2, zero_stage=1)
    finish(toy_trainer(run, steps=4, zero_stage=2, resume="auto"))
    assert steps_logged(run) == [1, 2, 3, 4]


def test_a_checkpoint_of_another_model_fails_in_one_line(tmp_path, monkeypatch):
    """PyTorch's state-dict error spans lines; the CLI would print the newline as a literal \\x0a escape."""
    run = trained(tmp_path / "run", steps=2, save_every=2)

    class Wider(toy_run.Regression):
        def __init__(self):
            super().__init__()
            self.extra = nn.Linear(2, 2)

    monkeypatch.setattr(toy_run, "Regression", Wider)
    with pytest.raises(CheckpointError) as failure:
        toy_trainer(run, steps=4, resume="auto")
    message = str(failure.value)
    assert "DeepSpeed could not load it" in message and "extra.weight" in message
    assert "\n" not in message and "\t" not in message


# ------------------------------------------------------------------------------------------------- cclm plot
def write_metrics(run: Path, tail: str = "", middle: str | None = None) -> Path:
    run.mkdir(exist_ok=True)
    lines = [json.dumps({"step": s, "loss": 1.0 / s, "lr": 1e-4, "samples_per_s": 10.0}) for s in range(1, 7)]
    if middle is not None:
        lines.insert(3, middle)
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines) + tail)
    return run / "metrics.jsonl"


def test_plot_skips_a_last_record_torn_by_a_kill_with_a_warning(tmp_path, caplog):
    metrics = write_metrics(tmp_path / "run", tail='{"step": 7, "lo')
    with caplog.at_level(logging.WARNING, logger="cclm.plot"):
        picture = plot.plot_curves(tmp_path / "run")
    assert picture.is_file()
    assert f"{metrics}:7: malformed JSON line" in caplog.text and "skipped 1 record" in caplog.text
    assert [r["step"] for r in plot.read_metrics(metrics)] == list(range(1, 7))


@pytest.mark.parametrize(
    ("middle", "tail", "error"),
    [
        ('{"step": 4, "lo', "", "4: malformed JSON line"),  # torn in the middle: not a kill's
        (None, '{"loss": 0.5}\n', '7: a record without an integer "step"'),
        ('{"loss": 0.5}', "", '4: a record without an integer "step"'),
    ],
)
def test_plot_names_file_and_line_of_a_bad_record(tmp_path, capsys, middle, tail, error):
    metrics = write_metrics(tmp_path / "run", tail=tail, middle=middle)
    with pytest.raises(JsonFileError, match=f"{metrics}:{error}"):
        plot.plot_curves(tmp_path / "run")
    assert plot.main(["plot", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{metrics}:{error}" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run" / "curves.png").exists()


# ------------------------------------------------------------------------------------- a resume the data refuses
def cclm_pretrain(world: Path, run: Path, **settings) -> subprocess.CompletedProcess:
    """``cclm pretrain`` as a user runs it (its one-line errors, exit 2), on the small world."""
    return subprocess.run(
        [sys.executable, "-m", "cclm.cli", "pretrain", str(CONFIG), *overrides(world, run, **settings)],
        cwd=REPO,
        env=quiet_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def one_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("cclm pretrain:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


def test_a_resume_the_data_stream_refuses_is_one_line_and_leaves_the_runs_config(tmp_path):
    """num_workers changed since the checkpoint: non-resampled data cannot resume exactly, so the run stops; the
    folder's config.json still describes the run its checkpoints were made with."""
    world = small_world(tmp_path / "world")
    run = tmp_path / "run"
    run_pretrain(1, overrides(world, run, **{"train.max_steps": 2, "train.save_every": 2}))
    before = (run / "config.json").read_bytes()
    error = one_error(
        cclm_pretrain(world, run, **{"train.max_steps": 4, "data.num_workers": 2, "resume": "auto"})
    )
    assert "num_workers changed since the checkpoint" in error and "ValueError" not in error
    assert (run / "config.json").read_bytes() == before


def test_a_resume_whose_changed_decay_rule_regroups_the_optimizer_names_the_key(tmp_path):
    """The optimizer's saved state no longer fits its regrouped parameters: DeepSpeed's error alone does not say
    why, so the refusal names the keys this resume changed."""
    world = small_world(tmp_path / "world")
    run = tmp_path / "run"
    steps = {"train.save_every": 2, "data.num_workers": 0}
    run_pretrain(1, overrides(world, run, **{"train.max_steps": 2, **steps}))
    before = (run / "config.json").read_bytes()
    changed = {"train.max_steps": 4, "train.optimizer.decay_rule": "reference", "resume": "auto", **steps}
    error = one_error(cclm_pretrain(world, run, **changed))
    assert "DeepSpeed could not load it" in error
    assert "train.optimizer.decay_rule: 'shape' -> 'reference'" in error
    assert "resume with the checkpoint's values for those keys" in error
    assert (run / "config.json").read_bytes() == before
    # the same run with the checkpoint's rule resumes
    run_pretrain(1, overrides(world, run, **{"train.max_steps": 4, "resume": "auto", **steps}))
    assert steps_logged(run) == [1, 2, 3, 4]
