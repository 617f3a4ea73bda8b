"""Text and fusion stacks built from an HF XLM-R-style encoder.

The encoder (pretrained from a hub name / local folder, or randomly initialised from a config) is cut into two
stacks by configuration: ``text_layers`` run on text alone, ``fusion_layers`` get cross-attention added and attend
to a memory (image tokens or the other language's text tokens). We reuse HF's own layer classes unchanged.

:func:`check_text_config` checks a user's ``model.text`` before anything is built: ``encoder`` fields against
XLMRobertaConfig, and that ``name_or_path`` / ``tokenizer`` can be loaded (a local folder, the Hugging Face cache, or
one request to the Hub, so that an offline machine gets an answer at once instead of retries).
"""

from __future__ import annotations

import copy
import difflib
import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import XLMRobertaConfig, XLMRobertaModel
from transformers.models.xlm_roberta.modeling_xlm_roberta import XLMRobertaLayer

from cclm.config import ConfigError

HUB_TIMEOUT_S = 10.0


def check_text_config(text_cfg: Any, key: str = "model.text") -> None:
    """Fail naming the key when ``encoder`` has a field that XLMRobertaConfig lacks, or when ``name_or_path`` or
    ``tokenizer`` is neither a local folder nor loadable from the Hub."""
    check_encoder_fields(dict(text_cfg.encoder), f"{key}.encoder")
    if text_cfg.name_or_path:
        check_pretrained_source(text_cfg.name_or_path, f"{key}.name_or_path")
    if text_cfg.tokenizer and text_cfg.tokenizer != text_cfg.name_or_path:
        check_pretrained_source(text_cfg.tokenizer, f"{key}.tokenizer")


def encoder_fields() -> set[str]:
    """Every field an XLMRobertaConfig takes: its own and PretrainedConfig's arguments and serialised keys."""
    names = set(XLMRobertaConfig().to_dict()) | set(XLMRobertaConfig.attribute_map)
    for cls in XLMRobertaConfig.__mro__:
        if "__init__" in vars(cls) and cls is not object:
            parameters = inspect.signature(cls.__init__).parameters.values()
            names |= {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    names.discard("self")
    return names


def check_encoder_fields(encoder: dict[str, Any], key: str = "model.text.encoder") -> None:
    """HF configs store unknown keyword arguments as attributes nobody reads: a misspelt field would silently
    train with the default, so every field must be one XLMRobertaConfig knows."""
    known = encoder_fields()
    for name in encoder:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"config key '{key}.{name}': not a field of XLMRobertaConfig{hint}")


def check_pretrained_source(name: str, key: str) -> None:
    """``name`` must be a local folder or a Hugging Face Hub repository that can be loaded now."""
    path = Path(name)
    if path.is_dir():
        return
    if path.exists():
        raise ConfigError(f"{key}={name!r}: a file, not a folder (give the folder that holds config.json)")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # a path, never a repository id
        raise ConfigError(f"{key}={name!r}: no such folder")
    if not loadable_from_hub(name):
        raise ConfigError(
            f"{key}={name!r}: not a local folder and not loadable from the Hugging Face Hub (offline?): "
            "download it and give the folder path"
        )


def loadable_from_hub(
    repo_id: str, filenames: tuple[str, ...] = ("config.json", "tokenizer_config.json")
) -> bool:
    """True when one of ``filenames`` of ``repo_id`` is in the local Hugging Face cache, or the Hub answers for the
    repository (one request: loading it would retry for half a minute before failing offline)."""
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError

    try:
        if any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in filenames):
            return True
        HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except HfHubHTTPError as err:  # the Hub answered: no such repository or no access, unless it is busy
        status = getattr(getattr(err, "response", None), "status_code", None)
        return status is not None and (status == 429 or status >= 500)
    except Exception:  # offline, unreachable, not a valid repository id
        return False
    return True


def load_encoder(
    name_or_path: str | None, overrides: dict[str, Any], attn_implementation: str
) -> XLMRobertaModel:
    """The full HF encoder, pretrained when a name/path is given, else random from ``overrides``."""
    if name_or_path:
        check_encoder_fields(overrides)
        check_pretrained_source(name_or_path, "model.text.name_or_path")
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
