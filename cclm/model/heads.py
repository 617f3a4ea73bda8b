"""Output heads: ITM/TTM matching (one head for both views) and the MLM head tied to the word embeddings, which
starts from the pretrained encoder's own ``lm_head`` when its checkpoint has one (as the CCLM reference's
``load_roberta_lm_head``)."""

from __future__ import annotations

import json

import torch
from torch import nn
from transformers.models.xlm_roberta.modeling_xlm_roberta import XLMRobertaLMHead

from cclm.config import HeadInit


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


def init_new_head(module: nn.Module, std: float = 0.02, how: HeadInit | str = HeadInit.normal) -> None:
    """Initialise a newly built head (a fine-tuning task's classifier): ``normal``: Linear weights normal(0,
    ``std``), zero biases, LayerNorms ones and zeros; ``torch_default``: left as built (nn.Linear's kaiming-uniform
    weights and uniform biases, as the reference's heads). Either draws from torch's global generator."""
    if HeadInit(how) == HeadInit.torch_default:
        return
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, std=std)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.LayerNorm):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


def build_mlm_head(config, word_embeddings: nn.Embedding) -> XLMRobertaLMHead:
    head = XLMRobertaLMHead(config)
    head.decoder.weight = word_embeddings.weight  # tied: one matrix for input and output tokens
    head.decoder.bias = (
        head.bias
    )  # as HF's MaskedLM ties them; otherwise `head.bias` would be a dead parameter
    return head


# Our head's state-dict names <- the suffixes of an HF XLM-R masked-LM checkpoint's lm_head tensors.
LM_HEAD_KEYS = {
    "dense.weight": "lm_head.dense.weight",
    "dense.bias": "lm_head.dense.bias",
    "layer_norm.weight": "lm_head.layer_norm.weight",
    "layer_norm.bias": "lm_head.layer_norm.bias",
    "bias": "lm_head.bias",
}


def pretrained_lm_head(name_or_path: str) -> dict[str, torch.Tensor] | None:
    """The ``lm_head`` tensors (transform dense, LayerNorm, output bias) of an HF checkpoint -- a local folder or
    a Hub repository in the cache -- under :func:`build_mlm_head`'s names; None when the checkpoint has no
    ``lm_head`` (an encoder saved without its masked-LM head). Reads only those tensors."""
    from safetensors import safe_open
    from transformers.utils import cached_file

    def find(filename: str) -> str | None:
        return cached_file(
            name_or_path,
            filename,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )

    wanted = set(LM_HEAD_KEYS.values())
    index = find("model.safetensors.index.json")
    if index:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        shards = {weight_map[k] for k in wanted if k in weight_map}
        files = [find(shard) for shard in sorted(shards)]
    else:
        files = [find("model.safetensors")]
    tensors: dict[str, torch.Tensor] = {}
    for path in (p for p in files if p):
        with safe_open(path, framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys() if k in wanted})
    if not any(files):
        binary = find("pytorch_model.bin")
        if binary:
            state = torch.load(binary, map_location="cpu", weights_only=True)
            tensors = {k: v for k, v in state.items() if k in wanted}
    if not tensors:
        return None
    missing = wanted - set(tensors)
    if missing:
        raise ValueError(f"{name_or_path}: the checkpoint's lm_head lacks {sorted(missing)}")
    return {ours: tensors[theirs] for ours, theirs in LM_HEAD_KEYS.items()}
