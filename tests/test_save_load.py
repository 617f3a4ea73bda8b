"""save_pretrained -> from_pretrained reproduces the model exactly, with no pickle involved."""

import json

import pytest
import torch

from cclm.model import CrossViewModel


def test_round_trip_gives_identical_outputs(tiny_model_cfg, tmp_path):
    model = CrossViewModel(tiny_model_cfg).eval()
    with torch.no_grad():
        model.temp.fill_(0.05)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    loaded = CrossViewModel.from_pretrained(tmp_path).eval()

    vocab = tiny_model_cfg.text.encoder["vocab_size"]
    batch = {
        "images": torch.randint(0, 255, (3, 3, 32, 32), dtype=torch.uint8),
        "text_ids": torch.randint(5, vocab, (3, 9)),
        "text_mask": torch.ones(3, 9, dtype=torch.long),
        "group_ids": torch.arange(3),
    }
    with torch.no_grad():
        for name in ("encode_image", "encode_text"):
            args = (batch["images"],) if name == "encode_image" else (batch["text_ids"], batch["text_mask"])
            for a, b in zip(getattr(model, name)(*args), getattr(loaded, name)(*args)):
                assert torch.equal(a, b)
        torch.manual_seed(0)
        out_a = model(batch, "image")
        torch.manual_seed(0)
        out_b = loaded(batch, "image")
    for key in out_a:
        assert torch.equal(out_a[key], out_b[key]), key
    # Tied MLM decoder survives the round trip as a tie, not a copy.
    assert loaded.mlm_head.decoder.weight is loaded.text.embeddings.word_embeddings.weight


def test_from_pretrained_rejects_missing_or_foreign_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        CrossViewModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "something-else"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not a cclm"):
        CrossViewModel.from_pretrained(tmp_path)


def test_bad_layer_selection_is_a_clear_error(tiny_model_cfg):
    tiny_model_cfg.text.fusion_layers = [2, 9]
    with pytest.raises(ValueError, match=r"fusion_layers.*\[9\]"):
        CrossViewModel(tiny_model_cfg)
