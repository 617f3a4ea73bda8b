"""The model side of the CCLM reference recipe: which pretrained layers fill the stacks, the MLM head from the
encoder's own ``lm_head``, and a temperature clamped in place (zengyan-97/CCLM models/xvlm.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import XLMRobertaConfig, XLMRobertaForMaskedLM, XLMRobertaModel

from cclm.config import ModelConfig, from_dict, to_dict
from cclm.model import CrossViewModel

ENCODER = dict(
    vocab_size=120,
    hidden_size=32,
    num_hidden_layers=8,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=40,
    type_vocab_size=1,
    pad_token_id=1,
)


def _pretrained_folder(tmp_path, masked_lm: bool, safe: bool = True):
    torch.manual_seed(0)
    config = XLMRobertaConfig(**ENCODER)
    model = XLMRobertaForMaskedLM(config) if masked_lm else XLMRobertaModel(config, add_pooling_layer=False)
    if masked_lm:  # distinct values, so a head left at init could not pass for the loaded one
        with torch.no_grad():
            for p in model.lm_head.parameters():
                p.normal_()
    folder = tmp_path / ("mlm" if masked_lm else "encoder")
    model.save_pretrained(folder, safe_serialization=safe)
    return folder, model


def _cfg(tiny_model_cfg, folder, text_layers, fusion_layers) -> ModelConfig:
    data = to_dict(tiny_model_cfg)
    data["text"].update(
        name_or_path=str(folder), encoder={}, text_layers=text_layers, fusion_layers=fusion_layers
    )
    return from_dict(ModelConfig, data)


@pytest.mark.parametrize("safe", [True, False])
def test_mlm_head_starts_from_the_pretrained_lm_head(tmp_path, tiny_model_cfg, safe):
    folder, source = _pretrained_folder(tmp_path, masked_lm=True, safe=safe)
    model = CrossViewModel(_cfg(tiny_model_cfg, folder, [1, 3], [5, 7]))
    head = source.lm_head
    for ours, theirs in [
        (model.mlm_head.dense.weight, head.dense.weight),
        (model.mlm_head.dense.bias, head.dense.bias),
        (model.mlm_head.layer_norm.weight, head.layer_norm.weight),
        (model.mlm_head.layer_norm.bias, head.layer_norm.bias),
        (model.mlm_head.bias, head.bias),
    ]:
        torch.testing.assert_close(ours, theirs)
    assert model.mlm_head.decoder.bias is model.mlm_head.bias  # still tied after loading
    assert model.mlm_head.decoder.weight is model.text.embeddings.word_embeddings.weight
    assert not any(n.startswith("mlm_head.") for n in model.new_parameter_names())  # the reference's lr x1


def test_mlm_head_of_an_encoder_without_lm_head_is_new(tmp_path, tiny_model_cfg, caplog):
    folder, _ = _pretrained_folder(tmp_path, masked_lm=False)
    model = CrossViewModel(_cfg(tiny_model_cfg, folder, [0, 1], [2, 3]))
    assert "has no lm_head" in caplog.text
    new = set(model.new_parameter_names())
    assert {"mlm_head.dense.weight", "mlm_head.layer_norm.weight", "mlm_head.bias"} <= new
    assert "text.embeddings.word_embeddings.weight" not in new


def test_every_other_layer_fills_the_stacks_as_the_reference(tmp_path, tiny_model_cfg):
    """Reference mapper {1:0, 3:1, ..., 23:11} on a 24-layer encoder; here 8 layers -> text 1,3, fusion 5,7."""
    folder, source = _pretrained_folder(tmp_path, masked_lm=True)
    model = CrossViewModel(_cfg(tiny_model_cfg, folder, [1, 3], [5, 7]))
    layers = source.roberta.encoder.layer
    for ours, theirs in zip([*model.text.layers, *model.fusion.layers], [1, 3, 5, 7], strict=True):
        torch.testing.assert_close(
            ours.attention.self.query.weight, layers[theirs].attention.self.query.weight
        )


def _image_batch(model, batch=4):
    torch.manual_seed(1)
    size = model.cfg.vision.image_size
    ids = torch.randint(5, model.encoder_config.vocab_size, (batch, 7))
    ids[:, 0], ids[:, -1] = 0, 2
    return {
        "images": torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8),
        "text_ids": ids,
        "text_mask": torch.ones_like(ids),
        "group_ids": torch.arange(batch),
    }


def test_temperature_is_clamped_in_place_and_keeps_its_gradient(tiny_model_cfg):
    """At a bound the reference's in-place clamp leaves the temperature a gradient; a clamp inside the graph
    would give it zero and it would stay at the bound forever."""
    cfg = from_dict(ModelConfig, to_dict(tiny_model_cfg))
    cfg.objectives.itm_weight = cfg.objectives.mlm_weight = 0.0
    model = CrossViewModel(cfg, load_pretrained=False).train()
    with torch.no_grad():
        model.temp.fill_(cfg.objectives.temp_max * 3)  # beyond the upper bound, e.g. after an optimizer step
    out = model(_image_batch(model), "image")
    assert model.temp.item() == pytest.approx(cfg.objectives.temp_max)  # clamped in place
    out["loss"].backward()
    assert model.temp.grad is not None and model.temp.grad.abs().item() > 0
    # evaluation reads a clamped copy and leaves the parameter alone
    with torch.no_grad():
        model.temp.fill_(cfg.objectives.temp_min / 10)
    model.eval()
    model(_image_batch(model), "image")
    assert model.temp.item() == pytest.approx(cfg.objectives.temp_min / 10)


def test_reference_position_ids_read_row_i_of_the_pretrained_table_for_position_i(tmp_path, tiny_model_cfg):
    """The reference runs a BertModel over XLM-R's weights, numbering positions 0, 1, ...; HF's XLM-R numbers
    them from padding_idx + 1. position_ids=reference moves the table so position i reads pretrained row i."""
    folder, source = _pretrained_folder(tmp_path, masked_lm=True)
    pretrained = source.roberta.embeddings.position_embeddings.weight
    cfg = _cfg(tiny_model_cfg, folder, [1, 3], [5, 7])
    cfg.text.position_ids = "reference"
    ours = CrossViewModel(cfg).text.embeddings
    start = ours.padding_idx + 1
    ids = torch.tensor([[0, 9, 10, 11, 2]])
    positions = ours.create_position_ids_from_input_ids(ids, ours.padding_idx)
    assert positions.tolist() == [list(range(start, start + 5))]  # HF's numbering, unchanged
    torch.testing.assert_close(ours.position_embeddings(positions)[0], pretrained[:5])
    default = CrossViewModel(_cfg(tiny_model_cfg, folder, [1, 3], [5, 7])).text.embeddings
    torch.testing.assert_close(default.position_embeddings.weight, pretrained)


def test_two_forwards_before_one_backward_survive_the_in_place_clamp(tiny_model_cfg):
    """view_schedule=sum and gradient accumulation run a second forward (and clamp) before the first
    backward: the first graph must not hold the parameter that the clamp modifies."""
    model = CrossViewModel(from_dict(ModelConfig, to_dict(tiny_model_cfg)), load_pretrained=False).train()
    batch = _image_batch(model)
    total = model(batch, "image")["loss"] + model(batch, "image")["loss"]
    total.backward()
    assert model.temp.grad.abs().item() > 0
