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


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_every_file_of_a_saved_model_is_as_readable_as_the_umask_allows(tiny_model_cfg, tmp_path, umask):
    """safetensors 0.8 creates its files 0600: on a shared cluster the weights were the one file of a model
    folder a colleague could not read."""
    import os

    from cclm.weights_files import save_tensors

    before = os.umask(umask)
    try:
        CrossViewModel(tiny_model_cfg).save_pretrained(tmp_path / "model")
        save_tensors({"x": torch.zeros(2)}, tmp_path / "alone.safetensors")
    finally:
        os.umask(before)
    files = [*(tmp_path / "model").iterdir(), tmp_path / "alone.safetensors"]
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {
        f.name: oct(0o666 & ~umask) for f in files
    }
