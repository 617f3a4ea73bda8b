"""Output heads: ITM/TTM matching (one head for both views) and the MLM head tied to the word embeddings."""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.xlm_roberta.modeling_xlm_roberta import XLMRobertaLMHead


class MatchingHead(nn.Module):
    """2-way classifier on the fused [CLS] token (MLP as in X-VLM/CCLM)."""

    def __init__(self, hidden: int, eps: float = 1e-12):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(hidden, 2 * hidden),
            nn.LayerNorm(2 * hidden, eps=eps),
            nn.GELU(),
            nn.Linear(2 * hidden, 2),
        )

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.net(cls)


def build_mlm_head(config, word_embeddings: nn.Embedding) -> XLMRobertaLMHead:
    head = XLMRobertaLMHead(config)
    head.decoder.weight = word_embeddings.weight  # tied: one matrix for input and output tokens
    head.decoder.bias = (
        head.bias
    )  # as HF's MaskedLM ties them; otherwise `head.bias` would be a dead parameter
    return head
