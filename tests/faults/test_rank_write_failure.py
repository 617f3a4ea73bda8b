"""A full disk on one rank while a checkpoint is written (docs/reliability.md): every rank stops at once with the
same error naming the rank, the cause and the checkpoint to resume from, instead of the healthy ranks waiting in
the next collective for the watchdog; the partial folder is removed and resume=auto continues from the intact one.

The fault is injected in rank 1 only, through a ``sitecustomize`` module on its PYTHONPATH that makes torch.save
fail with ENOSPC for the files of one checkpoint (DeepSpeed writes rank 1's ZeRO-2 optimizer partition with it)."""

from __future__ import annotations

import subprocess
import time

from cclm.runtime import checkpoint

from ..pretrain_runs import REPO, command, metrics, overrides, quiet_env, run_pretrain, small_world

FULL_DISK = """
import errno
import os

if os.environ.get("RANK") == os.environ.get("CCLM_TEST_FULL_DISK_RANK"):
    import torch

    _save, _tag = torch.save, os.environ["CCLM_TEST_FULL_DISK_AT"]

    def _full_disk(obj, f, *args, **kwargs):
        if _tag in str(f):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return _save(obj, f, *args, **kwargs)

    torch.save = _full_disk
"""


def test_a_full_disk_on_one_rank_stops_every_rank_with_its_cause(tmp_path):
    world = small_world(tmp_path / "world")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FULL_DISK)
    out = tmp_path / "run"
    settings = {
        "deepspeed.zero_stage": 2,
        "train.max_steps": 6,
        "train.save_every": 2,
        "train.collective_timeout_s": 600,
    }
    env = {
        **quiet_env(),
        "PYTHONPATH": str(site),
        "CCLM_TEST_FULL_DISK_RANK": "1",
        "CCLM_TEST_FULL_DISK_AT": checkpoint.tag_for(4),
    }
    started = time.monotonic()
    proc = subprocess.run(
        command(2, overrides(world, out, **settings)),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    took = time.monotonic() - started
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    failed = out / "checkpoints" / checkpoint.tag_for(4)
    expected = f"checkpoint {failed} could not be written (rank 1: No space left on device)"
    # both ranks stop on their own with the one message (neither waits for the 600 s collective timeout)
    assert output.count(expected) == 2, output[-5000:]
    assert "newest intact checkpoint is step_00000002" in output
    assert took < 300
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == [checkpoint.tag_for(2)]
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]

    resumed = run_pretrain(2, overrides(world, out, **settings, resume="auto"))
    assert "at step 2" in resumed.stdout + resumed.stderr
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert [p.name for p in checkpoint.complete_checkpoints(out)] == [
        checkpoint.tag_for(s) for s in (2, 4, 6)
    ]
