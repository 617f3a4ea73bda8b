"""Checkpoints (docs/reliability.md): a manifest of sha256 checked before loading; nothing in a checkpoint folder
can execute code; a corrupt newest checkpoint is named in one line and resume=auto falls back to the previous one;
a checkpoint of another world size is refused naming both sizes."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
from datetime import timedelta
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from cclm.errors import CheckpointError
from cclm.runtime import checkpoint
from cclm.train.export import main as export_main

from .toy_run import toy_trainer, trained

MODEL_STATES = "mp_rank_00_model_states.pt"


class _Plant:
    """Unpickling this creates a file: the proof that loading ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"module": _Plant(marker)}))


def rewrite_manifest(folder: Path) -> None:
    """What an attacker who can write the folder can also do."""
    record = checkpoint.read_record(folder)
    record["files"] = checkpoint.manifest(folder)
    (folder / checkpoint.COMPLETE).write_text(json.dumps(record))


@pytest.fixture
def run(tmp_path) -> Path:
    return trained(tmp_path / "run", steps=6, save_every=2)


def newest(run: Path) -> Path:
    return checkpoint.latest_checkpoint(run)


def test_complete_json_holds_the_sha256_of_every_other_file(run):
    folder = newest(run)
    record = checkpoint.read_record(folder)
    on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert sorted(record["files"]) == [name for name in on_disk if name != checkpoint.COMPLETE]
    assert MODEL_STATES in record["files"] and "rank0_state.json" in record["files"]
    assert record["files"][MODEL_STATES] == checkpoint.sha256(folder / MODEL_STATES)
    assert record["step"] == 6 and record["world_size"] == 1


@pytest.mark.parametrize("manifest", ["unchanged", "rewritten"])
def test_a_planted_pickle_is_refused_naming_it_and_executes_nothing(run, tmp_path, manifest):
    folder = newest(run)
    marker = tmp_path / "code-ran"
    plant(folder / MODEL_STATES, marker)
    if manifest == "rewritten":  # the hash check passes: the loader itself must refuse
        rewrite_manifest(folder)
    with pytest.raises(CheckpointError) as failure:
        toy_trainer(run, resume=str(folder))
    message = str(failure.value)
    assert str(folder / MODEL_STATES) in message and "\n" not in message
    assert ("refused to load" if manifest == "rewritten" else "sha256") in message
    assert not marker.exists()


def test_a_planted_optimizer_pickle_is_refused_too(tmp_path):
    """ZeRO keeps the optimizer state in a file of its own: it is loaded through the same safe loader."""
    run = trained(tmp_path / "zero1", steps=2, save_every=2, zero_stage=1)
    folder = newest(run)
    optimizer_file = next(folder.glob("*optim_states.pt"))
    marker = tmp_path / "code-ran"
    plant(optimizer_file, marker)
    rewrite_manifest(folder)
    with pytest.raises(CheckpointError, match="refused to load") as failure:
        toy_trainer(run, zero_stage=1, resume="auto")
    assert str(optimizer_file) in str(failure.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "damage",
    [
        "truncated model states",
        "truncated rank0_state.json",
        "truncated complete.json",
        "missing model states",
    ],
)
def test_resume_auto_falls_back_past_a_corrupt_newest_checkpoint(run, caplog, damage):
    bad = newest(run)
    target = {
        "truncated model states": bad / MODEL_STATES,
        "truncated rank0_state.json": bad / "rank0_state.json",
        "truncated complete.json": bad / checkpoint.COMPLETE,
        "missing model states": bad / MODEL_STATES,
    }[damage]
    if damage.startswith("missing"):
        target.unlink()
    else:
        target.write_bytes(target.read_bytes()[: max(1, target.stat().st_size // 2)])
    with caplog.at_level(logging.WARNING, logger="cclm.train"):
        trainer = toy_trainer(run, resume="auto")
    assert trainer.step == 4, "resumed from the previous complete checkpoint"
    warning = next(r.getMessage() for r in caplog.records if "skipping" in r.getMessage())
    assert bad.name in warning and str(target) in warning
    # the bad checkpoint is set aside, not deleted: later resumes and keep-last rotation no longer meet it
    (aside,) = run.glob("abandoned-*")
    assert not bad.exists() and (aside / "checkpoints" / bad.name).is_dir()
    trainer.run()
    trainer.close()


def test_a_kill_while_rotation_removes_an_old_checkpoint_leaves_no_complete_json_behind(
    tmp_path, monkeypatch
):
    """Keep-last rotation removed a checkpoint with one rmtree: a kill part-way left complete.json beside lost
    files, a checkpoint that resume=auto would fall back to if the newest were bad too."""
    real_rmtree = checkpoint.shutil.rmtree

    def killed_part_way(path, ignore_errors=False):
        (Path(path) / MODEL_STATES).unlink()
        monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
        raise SystemExit("killed")

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_part_way)
    run = tmp_path / "run"
    trainer = toy_trainer(run, steps=4, save_every=2, loop_options={"keep_last": 1})
    with pytest.raises(SystemExit):
        trainer.run()
    assert [p.name for p in checkpoint.complete_checkpoints(run)] == ["step_00000004"]


def test_an_explicit_corrupt_checkpoint_fails_in_one_line_naming_the_file(run):
    bad = newest(run)
    (bad / "rank0_state.json").write_text('{"step": 6, "da')
    with pytest.raises(CheckpointError, match=r"rank0_state\.json: corrupt or altered") as failure:
        toy_trainer(run, resume=str(bad))
    assert "\n" not in str(failure.value)


def test_resume_auto_with_only_corrupt_checkpoints_fails_instead_of_starting_over(tmp_path):
    run = trained(tmp_path / "run", steps=2, save_every=2)
    only = newest(run)
    (only / MODEL_STATES).write_bytes(b"")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        toy_trainer(run, resume="auto")


def test_another_world_size_is_refused_naming_both(run):
    folder = newest(run)
    record = checkpoint.read_record(folder)
    record["world_size"] = 2
    (folder / checkpoint.COMPLETE).write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="written by 2 ranks and this run has 1"):
        toy_trainer(run, resume=str(folder))


def test_resume_auto_under_another_world_size_is_refused_once_not_per_checkpoint(tmp_path, caplog):
    run = trained(tmp_path / "run", steps=6, save_every=2)
    for folder in checkpoint.complete_checkpoints(run):
        record = checkpoint.read_record(folder)
        record["world_size"] = 2
        (folder / checkpoint.COMPLETE).write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING), pytest.raises(CheckpointError) as refused:
        toy_trainer(run, resume="auto")
    assert str(refused.value).startswith(f"{newest(run)} was written by 2 ranks and this run has 1")
    assert not [r for r in caplog.records if "skipping" in r.getMessage()], "not a damaged checkpoint"


def test_export_of_truncated_weights_is_one_line_naming_the_file(tmp_path, tiny_model_cfg, capsys):
    from cclm.config import to_dict
    from cclm.model import CrossViewModel

    folder = tmp_path / "out" / "checkpoints" / "step_00000001"
    folder.mkdir(parents=True)
    from safetensors.torch import save_model

    model = CrossViewModel(tiny_model_cfg)
    save_model(model, str(folder / checkpoint.FP32_WEIGHTS))  # tied tensors stored once, as checkpoints do
    (folder / checkpoint.CONFIG).write_text(json.dumps({"model": to_dict(model.cfg)}))
    weights = folder / checkpoint.FP32_WEIGHTS
    for manifest in ("matching", "stale"):
        data = weights.read_bytes()
        if manifest == "matching":  # truncated after the manifest was made: the hash catches it
            (folder / checkpoint.COMPLETE).write_text(
                json.dumps({"step": 1, "world_size": 1, "files": checkpoint.manifest(folder)})
            )
            weights.write_bytes(data[: len(data) // 2])
        else:  # a manifest that matches the truncated file: safetensors itself fails
            rewrite_manifest(folder)
        assert export_main(["export", str(folder), str(tmp_path / "exported")]) == 2
        err = capsys.readouterr().err.strip()
        assert str(weights) in err and len(err.splitlines()) == 1, err


def test_a_metrics_line_torn_by_a_kill_is_dropped_on_resume(run, caplog):
    metrics_file = run / "metrics.jsonl"
    intact = metrics_file.read_text()
    metrics_file.write_text(intact + '{"step": 7, "loss": 0.1')  # the kill hit mid-write
    with caplog.at_level(logging.WARNING, logger="cclm.train"):
        trainer = toy_trainer(run, steps=8, resume="auto")
    assert any("dropping a torn record" in r.getMessage() for r in caplog.records)
    trainer.run()
    trainer.close()
    steps = [json.loads(line)["step"] for line in metrics_file.read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_resuming_with_another_config_names_every_changed_key(tmp_path, caplog):
    """A resume is exact only under the checkpoint's config: a changed, added or removed key is named in a warning
    and recorded with its step in config_changes.jsonl; the same config (resume/overwrite aside) records nothing."""
    first = {"train": {"lr": 0.05, "batch": 8, "view_schedule": "alternate"}, "data": {"shards": ["a", "b"]}}
    trainer = toy_trainer(tmp_path / "run", steps=4, run_config=first)
    trainer.run()
    trainer.close()
    changes_file = tmp_path / "run" / "config_changes.jsonl"

    with caplog.at_level(logging.WARNING, logger="cclm.train"):
        same = {**first, "resume": "auto", "overwrite": True}
        toy_trainer(tmp_path / "run", steps=6, resume="auto", run_config=same).close()
    assert not changes_file.exists() and "differs from the checkpoint" not in caplog.text

    second = {
        "train": {"lr": 0.05, "batch": 16, "view_schedule": "sum", "seed": 1},
        "data": {"shards": ["a", "b", "c"]},
    }
    with caplog.at_level(logging.WARNING, logger="cclm.train"):
        toy_trainer(tmp_path / "run", steps=6, resume="auto", run_config=second).close()
    assert "differs from the checkpoint's in 4 key(s)" in caplog.text
    assert (
        "train.batch: 8 -> 16" in caplog.text and "train.view_schedule: 'alternate' -> 'sum'" in caplog.text
    )
    record = json.loads(changes_file.read_text())
    assert record == {
        "step": 4,
        "changes": {
            "data.shards": [["a", "b"], ["a", "b", "c"]],
            "train.batch": [8, 16],
            "train.seed": [None, 1],
            "train.view_schedule": ["alternate", "sum"],
        },
    }


@pytest.mark.parametrize("where", ["weights", "engine"])
def test_a_full_disk_while_saving_stops_the_run_naming_the_intact_checkpoint(tmp_path, monkeypatch, where):
    """ENOSPC in the middle of writing step 4 (the fp32 weights, or the engine's states, which torch.save reports as
    a RuntimeError): the run stops with one error naming the folder, the cause and step 2 (intact); the partial
    folder is gone; resume=auto then trains steps 3-6 to the uninterrupted run's losses."""
    straight = trained(tmp_path / "straight", steps=6, save_every=2)

    def full_disk(*args, **kwargs):
        if where == "weights":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 128 vs 64")

    run = tmp_path / "run"
    trainer = toy_trainer(run, steps=6, save_every=2)
    real_save_file, real_engine_save = checkpoint.save_tensors, trainer.engine.save_checkpoint
    if where == "weights":
        monkeypatch.setattr(
            checkpoint,
            "save_tensors",
            lambda t, f: full_disk() if "step_00000004" in f else real_save_file(t, f),
        )
    else:
        monkeypatch.setattr(
            trainer.engine,
            "save_checkpoint",
            lambda root, tag, **kw: (
                full_disk() if tag == "step_00000004" else real_engine_save(root, tag=tag, **kw)
            ),
        )
    with pytest.raises(CheckpointError) as failed:
        trainer.run()
    trainer.close()
    message = str(failed.value)
    assert "step_00000004 could not be written" in message
    assert ("No space left on device" if where == "weights" else "unexpected pos") in message
    assert "newest intact checkpoint is step_00000002" in message and "resume=auto" in message
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002"]

    monkeypatch.undo()
    resumed = toy_trainer(run, steps=6, save_every=2, resume="auto")
    assert resumed.step == 2
    resumed.run()
    resumed.close()

    def losses(folder: Path) -> dict[int, float]:
        return {
            r["step"]: r["loss"] for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
        }

    assert losses(run) == pytest.approx(losses(straight), abs=1e-7)
    assert sorted(losses(run)) == list(range(1, 7))


def test_a_full_disk_while_keeping_the_best_weights_stops_the_run_naming_them(tmp_path, monkeypatch):
    """A run that selects by an evaluation metric keeps the best weights in <output_dir>/best/: when that write
    fails (step 4's evaluation is the best so far), the run stops with one error naming the folder, the cause and
    step 2 to resume from; no half-written file is left beside the weights of step 2's evaluation."""
    from cclm.runtime import trainer as trainer_module

    scores = iter([0.1, 0.5, 0.2])
    real_save_file = trainer_module.save_tensors
    evaluations = []

    def full_disk_after_the_first(tensors, filename):
        evaluations.append(filename)
        if len(evaluations) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        real_save_file(tensors, filename)

    monkeypatch.setattr(trainer_module, "save_tensors", full_disk_after_the_first)
    run = tmp_path / "run"
    trainer = toy_trainer(
        run,
        steps=6,
        save_every=2,
        loop_options={"eval_every": 2, "select_metric": "score"},
        evaluate=lambda module: {"score": next(scores)},
    )
    with pytest.raises(CheckpointError) as failed:
        trainer.run()
    trainer.close()
    message = str(failed.value)
    assert (
        f"best weights so far (step 4) could not be written to {run / 'best'} (No space left on device)"
        in (message)
    )
    assert "newest intact checkpoint is step_00000002" in message
    assert sorted(p.name for p in (run / "best").iterdir()) == ["best.json", "model_fp32.safetensors"]
    assert json.loads((run / "best" / "best.json").read_text())["best_step"] == 2


def test_a_full_disk_before_the_first_checkpoint_says_there_is_none(tmp_path, monkeypatch):
    monkeypatch.setattr(
        checkpoint, "save_tensors", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space"))
    )
    trainer = toy_trainer(tmp_path / "run", steps=2, save_every=2)
    with pytest.raises(CheckpointError, match="no earlier checkpoint"):
        trainer.run()
    trainer.close()
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []


@pytest.mark.skipif(
    not Path("/dev/full").exists(), reason="needs /dev/full (Linux) to fail a write with ENOSPC"
)
def test_a_full_disk_while_logging_stops_the_run_naming_the_file_and_the_checkpoint(tmp_path, monkeypatch):
    """metrics.jsonl cannot take step 5's record: one error naming the file, the cause and step 4 to resume from;
    the resumed run logs steps 5 and 6 after the kept records."""
    from cclm.errors import UserError
    from cclm.runtime import trainer as trainer_module

    real_log = trainer_module.RunLogger.log

    def full_disk(self, step, scalars):
        if step == 5:  # the real failure: a line-buffered file on a full device (close() fails as well)
            self.file = open("/dev/full", "a", buffering=1)  # noqa: SIM115 - closed by RunLogger.close
        real_log(self, step, scalars)

    monkeypatch.setattr(trainer_module.RunLogger, "log", full_disk)
    run = tmp_path / "run"
    trainer = toy_trainer(run, steps=6, save_every=2)
    with pytest.raises(UserError) as failed:
        trainer.run()
    trainer.close()
    message = str(failed.value)
    assert message.startswith(
        f"{run / 'metrics.jsonl'} could not be written at step 5 (No space left on device)"
    )
    assert "newest intact checkpoint is step_00000004" in message and "resume=auto" in message

    monkeypatch.undo()
    resumed = toy_trainer(run, steps=6, save_every=2, resume="auto")
    resumed.run()
    resumed.close()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


def test_resuming_from_an_older_checkpoint_sets_the_later_ones_aside(run, caplog):
    """Back to step 2 of a 6-step run (say, before a divergence): steps 4 and 6 and the metrics that went with
    them move to abandoned-<time>/, so resume=auto and keep-last rotation see only the new branch; a later folder
    without complete.json is removed."""
    old_metrics = (run / "metrics.jsonl").read_text()
    partial = run / "checkpoints" / "step_00000007"  # a save cut short: nothing usable, removed
    partial.mkdir()
    (partial / "rank0_state.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="cclm.train"):
        trainer = toy_trainer(run, steps=6, resume=str(run / "checkpoints" / "step_00000002"))
    assert not partial.exists() and not list(run.glob("abandoned-*/checkpoints/step_00000007"))
    assert trainer.step == 2
    (aside,) = run.glob("abandoned-*")
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]
    assert (aside / "metrics.jsonl").read_text() == old_metrics
    assert "step_00000004, step_00000006 were moved to" in caplog.text
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002"]
    trainer.run()
    trainer.close()
    assert checkpoint.latest_checkpoint(run).name == "step_00000006"  # the new branch's
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


def _resume_on_rank(rank: int, folder: str, target: str) -> None:
    """One of two gloo ranks resuming ``target``; rank 1 does not see its complete.json (a node that does not
    mount the folder). Writes what it raised to ``rank{rank}.json``."""
    import torch.distributed as dist

    if rank == 1:
        real_exists = Path.exists
        Path.exists = lambda self: False if self.name == checkpoint.COMPLETE else real_exists(self)
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2, timeout=timedelta(seconds=20)
    )
    try:
        checkpoint.resume_target(Path(folder) / "out", target)
        outcome = None
    except Exception as err:  # noqa: BLE001 - the test compares what each rank raised
        outcome = [type(err).__name__, str(err)]
    finally:
        dist.destroy_process_group()
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps(outcome))


def test_an_explicit_checkpoint_one_rank_cannot_see_stops_every_rank_naming_it(run, tmp_path):
    """Before, the rank that did not see complete.json raised alone while the others waited in the check's
    collective until its timeout."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_resume_on_rank, args=(r, str(tmp_path), str(newest(run)))) for r in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    assert [proc.exitcode for proc in procs] == [0, 0]
    outcomes = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert outcomes[0] == outcomes[1], outcomes
    kind, message = outcomes[0]
    assert kind == "CheckpointError" and message.endswith(f"(no {checkpoint.COMPLETE}, as rank 1 sees it)")
