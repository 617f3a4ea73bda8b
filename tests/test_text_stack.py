"""The text stack is HF XLM-R (position ids from padding_idx + 1), and the fusion stack is bidirectional."""

import pytest
import torch
from transformers import XLMRobertaConfig, XLMRobertaModel

from cclm.model.text import FusionStack, TextStack


def _encoder(attn="eager"):
    config = XLMRobertaConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
        pad_token_id=1,
    )
    config._attn_implementation = attn
    torch.manual_seed(0)
    return XLMRobertaModel(config, add_pooling_layer=False).eval()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_text_stack_with_all_layers_equals_hf_model(attn):
    encoder = _encoder(attn)
    stack = TextStack(encoder, [0, 1, 2, 3]).eval()
    ids = torch.tensor([[0, 10, 11, 12, 2, 1, 1], [0, 20, 21, 22, 23, 24, 2]])
    mask = (ids != 1).long()
    with torch.no_grad():
        ours = stack(ids, mask)
        reference = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    assert torch.allclose(ours[valid], reference[valid], atol=1e-5)


def test_position_ids_start_after_padding_idx():
    encoder = _encoder()
    ids = torch.tensor([[0, 10, 2, 1]])
    positions = encoder.embeddings.create_position_ids_from_input_ids(ids, padding_idx=1)
    assert positions.tolist() == [[2, 3, 4, 1]]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_fusion_self_attention_is_bidirectional(attn):
    encoder = _encoder(attn)
    fusion = FusionStack(encoder, [2, 3]).eval()
    hidden = torch.randn(1, 6, 32)
    memory = torch.randn(1, 5, 32)
    mask = torch.ones(1, 6, dtype=torch.long)
    changed = hidden.clone()
    changed[0, -1] += 1.0  # change only the LAST token
    with torch.no_grad():
        a = fusion(hidden, mask, memory)
        b = fusion(changed, mask, memory)
    # A causal stack would leave the first token's output untouched.
    assert (a[0, 0] - b[0, 0]).abs().max() > 1e-4


def test_fusion_layers_keep_pretrained_weights_and_add_cross_attention():
    encoder = _encoder()
    fusion = FusionStack(encoder, [3])
    src = encoder.encoder.layer[3].state_dict()
    dst = fusion.layers[0].state_dict()
    for key, value in src.items():
        assert torch.equal(dst[key], value), key
    cross = [k for k in dst if k.startswith("crossattention.")]
    assert cross and all(k not in src for k in cross)
    assert fusion.layers[0].crossattention.self.query.weight.std() > 0
