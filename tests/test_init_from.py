"""Continued pretraining (``init_from``): a saved model's weights start a run, new parameters (a box head) start
fresh, a model of another shape is refused; the demo's grounding stage (region batches only, box losses only)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from cclm.config import ConfigError
from cclm.errors import CheckpointError
from cclm.model import CrossViewModel
from cclm.model.cross_view import initialise_from

from .conftest import build_test_world
from .pretrain_runs import metrics, overrides, run_pretrain, shard_pattern

BOX_HEAD = [f"box_head.mlp.{i}.{p}" for i in (0, 1, 3) for p in ("bias", "weight")]


def _with_box_head(cfg):
    cfg = copy.deepcopy(cfg)
    cfg.objectives.bbox = True
    return cfg


def test_weights_are_copied_and_only_the_new_box_head_starts_fresh(tiny_model_dir, tiny_model_cfg):
    torch.manual_seed(1)  # other random weights than the saved model's
    model = CrossViewModel(_with_box_head(tiny_model_cfg), load_pretrained=False)
    saved = CrossViewModel.from_pretrained(tiny_model_dir).state_dict()
    assert not torch.equal(model.state_dict()["fusion.layers.0.crossattention.self.query.weight"],
                           saved["fusion.layers.0.crossattention.self.query.weight"])  # fmt: skip
    fresh = initialise_from(model, tiny_model_dir)
    assert fresh == sorted(BOX_HEAD)  # the tied MLM decoder / word embeddings count as loaded
    state = model.state_dict()
    for name, tensor in saved.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)


def test_a_model_of_another_shape_is_refused_naming_the_tensors(tiny_model_dir, tiny_model_cfg):
    cfg = copy.deepcopy(tiny_model_cfg)
    cfg.embed_dim = 32
    model = CrossViewModel(cfg, load_pretrained=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ConfigError, match=r"does not fit this model .*vision_proj.weight \(64, 64\) vs \(32, 64\)"
    ):
        initialise_from(model, tiny_model_dir)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded


def test_a_folder_without_a_model_is_refused(tmp_path, tiny_model_cfg):
    with pytest.raises(ConfigError, match="is not a cclm model folder"):
        initialise_from(CrossViewModel(tiny_model_cfg, load_pretrained=False), tmp_path)


def test_a_damaged_weights_file_is_refused_naming_it(tiny_model_dir, tiny_model_cfg):
    """Before, a truncated model.safetensors gave safetensors' own traceback, naming no file."""
    weights = tiny_model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"{weights}: not a readable safetensors file"):
        initialise_from(CrossViewModel(tiny_model_cfg, load_pretrained=False), tiny_model_dir)


@pytest.fixture(scope="module")
def region_world(tmp_path_factory):
    return build_test_world(tmp_path_factory.mktemp("world") / "w", num_images=64, image_size=32,
                            heldout_images=8, xvnli_images=4, seed=5, regions=True, region_langs=["en"])  # fmt: skip


def test_the_grounding_stage_starts_from_the_model_and_trains_only_the_box_head(region_world, tmp_path):
    """The demo's grounding run: init_from a pretrained model, every image step a region batch, box losses only.
    At lr 0 the exported model is the starting model (plus the new head); at the demo's lr the box losses fall."""
    first = tmp_path / "first"
    run_pretrain(1, overrides(region_world, first, **{"train.max_steps": 4, "train.save_every": 4}))
    from cclm.train.export import export

    start = export(first, first / "model")
    stage = {
        "init_from": str(start),
        "model.objectives.bbox": True,
        "model.objectives.itc_weight": 0,
        "model.objectives.itm_weight": 0,
        "model.objectives.mlm_weight": 0,
        "data.parallel_text": "null",
        "data.regions.shards": shard_pattern(region_world / "image_caption"),
        "data.regions.prob": 1.0,
        "data.regions.batch_size": 8,
        "data.regions.max_images": 4,
    }
    frozen = tmp_path / "lr0"
    run_pretrain(1, overrides(region_world, frozen, **stage, **{"train.max_steps": 2, "train.save_every": 2,
                                                                 "train.optimizer.lr": 0.0}))  # fmt: skip
    records = metrics(frozen)
    assert all(set(k.split("/")[0] for k in r if "/" in k) == {"region"} for r in records), records
    assert all({"region/bbox", "region/giou"} <= set(r) and "region/itc" not in r for r in records)
    weights, initial = (
        load_file(str(export(frozen, frozen / "model") / "model.safetensors")),
        load_file(str(start / "model.safetensors")),
    )
    assert sorted(set(weights) - set(initial)) == sorted(BOX_HEAD)
    for name, tensor in initial.items():
        assert torch.equal(weights[name], tensor), name

    trained = tmp_path / "trained"
    run_pretrain(1, overrides(region_world, trained, **stage, **{"train.max_steps": 40, "train.save_every": 40,
                                                                  "train.optimizer.lr": 3e-4}))  # fmt: skip
    giou = [r["region/giou"] for r in metrics(trained)]
    assert sum(giou[-5:]) / 5 < sum(giou[:5]) / 5, giou
