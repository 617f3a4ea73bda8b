"""``cclm export`` under a tester's faults: a checkpoint of a run that is not pretraining is refused in one line
naming its config; a destination holding files (an earlier model's results, head or tokenizer) is refused, or with
--overwrite moved aside, so the new model folder holds only its own files; a failed export leaves no half folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import save_file

from cclm.config import to_dict
from cclm.model import CrossViewModel
from cclm.runtime import checkpoint
from cclm.train import export as export_module
from cclm.train.export import main as export_main


def make_checkpoint(
    run: Path,
    model_cfg,
    run_config: dict | None = None,
    tokenizer=None,
    step: int = 1,
    train: dict | None = None,
) -> Path:
    """A complete checkpoint of ``run`` at ``step`` (fp32 weights, run config, manifest), as pretraining writes
    it, with ``tokenizer`` saved in ``run/tokenizer`` as pretraining saves its own; ``train``: the run
    config's train section."""
    folder = run / "checkpoints" / f"step_{step:08d}"
    folder.mkdir(parents=True)
    model = CrossViewModel(model_cfg, load_pretrained=False)
    # named_parameters lists a tied tensor once, as the checkpoint writer saves them
    save_file({k: v.contiguous() for k, v in model.named_parameters()}, str(folder / checkpoint.FP32_WEIGHTS))
    config = {"model": to_dict(model.cfg), "train": train or {}} if run_config is None else run_config
    (folder / checkpoint.CONFIG).write_text(json.dumps(config))
    (folder / checkpoint.COMPLETE).write_text(
        json.dumps({"step": step, "world_size": 1, "files": checkpoint.manifest(folder)})
    )
    if tokenizer is not None:
        tokenizer.save_pretrained(str(run / "tokenizer"))
    return folder


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("run_config", [{"task": "xvnli"}, {"model": None}, {"model": "tiny"}])
def test_a_checkpoint_of_another_kind_of_run_is_refused_naming_its_config(
    tmp_path, tiny_model_cfg, capsys, run_config
):
    """Before: a KeyError traceback, "Cannot merge with a None config", or "unknown config key 'tiny'"."""
    folder = make_checkpoint(tmp_path / "run", tiny_model_cfg, run_config)
    assert export_main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 2
    assert f"{folder / checkpoint.CONFIG}: no model section: not a pretraining checkpoint" in one_error_line(
        capsys
    )
    assert not (tmp_path / "out").exists()


def test_a_destination_holding_files_is_refused_or_moved_aside(
    tmp_path, tiny_model_cfg, tiny_tokenizer, capsys
):
    """Before, the export wrote over the folder and kept an earlier model's eval_results.json, which the new
    model card then showed as this model's results."""
    make_checkpoint(tmp_path / "run", tiny_model_cfg, tokenizer=tiny_tokenizer)
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval_results.json").write_text(json.dumps({"xvnli": {"en": {"accuracy": 99.0}}}))
    assert export_main(["export", str(tmp_path / "run"), str(out)]) == 2
    assert f"{out} already holds files" in one_error_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["eval_results.json"]

    assert export_main(["export", str(tmp_path / "run"), str(out), "--overwrite"]) == 0
    (aside,) = tmp_path.glob("out.old-*")
    assert sorted(p.name for p in aside.iterdir()) == ["eval_results.json"]
    assert not (out / "eval_results.json").exists() and "99.0" not in (out / "README.md").read_text()
    CrossViewModel.from_pretrained(out)


def test_a_failed_export_leaves_no_half_written_folder(tmp_path, tiny_model_cfg, monkeypatch):
    make_checkpoint(tmp_path / "run", tiny_model_cfg)

    def full_disk(self, directory, extra=None):
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "config.json").write_text("{")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(CrossViewModel, "save_pretrained", full_disk)
    with pytest.raises(OSError, match="No space left"):
        export_module.export(tmp_path / "run", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
