"""Checkpoints (docs/reliability.md): a manifest of sha256 checked before loading; nothing in a checkpoint folder
can execute code; a corrupt newest checkpoint is named in one line and resume=auto falls back to the previous one;
a checkpoint of another world size is refused naming both sizes."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import pytest

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
    trainer.run()
    trainer.close()


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
