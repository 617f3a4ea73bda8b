"""Text and fusion stacks built from an HF XLM-R-style encoder.

The encoder (pretrained from a hub name / local folder, or randomly initialised from a config) is cut into two
stacks by configuration: ``text_layers`` run on text alone, ``fusion_layers`` get cross-attention added and attend
to a memory (image tokens or the other language's text tokens). We reuse HF's own layer classes unchanged.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers import XLMRobertaConfig, XLMRobertaModel
from transformers.models.xlm_roberta.modeling_xlm_roberta import XLMRobertaLayer


def load_encoder(
    name_or_path: str | None, overrides: dict[str, Any], attn_implementation: str
) -> XLMRobertaModel:
    """The full HF encoder, pretrained when a name/path is given, else random from ``overrides``."""
    if name_or_path:
        return XLMRobertaModel.from_pretrained(
            name_or_path, add_pooling_layer=False, attn_implementation=attn_implementation, **overrides
        )
    config = XLMRobertaConfig(**overrides)
    config._attn_implementation = attn_implementation
    return XLMRobertaModel(config, add_pooling_layer=False)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, L] 0/1 mask -> [B, 1, 1, L] additive mask. Always passed explicitly: with HF's ``is_decoder`` layers
    and ``sdpa``, a missing mask would silently make the fusion self-attention causal."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class TextStack(nn.Module):
    """Word/position embeddings (XLM-R position ids start at padding_idx + 1) and the text-only layers."""

    def __init__(self, encoder: XLMRobertaModel, layer_ids: list[int]):
        super().__init__()
        self.config = encoder.config
        self.embeddings = encoder.embeddings
        self.layers = nn.ModuleList([encoder.encoder.layer[i] for i in layer_ids])
        self.gradient_checkpointing = False

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(input_ids=input_ids)
        mask = additive_mask(attention_mask, hidden.dtype)
        for layer in self.layers:
            hidden = _run(layer, self.gradient_checkpointing and self.training, hidden, mask)
        return hidden


class FusionStack(nn.Module):
    """Layers with self-attention over the query text and cross-attention to a memory sequence.

    The memory can be image tokens or text tokens of another language; the layers do not know which.
    Self-attention, FFN and norms come from the pretrained layers; cross-attention is new (randomly
    initialised, listed by :meth:`new_parameter_names`).
    """

    def __init__(self, encoder: XLMRobertaModel, layer_ids: list[int]):
        super().__init__()
        config = copy.deepcopy(encoder.config)
        config.is_decoder = True
        config.add_cross_attention = True
        self.config = config
        self.layers = nn.ModuleList()
        for i in layer_ids:
            layer = XLMRobertaLayer(config, layer_idx=i)
            missing, unexpected = layer.load_state_dict(encoder.encoder.layer[i].state_dict(), strict=False)
            assert not unexpected and all(k.startswith("crossattention.") for k in missing), (
                missing,
                unexpected,
            )
            layer.crossattention.apply(encoder._init_weights)
            self.layers.append(layer)
        self.gradient_checkpointing = False

    def new_parameter_names(self) -> list[str]:
        return [n for n, _ in self.named_parameters() if ".crossattention." in n]

    def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if memory_mask is None:
            memory_mask = torch.ones(memory.shape[:2], dtype=torch.long, device=memory.device)
        self_mask = additive_mask(attention_mask, hidden.dtype)
        cross_mask = additive_mask(memory_mask, hidden.dtype)
        for layer in self.layers:
            hidden = _run(
                layer, self.gradient_checkpointing and self.training, hidden, self_mask, memory, cross_mask
            )
        return hidden


def _run(layer: nn.Module, checkpoint: bool, hidden, mask, memory=None, memory_mask=None) -> torch.Tensor:
    kwargs = (
        {} if memory is None else {"encoder_hidden_states": memory, "encoder_attention_mask": memory_mask}
    )
    if checkpoint:
        return torch.utils.checkpoint.checkpoint(
            lambda h, m: layer(h, attention_mask=m, **kwargs), hidden, mask, use_reentrant=False
        )
    return layer(hidden, attention_mask=mask, **kwargs)
