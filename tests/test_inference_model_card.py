"""save_pretrained writes a README.md model card: architecture read from the model, training data and steps from
the run config, evaluation results when present; a hand-written README is never overwritten."""

from __future__ import annotations

import json

from cclm.config import PretrainConfig, StreamConfig, load_config, to_dict
from cclm.model import CrossViewModel
from cclm.model.card import MARKER, write_model_card


def test_card_describes_the_architecture(tmp_path, tiny_model_cfg):
    model = CrossViewModel(tiny_model_cfg, load_pretrained=False)
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert card.startswith(MARKER)
    n_params = sum(p.numel() for p in model.parameters())
    assert f"| parameters | {n_params / 1e6:.1f} M |" in card
    assert "2 XLM-R-style layers (encoder layers [0, 1])" in card
    assert "2 layers with cross-attention (encoder layers [2, 3])" in card
    assert f"hidden 64, 2 heads, vocabulary {tiny_model_cfg.text.encoder['vocab_size']}" in card
    assert "to 64 dims" in card and "32 px images" in card
    assert "No evaluation results" in card


def test_card_reports_training_run_and_evaluation_results(tmp_path, tiny_model_cfg):
    run = load_config(PretrainConfig, overrides=["train.max_steps=3000", "train.optimizer.lr=0.0002"])
    run.data.image_caption = StreamConfig(shards="/data/cc3m/shard-{000000..000099}.tar", batch_size=128)
    run.data.parallel_text = StreamConfig(
        shards="/data/wikimatrix/shard-{0000..0009}.tar", languages=["de", "fr"]
    )
    model = CrossViewModel(tiny_model_cfg, load_pretrained=False)
    extra = {
        "training": {"step": 2500, "checkpoint": "/runs/a/checkpoints/step_00002500", "run": to_dict(run)}
    }
    results = {"multi30k": {"de": {"txt_r1": 61.5, "img_r1": 50.25}, "fr": {"txt_r1": 58.0, "img_r1": 47.0}}}
    model.save_pretrained(tmp_path, extra={**extra, "eval_results": results})
    card = (tmp_path / "README.md").read_text()
    assert "- steps: 2500 (of max_steps 3000)" in card
    assert "lr 0.0002" in card
    assert "`/data/cc3m/shard-{000000..000099}.tar` (batch 128" in card
    assert "`/data/wikimatrix/shard-{0000..0009}.tar`" in card and "languages: de, fr" in card
    assert "| | txt_r1 | img_r1 |" in card
    assert "| multi30k / de | 61.50 | 50.25 |" in card

    # results written later (e.g. by an evaluation) are picked up when the card is written again
    (tmp_path / "eval_results.json").write_text(json.dumps({"xflickrco": {"ja": {"ir_r1": 33.3}}}))
    write_model_card(tmp_path, model, extra)
    assert "| xflickrco / ja | 33.30 |" in (tmp_path / "README.md").read_text()


def test_hand_written_readme_is_kept(tmp_path, tiny_model_cfg):
    (tmp_path / "README.md").write_text("# My model\nnotes\n")
    CrossViewModel(tiny_model_cfg, load_pretrained=False).save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "# My model\nnotes\n"
