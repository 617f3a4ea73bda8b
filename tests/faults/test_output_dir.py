"""An earlier run is never destroyed (docs/reliability.md): a fresh run into a folder holding a run is refused
before anything is written, naming the folder and the two ways on; ``overwrite=true`` moves the old run aside."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cclm.errors import UserError
from cclm.runtime import checkpoint

from ..pretrain_runs import CONFIG, REPO, quiet_env
from .toy_run import toy_trainer, trained


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_a_fresh_run_into_a_folder_holding_a_run_is_refused_and_writes_nothing(tmp_path):
    run = trained(tmp_path / "run", steps=40, save_every=20)
    before = snapshot(run)
    with pytest.raises(UserError) as failure:
        toy_trainer(run, steps=6, save_every=2)
    message = str(failure.value)
    assert str(run) in message and "resume=auto" in message and "overwrite=true" in message
    assert snapshot(run) == before


def test_overwrite_moves_the_old_run_aside_and_keeps_the_new_checkpoints(tmp_path):
    run = trained(tmp_path / "run", steps=40, save_every=20)
    before = snapshot(run)
    trainer = toy_trainer(run, steps=6, save_every=2, overwrite=True)
    trainer.run()
    trainer.close()
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert snapshot(aside) == before, "the old run is kept whole"
    # the old step_00000040 no longer outranks the new run's checkpoints in keep-last rotation
    assert [p.name for p in checkpoint.complete_checkpoints(run)] == [
        "step_00000002",
        "step_00000004",
        "step_00000006",
    ]


def test_overwrite_with_resume_auto_is_refused_not_a_silent_continuation(tmp_path):
    """The paper configs say resume: auto; overwrite=true on top of it continued the old run, nothing moved."""
    from cclm.runtime.output_dir import check_output_dir

    run = trained(tmp_path / "run", steps=4, save_every=2)
    before = snapshot(run)
    with pytest.raises(UserError, match="add resume=null to start anew"):
        check_output_dir(run, "auto", overwrite=True)
    assert snapshot(run) == before
    check_output_dir(tmp_path / "empty", "auto", overwrite=True)  # nothing to move aside: a fresh start


def _pretrain(output_dir: Path, tokenizer, *extra: str) -> subprocess.CompletedProcess:
    # The shards need not exist: the output folder is checked before any data is opened.
    shards = [
        "data.image_caption.shards=/nowhere/ic.tar",
        "data.parallel_text.shards=/nowhere/pt.tar",
        f"model.text.tokenizer={tokenizer}",  # demo.yaml leaves it to fill in (???)
    ]
    cmd = [
        sys.executable,
        "-m",
        "cclm.cli",
        "pretrain",
        str(CONFIG),
        f"output_dir={output_dir}",
        *shards,
        *extra,
    ]
    return subprocess.run(cmd, cwd=REPO, env=quiet_env(), capture_output=True, text=True, timeout=300)


def planted_run(folder: Path) -> dict[str, bytes]:
    """A folder holding a (tiny) run's files; returns its snapshot."""
    folder.mkdir()
    (folder / "metrics.jsonl").write_text('{"step": 40, "loss": 1.0}\n')
    (folder / "config.json").write_text("{}")
    return snapshot(folder)


def test_cclm_pretrain_refuses_an_output_dir_holding_a_run_in_one_line(tmp_path, tokenizer_dir):
    run = tmp_path / "old"
    before = planted_run(run)
    proc = _pretrain(run, tokenizer_dir)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "already holds a run" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert snapshot(run) == before


@pytest.mark.parametrize("where", ["under a file", "in a read-only file system"])
def test_an_output_dir_that_cannot_be_written_fails_before_the_model_is_built(tmp_path, tokenizer_dir, where):
    if where == "under a file":
        blocker = tmp_path / "a_file"
        blocker.write_text("")
        output_dir = blocker / "run"
    else:
        output_dir = Path("/proc/cclm-run")  # no user, root included, can create a folder there
    proc = _pretrain(output_dir, tokenizer_dir)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"output_dir={output_dir}" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not output_dir.exists()
