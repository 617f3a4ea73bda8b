"""The frozen open_clip CLIP the MLA recipe extends: building it from a model name / pretrained tag / custom config,
its English tokenizer, and reaching into its text tower.

Both open_clip layouts are handled: ``CLIP`` (text tower parts on the model itself) and ``CustomTextCLIP`` with an
open_clip ``TextTransformer`` (``model.text``). CLIPs whose text tower is a Hugging Face encoder are refused: MLA
inserts acquirers into open_clip's residual attention blocks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from cclm.config import ConfigError
from cclm.model.vision import CLIP_MEAN, CLIP_STD

log = logging.getLogger(__name__)


def build_clip(clip_cfg) -> nn.Module:
    """An open_clip CLIP from ``ClipConfig``: a built-in/hub name (with an optional pretrained tag or local file),
    or a custom ``model_cfg`` (with an optional local checkpoint in ``pretrained``)."""
    import open_clip

    model_cfg = clip_cfg.model_cfg or {}
    if OmegaConf.is_config(model_cfg):
        model_cfg = OmegaConf.to_container(model_cfg, resolve=True)
    model_cfg = dict(model_cfg)
    if model_cfg:
        unknown = set(model_cfg) - {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale"}
        if unknown or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(model_cfg):
            raise ConfigError(
                "clip.model_cfg must hold embed_dim, vision_cfg and text_cfg (open_clip's model config); "
                f"unexpected keys: {sorted(unknown)}"
            )
        if "hf_model_name" in model_cfg["text_cfg"]:
            raise ConfigError("clip.model_cfg: Hugging Face text towers are not supported by MLA")
        clip = open_clip.model.CLIP(**model_cfg)
        if clip_cfg.pretrained:
            open_clip.load_checkpoint(clip, clip_cfg.pretrained)
        return clip
    if clip_cfg.name.startswith(("hf-hub:", "local-dir:")):
        return open_clip.create_model(clip_cfg.name)
    if open_clip.get_model_config(clip_cfg.name) is None:
        raise ConfigError(
            f"clip.name: unknown open_clip model '{clip_cfg.name}'; see open_clip.list_models()"
        )
    return open_clip.create_model(clip_cfg.name, pretrained=clip_cfg.pretrained)


def build_clip_tokenizer(clip_cfg, context_length: int) -> Callable[[list[str]], torch.Tensor]:
    """texts -> [B, context_length] token ids for the frozen English path: open_clip's tokenizer of the model, a
    named open_clip tokenizer, or ``hf:<name or folder>`` for a CLIP trained with a Hugging Face tokenizer (its
    ``text_cfg`` then sets ``pool_type: eos``, ``eos_id`` and ``pad_id`` to match)."""
    import open_clip

    if clip_cfg.tokenizer and clip_cfg.tokenizer.startswith("hf:"):
        return HFClipTokenizer(clip_cfg.tokenizer[len("hf:") :], context_length)
    if clip_cfg.tokenizer:
        return open_clip.get_tokenizer(clip_cfg.tokenizer, context_length=context_length)
    if clip_cfg.model_cfg:
        return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
    return open_clip.get_tokenizer(clip_cfg.name, context_length=context_length)


class HFClipTokenizer:
    """A Hugging Face tokenizer with open_clip's calling convention: fixed-length [B, context_length] ids."""

    def __init__(self, name_or_path: str, context_length: int):
        from cclm.data.tokenize import load_tokenizer

        self.tokenizer, self.context_length = load_tokenizer(name_or_path), context_length

    def __call__(self, texts: list[str] | str) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        enc = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.context_length, return_tensors="pt"
        )
        return enc["input_ids"].long()


@dataclass
class TextTower:
    """The pieces of a CLIP text tower that MLA runs block by block (all owned by the CLIP module)."""

    token_embedding: nn.Embedding
    positional_embedding: torch.Tensor
    blocks: nn.ModuleList
    batch_first: bool
    ln_final: nn.Module
    text_projection: Any  # Parameter [width, dim], nn.Linear, or None
    attn_mask: torch.Tensor | None  # causal additive mask [ctx, ctx] or None
    pool_type: str
    eos_id: int | None

    @property
    def width(self) -> int:
        return int(self.token_embedding.weight.shape[1])

    @property
    def context_length(self) -> int:
        return int(self.positional_embedding.shape[0])

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.text_projection is None:
            return pooled
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(pooled)
        return pooled @ self.text_projection

    def run_blocks(self, x: torch.Tensor, after_block=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Embedded tokens [B, L, W] through every block; ``after_block(i, x)`` may rewrite the block output (the
        acquirers). Returns the final states and each block's output."""
        length = x.shape[1]
        mask = self.attn_mask[:length, :length] if self.attn_mask is not None else None
        states = []
        for i, block in enumerate(self.blocks):
            h = x if self.batch_first else x.transpose(0, 1)
            h = block(h, attn_mask=mask)
            x = h if self.batch_first else h.transpose(0, 1)
            if after_block is not None:
                x = after_block(i, x)
            states.append(x)
        return x, states


def text_tower(clip: nn.Module) -> TextTower:
    from open_clip.transformer import TextTransformer

    if isinstance(getattr(clip, "text", None), TextTransformer):
        t = clip.text
        if t.cls_emb is not None:
            raise ConfigError("CLIP text towers with a class embedding (CoCa) are not supported by MLA")
        return TextTower(
            t.token_embedding,
            t.positional_embedding,
            t.transformer.resblocks,
            t.transformer.batch_first,
            t.ln_final,
            t.text_projection,
            t.attn_mask,
            t.pool_type,
            getattr(t, "eos_id", None),
        )
    if hasattr(clip, "token_embedding") and hasattr(clip, "transformer"):
        return TextTower(
            clip.token_embedding,
            clip.positional_embedding,
            clip.transformer.resblocks,
            clip.transformer.batch_first,
            clip.ln_final,
            clip.text_projection,
            clip.attn_mask,
            getattr(clip, "text_pool_type", "argmax"),
            getattr(clip, "text_eos_id", None),
        )
    raise ConfigError(
        f"{type(clip).__name__}: no open_clip text transformer found (HF text towers unsupported)"
    )


def pool_english(tower: TextTower, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """open_clip's pooling of the English path (argmax / eos / first / last token)."""
    from open_clip.transformer import text_global_pool

    return text_global_pool(x, ids, tower.pool_type, eos_token_id=tower.eos_id)


def normalize_images(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [B,3,H,W] (the data pipeline's output) -> CLIP-normalised floats; float input is passed through."""
    if images.dtype != torch.uint8:
        return images.to(dtype)
    mean = torch.tensor(CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images.device).view(1, 3, 1, 1)
    return ((images.float() / 255.0 - mean) / std).to(dtype)
