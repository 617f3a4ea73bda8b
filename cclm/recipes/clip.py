"""The frozen open_clip CLIP the MLA recipe extends: building it from a model name / pretrained tag / custom config,
its English tokenizer, and reaching into its text tower.

Both open_clip layouts are handled: ``CLIP`` (text tower parts on the model itself) and ``CustomTextCLIP`` with an
open_clip ``TextTransformer`` (``model.text``). CLIPs whose text tower is a Hugging Face encoder are refused: MLA
inserts acquirers into open_clip's residual attention blocks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
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
    try:
        return open_clip.create_model(clip_cfg.name, pretrained=clip_cfg.pretrained)
    except (OSError, RuntimeError) as err:  # a tag open_clip does not know, or weights it cannot fetch
        if not clip_cfg.pretrained:
            raise
        tags = open_clip.list_pretrained_tags_by_model(clip_cfg.name)
        raise ConfigError(
            f"clip.pretrained '{clip_cfg.pretrained}' of {clip_cfg.name}: {_first_line(err)}. Use one of its "
            f"tags {tags} (downloaded once into the Hugging Face cache; offline, HF_HUB_OFFLINE=1 reads the "
            "cache) or the path of a checkpoint file"
        ) from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def build_clip_tokenizer(
    clip_cfg, context_length: int, vocab_size: int | None = None
) -> Callable[[list[str]], torch.Tensor]:
    """texts -> [B, context_length] token ids for the frozen English path: open_clip's tokenizer of the model, a
    named open_clip tokenizer, or ``hf:<name or folder>`` for a CLIP trained with a Hugging Face tokenizer (its
    ``text_cfg`` then sets ``pool_type: eos``, ``eos_id`` and ``pad_id`` to match). ``vocab_size``: the CLIP's
    token table, which a Hugging Face tokenizer must fit."""
    import open_clip

    if clip_cfg.tokenizer and clip_cfg.tokenizer.startswith("hf:"):
        tokenizer = HFClipTokenizer(clip_cfg.tokenizer[len("hf:") :], context_length)
        if vocab_size is not None and len(tokenizer.tokenizer) > vocab_size:
            raise ConfigError(
                f"clip.tokenizer {clip_cfg.tokenizer} has {len(tokenizer.tokenizer)} tokens, more than the CLIP's "
                f"token table ({vocab_size}, text_cfg.vocab_size): train the tokenizer with a vocabulary that fits"
            )
        return tokenizer
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


class ClipContrastive(nn.Module):
    """English image-text training of an open_clip CLIP with the project's contrastive loss (open_clip's
    ``ClipLoss``, gathered across ranks): fitting the synthetic world's English CLIP (every part and the
    temperature train) and MLA's English fine-tuning (``parts`` train, the CLIP's temperature stays)."""

    def __init__(
        self,
        clip: nn.Module,
        tokenize: Callable[[list[str]], torch.Tensor],
        parts: Sequence[str] = ("text", "vision"),
        train_temperature: bool = False,
    ):
        super().__init__()
        self.clip, self.tokenize = clip, tokenize
        unknown = set(map(str, parts)) - {"text", "vision"}
        if unknown or not parts:
            raise ConfigError(f"CLIP parts to train must be among ['text', 'vision'], got {list(parts)}")
        for name, param in clip.named_parameters():
            if name in ("logit_scale", "logit_bias"):
                param.requires_grad_(train_temperature and name == "logit_scale")
            else:
                part = "vision" if name.startswith("visual.") else "text"
                param.requires_grad_(part in set(map(str, parts)))
        self.train_temperature = train_temperature
        # DeepSpeed's engine cannot broadcast 0-dim parameters (logit_scale): [1] while training, 0-dim again
        # in freeze(), so the CLIP keeps open_clip's layout.
        self._scalars = [name for name, param in clip.named_parameters() if param.dim() == 0]
        for name in self._scalars:
            self._reshape(name, (1,))

    def _reshape(self, name: str, shape: tuple[int, ...]) -> None:
        owner, _, leaf = name.rpartition(".")
        module = self.clip.get_submodule(owner) if owner else self.clip
        old = getattr(module, leaf)
        setattr(module, leaf, nn.Parameter(old.detach().reshape(shape), requires_grad=old.requires_grad))

    def bounded_parameters(self) -> list[tuple[nn.Parameter, float, float]]:
        """The learnable logit scale and open_clip's cap on it, when it trains: the trainer clamps it after each
        update, in the optimizer's copy too (:func:`cclm.runtime.optim.clamp_bounded`)."""
        return [(self.clip.logit_scale, 0.0, math.log(100))] if self.train_temperature else []

    def forward(self, batch: dict[str, Any], stage: str = "english") -> dict[str, torch.Tensor]:
        from cclm import losses

        scale = self.clip.logit_scale
        if self.train_temperature:
            with torch.no_grad():
                scale.clamp_(0, math.log(100))  # open_clip's cap on the learnable scale
        images = normalize_images(batch["images"], scale.dtype)
        texts = self.tokenize(list(batch["texts"])).to(images.device)
        image_feat = torch.nn.functional.normalize(self.clip.encode_image(images).float(), dim=-1)
        text_feat = torch.nn.functional.normalize(self.clip.encode_text(texts).float(), dim=-1)
        itc = losses.contrastive_loss(image_feat, text_feat, 1.0 / scale.float().exp().squeeze())
        return {"itc": itc, "loss": itc}

    def freeze(self) -> nn.Module:
        """The CLIP frozen again after training (eval mode), returned."""
        for name in self._scalars:
            self._reshape(name, ())
        self._scalars = []
        self.clip.requires_grad_(False)
        return self.clip.eval()
