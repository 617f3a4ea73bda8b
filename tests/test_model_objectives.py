"""One call computes every objective of a view, named; zero-weight objectives are skipped; no dead parameters."""

import pytest
import torch

from cclm.model import CrossViewModel


def _batches(vocab):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (4, 9), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    common = {
        "text_ids": ids,
        "text_mask": torch.ones_like(ids),
        "mlm_ids": ids,
        "mlm_labels": labels,
        "group_ids": torch.arange(4),
    }
    image = {**common, "images": torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8, generator=g)}
    text = {**common, "other_ids": ids.flip(0), "other_mask": torch.ones_like(ids)}
    return {"image": image, "text": text}


def test_each_view_returns_its_named_losses_and_their_weighted_sum(tiny_model_cfg):
    tiny_model_cfg.objectives.mlm_weight = 0.5
    model = CrossViewModel(tiny_model_cfg)
    batches = _batches(tiny_model_cfg.text.encoder["vocab_size"])
    for view, names in (("image", {"itc", "itm", "mlm"}), ("text", {"ttc", "ttm", "mlm"})):
        out = model(batches[view], view)
        assert set(out) == names | {"loss"}
        parts = [out[n] * (0.5 if n == "mlm" else 1.0) for n in names]
        assert torch.allclose(out["loss"], sum(parts))


def test_zero_weight_objectives_are_not_computed(tiny_model_cfg):
    tiny_model_cfg.objectives.itm_weight = 0.0
    tiny_model_cfg.objectives.mlm_weight = 0.0
    model = CrossViewModel(tiny_model_cfg)
    out = model(_batches(tiny_model_cfg.text.encoder["vocab_size"])["image"], "image")
    assert set(out) == {"itc", "loss"}
    tiny_model_cfg.objectives.itc_weight = 0.0
    with pytest.raises(ValueError, match="nothing to train"):
        CrossViewModel(tiny_model_cfg)(_batches(tiny_model_cfg.text.encoder["vocab_size"])["image"], "image")


def test_every_parameter_gets_a_gradient_from_the_two_views(tiny_model_cfg):
    model = CrossViewModel(tiny_model_cfg)
    batches = _batches(tiny_model_cfg.text.encoder["vocab_size"])
    (model(batches["image"], "image")["loss"] + model(batches["text"], "text")["loss"]).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, dead
    assert model.tied_parameter_aliases() == {"mlm_head.decoder.weight", "mlm_head.decoder.bias"}


def test_an_unmasked_image_memory_fuses_exactly_as_an_all_ones_mask(tiny_model_cfg):
    """Image tokens go to the fusion stack with no cross-attention mask (so SDPA may use its flash kernel);
    the result is the one an explicit all-ones mask gives."""
    torch.manual_seed(0)
    model = CrossViewModel(tiny_model_cfg, load_pretrained=False).eval()
    image = _batches(model.encoder_config.vocab_size)["image"]
    with torch.no_grad():
        text, _ = model.encode_text(image["text_ids"], image["text_mask"])
        memory, _ = model.encode_image(image["images"])
        ones = torch.ones(memory.shape[:2], dtype=torch.long)
        masked = model.fuse(text, image["text_mask"], memory, ones)
        unmasked = model.fuse(text, image["text_mask"], memory, None)
    torch.testing.assert_close(unmasked, masked, rtol=0, atol=1e-6)
