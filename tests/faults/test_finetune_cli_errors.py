"""Errors of ``cclm finetune`` / ``cclm evaluate`` runs: a task folder whose task.json lacks a key is one line
naming the file and the key; an image root the annotations name but the config lacks is a one-line config
error; any other KeyError is a bug and keeps its traceback (before, every KeyError came out as a one-word
"config error")."""

from __future__ import annotations

import json

import pytest

from cclm.cli import main as cclm_main
from cclm.data.tokenize import load_tokenizer
from cclm.errors import CheckpointError
from cclm.model.cross_view import CrossViewModel
from cclm.tasks import protocols, xvnli
from cclm.tasks.images import ImageRef
from cclm.tasks.task_model import TaskModel

from ..test_tasks_finetune import REPO, pretrained_dir

__all__ = ["pretrained_dir"]
pytestmark = pytest.mark.usefixtures("one_thread")


def evaluate_args(iglue_dir, tmp_path, checkpoint) -> list[str]:
    return [
        "evaluate",
        str(REPO / "configs/finetune/xvnli.yaml"),
        f"checkpoint={checkpoint}",
        f"data.root={iglue_dir}",
        f"data.image_roots.flickr30k={tmp_path / 'images'}",
        f"output_dir={tmp_path / 'run'}",
        "train.device=cpu",
        "languages=[ar]",
        "data.max_examples=6",
    ]


def test_a_task_json_without_a_key_names_the_file_and_the_key(iglue_dir, tmp_path, pretrained_dir, capsys):
    folder = tmp_path / "task_model"
    model = TaskModel(CrossViewModel.from_pretrained(pretrained_dir), "xvnli", "single", xvnli.labels())
    model.save(folder, load_tokenizer(str(pretrained_dir)))
    info = json.loads((folder / "task.json").read_text())
    del info["kind"]
    (folder / "task.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match=rf"^{folder / 'task.json'}: missing key 'kind'$"):
        TaskModel.load(folder)
    assert cclm_main(evaluate_args(iglue_dir, tmp_path, folder)) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"cclm evaluate: {folder / 'task.json'}: missing key 'kind'"
    )


def test_an_unexpected_key_error_is_not_disguised_as_a_config_error(iglue_dir, tmp_path, monkeypatch):
    def buggy(cfg):
        return {}["accuracy"]

    monkeypatch.setattr(protocols, "evaluate_checkpoint", buggy)
    with pytest.raises(KeyError, match="accuracy"):
        cclm_main(evaluate_args(iglue_dir, tmp_path, tmp_path))


def test_an_unset_image_root_is_still_a_one_line_config_error(iglue_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(protocols, "evaluate_checkpoint", lambda cfg: ImageRef("coco", "1.jpg").resolve({}))
    assert cclm_main(evaluate_args(iglue_dir, tmp_path, tmp_path)) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "cclm evaluate: config key 'data.image_roots.coco' must be set (folder of the coco images)"
    )
