"""MLA: teach a frozen English CLIP new languages by "language acquisition" (Zhang et al. 2022).

    English text ──CLIP tokenizer──► CLIP token embedding ──► frozen CLIP blocks ─────────────────► English feature
    new language ──multilingual tokenizer──► MultilingualEmbedding ──► frozen blocks + Acquirers ──► feature
    image ──► frozen CLIP image tower ──► image feature

Only the multilingual embedding (a table, optionally initialised from a multilingual encoder's word embeddings,
projected to the CLIP text width) and the acquirers (a bottleneck adapter after every text block, one set shared
by all new languages or one per language) train. English keeps the untouched CLIP path, so English retrieval is
exactly the original model's.

Stage 1, NLT (Native Language Transfer), on parallel sentences: MSE between the frozen CLIP feature of the
English sentence and the acquirer path's feature of its translation; optionally also between every block's pooled
state (``layerwise_weight``) and a symmetric InfoNCE term between the two sets of features (``infonce_weight``).
Stage 2, LE (Language Exposure), on new-language captions: symmetric image-text InfoNCE against the frozen image
features at the CLIP's own (frozen) temperature; the acquirers train, the embedding only with
``le.train_embedding``. The downstream stage ``finetune_all`` is the same objective on retrieval captions.

The acquirer path pools the last real token (its end-of-sequence token): the CLIP text tower is causal, so only
that position has seen the whole sentence, as CLIP's own EOT pooling does for English.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cclm import losses
from cclm.config import ConfigError
from cclm.recipes.clip import (
    TextTower,
    build_clip,
    build_clip_tokenizer,
    normalize_images,
    pool_english,
    text_tower,
)

log = logging.getLogger(__name__)
STAGES = ("nlt", "le", "finetune_all")
SHARED = "shared"
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


class Acquirer(nn.Module):
    """Bottleneck adapter on a block's output: ``x + up(act(down(norm(x))))`` (``norm`` only with
    ``layer_norm``). ``up`` starts at zero, so an untrained acquirer leaves the frozen block's output unchanged."""

    def __init__(self, width: int, bottleneck: int, activation: str = "relu", layer_norm: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(width) if layer_norm else nn.Identity()
        self.down = nn.Linear(width, bottleneck)
        self.act = ACTIVATIONS[str(activation)]()
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(self.norm(x))))


class MultilingualEmbedding(nn.Module):
    """Token table of the multilingual tokenizer, projected to the CLIP text width."""

    def __init__(self, vocab_size: int, dim: int, width: int, init: torch.Tensor | None = None):
        super().__init__()
        self.table = nn.Embedding(vocab_size, dim)
        if init is not None:
            if init.shape[0] < vocab_size:
                raise ConfigError(
                    f"embedding.init_from has {init.shape[0]} rows, fewer than the tokenizer's {vocab_size} tokens"
                )
            self.table.weight.data.copy_(init[:vocab_size])
        else:
            nn.init.normal_(self.table.weight, std=0.02)
        self.proj = nn.Linear(dim, width) if dim != width else nn.Identity()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.table(ids))


def pretrained_word_embeddings(name: str) -> torch.Tensor:
    """Input word embeddings of a (multilingual) HF encoder, e.g. mBERT or XLM-R."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(name)
    return model.get_input_embeddings().weight.detach().float().clone()


class MLAModel(nn.Module):
    def __init__(
        self, clip: nn.Module, clip_tokenize, tokenizer, cfg, word_embeddings: torch.Tensor | None = None
    ):
        """``cfg`` is an :class:`cclm.config.MLARecipeConfig` (embedding, adapters, languages, source_language)."""
        super().__init__()
        if not list(cfg.languages):
            raise ConfigError("languages: name at least one new language")
        if cfg.source_language in cfg.languages:
            raise ConfigError(
                f"languages: '{cfg.source_language}' is the CLIP's own language (source_language)"
            )
        # The CLIP is held, not registered as a sub-module: the engine, optimizer and checkpoints see only what
        # MLA trains (a ViT-L CLIP is not rewritten with every checkpoint), and its weights cannot change.
        object.__setattr__(self, "clip", clip)
        for param in clip.parameters():
            param.requires_grad_(False)
        clip.eval()
        self.clip_tokenize, self.tokenizer = clip_tokenize, tokenizer
        self.source_language, self.languages = cfg.source_language, list(cfg.languages)
        tower = self.tower
        dim = (
            int(word_embeddings.shape[1])
            if word_embeddings is not None
            else (cfg.embedding.dim or tower.width)
        )
        self.embedding = MultilingualEmbedding(len(tokenizer), dim, tower.width, word_embeddings)
        keys = [SHARED] if cfg.adapters.shared else self.languages
        adapters = cfg.adapters
        self.acquirers = nn.ModuleDict(
            {
                key: nn.ModuleList(
                    Acquirer(tower.width, adapters.bottleneck, adapters.activation, adapters.layer_norm)
                    for _ in tower.blocks
                )
                for key in keys
            }
        )
        self.max_length = min(int(cfg.embedding.max_length), tower.context_length)
        self.nlt_cfg = cfg.nlt
        # Whether the embedding trains in each stage (the acquirers always do).
        self.embedding_trains = {
            "nlt": True,
            "le": bool(cfg.le.train_embedding),
            "finetune_all": bool(cfg.finetune.all.train_embedding),
        }

    @classmethod
    def build(cls, cfg) -> MLAModel:
        from cclm.data.tokenize import load_tokenizer

        clip = build_clip(cfg.clip)
        tokenizer = load_tokenizer(cfg.embedding.tokenizer)
        init = pretrained_word_embeddings(cfg.embedding.init_from) if cfg.embedding.init_from else None
        tower = text_tower(clip)
        clip_tokenize = build_clip_tokenizer(
            cfg.clip, tower.context_length, tower.token_embedding.num_embeddings
        )
        return cls(clip, clip_tokenize, tokenizer, cfg, init)

    # ------------------------------------------------------------------------------------------------- parts
    @property
    def tower(self) -> TextTower:
        return text_tower(self.clip)

    @property
    def image_size(self) -> int:
        size = self.clip.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def _apply(self, fn, recurse: bool = True):
        """Device moves reach the held CLIP too; dtype casts (a bf16 engine) do not: the frozen CLIP stays in
        its own precision, bit for bit; :meth:`encode_target` casts between it and the trained parts."""
        super()._apply(fn, recurse)
        target = fn(torch.empty(0))
        self.clip.to(device=target.device)
        return self

    def set_stage(self, stage: str) -> None:
        """Only what ``stage`` trains has ``requires_grad``: the acquirers, and the embedding where it trains."""
        if stage not in STAGES:
            raise ValueError(f"unknown MLA stage '{stage}', expected one of {STAGES}")
        self.acquirers.requires_grad_(True)
        self.embedding.requires_grad_(self.embedding_trains[stage])

    def trainable_parameter_count(self) -> tuple[int, int]:
        """(trained, total): every parameter MLA trains in some stage (embedding + acquirers), and the total
        with the frozen CLIP."""
        trained = sum(p.numel() for p in self.parameters())
        return trained, trained + sum(p.numel() for p in self.clip.parameters())

    def _clip_dtype(self) -> torch.dtype:
        return self.tower.token_embedding.weight.dtype

    def _acquire(self, acquirer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        weight_dtype = acquirer.down.weight.dtype
        return acquirer(h.to(weight_dtype)).to(h.dtype)

    def acquirer_key(self, lang: str) -> str:
        if SHARED in self.acquirers:
            return SHARED
        if lang not in self.acquirers:
            raise ValueError(f"no acquirers for language '{lang}' (this model has {sorted(self.acquirers)})")
        return lang

    # ------------------------------------------------------------------------------------------------ encoders
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised frozen image features."""
        with torch.no_grad():
            return F.normalize(self.clip.encode_image(normalize_images(images)), dim=-1)

    def encode_source(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Frozen English path, run block by block: (feature, pooled state of every block). Same numbers as
        ``clip.encode_text``."""
        tower = self.tower
        x = tower.token_embedding(ids) + tower.positional_embedding[: ids.shape[1]]
        x, states = tower.run_blocks(x)
        feature = tower.project(pool_english(tower, tower.ln_final(x), ids))
        return feature, [pool_english(tower, s, ids) for s in states]

    def encode_target(
        self, ids: torch.Tensor, mask: torch.Tensor, lang: str
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Acquirer path for one language's ids: (feature, pooled state of every block)."""
        tower = self.tower
        ids, mask = ids[:, : self.max_length], mask[:, : self.max_length]
        acquirers = self.acquirers[self.acquirer_key(lang)]
        x = self.embedding(ids).to(self._clip_dtype()) + tower.positional_embedding[: ids.shape[1]]
        x, states = tower.run_blocks(x, after_block=lambda i, h: self._acquire(acquirers[i], h))
        rows = torch.arange(ids.shape[0], device=ids.device)
        last = (mask.sum(dim=1) - 1).clamp(min=0)
        feature = tower.project(tower.ln_final(x)[rows, last])
        return feature, [s[rows, last] for s in states]

    def encode_target_by_language(
        self, ids: torch.Tensor, mask: torch.Tensor, langs: list[str]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``encode_target`` for a batch mixing languages (one pass per acquirer set)."""
        keys = [self.acquirer_key(lang) for lang in langs]
        if len(set(keys)) == 1:
            return self.encode_target(ids, mask, langs[0])
        feature, states = None, None
        for key in sorted(set(keys)):
            rows = torch.tensor([i for i, k in enumerate(keys) if k == key], device=ids.device)
            lang = langs[int(rows[0])]
            f, s = self.encode_target(ids[rows], mask[rows], lang)
            if feature is None:
                feature = f.new_zeros((ids.shape[0], f.shape[1]))
                states = [x.new_zeros((ids.shape[0], x.shape[1])) for x in s]
            feature = feature.index_copy(0, rows, f)
            states = [full.index_copy(0, rows, part) for full, part in zip(states, s)]
        return feature, states

    @torch.no_grad()
    def encode_texts(self, texts: list[str], lang: str, device=None) -> torch.Tensor:
        """Normalised features of raw texts in ``lang`` (English through the untouched CLIP)."""
        device = device or next(self.parameters()).device
        if lang == self.source_language:
            return F.normalize(self.clip.encode_text(self.clip_tokenize(texts).to(device)), dim=-1)
        enc = self.tokenizer(
            texts, padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        feature, _ = self.encode_target(enc["input_ids"].to(device), enc["attention_mask"].to(device), lang)
        return F.normalize(feature, dim=-1)

    def temperature(self) -> torch.Tensor:
        return 1.0 / self.clip.logit_scale.detach().exp()

    # ---------------------------------------------------------------------------------------------- objectives
    def forward(self, batch: dict[str, Any], stage: str) -> dict[str, torch.Tensor]:
        if stage == "nlt":
            return self.nlt_losses(batch)
        if stage in ("le", "finetune_all"):
            return self.le_losses(batch)
        raise ValueError(f"unknown MLA stage '{stage}', expected one of {STAGES}")

    def _parallel_sides(self, batch: dict[str, Any]):
        """Split a text-view batch into (English texts, target ids, target mask, target langs), whichever side
        the pipeline put English on."""
        src = self.source_language
        english_first = [lang == src for lang in batch["langs"]]
        english_second = [lang == src for lang in batch["other_langs"]]
        if not all(a or b for a, b in zip(english_first, english_second)):
            bad = next(i for i, (a, b) in enumerate(zip(english_first, english_second)) if not (a or b))
            raise ValueError(
                f"parallel pair {batch['langs'][bad]}-{batch['other_langs'][bad]} has no '{src}' side; filter "
                "the stream to source <-> new-language pairs"
            )
        english = [
            t if first else o for t, o, first in zip(batch["texts"], batch["other_texts"], english_first)
        ]
        langs = [
            o if first else t for t, o, first in zip(batch["langs"], batch["other_langs"], english_first)
        ]
        width = max(batch["text_ids"].shape[1], batch["other_ids"].shape[1])
        first = torch.tensor(english_first, device=batch["text_ids"].device)[:, None]
        pad = self.tokenizer.pad_token_id
        ids = torch.where(first, _pad(batch["other_ids"], width, pad), _pad(batch["text_ids"], width, pad))
        mask = torch.where(first, _pad(batch["other_mask"], width, 0), _pad(batch["text_mask"], width, 0))
        return english, ids, mask, langs

    def nlt_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        cfg = self.nlt_cfg
        english, ids, mask, langs = self._parallel_sides(batch)
        with torch.no_grad():
            teacher, teacher_states = self.encode_source(self.clip_tokenize(english).to(ids.device))
        student, student_states = self.encode_target_by_language(ids, mask, langs)
        out = {"mse": F.mse_loss(student.float(), teacher.float())}
        total = cfg.mse_weight * out["mse"]
        if cfg.layerwise_weight:
            out["layerwise_mse"] = sum(
                F.mse_loss(s.float(), t.float()) for s, t in zip(student_states, teacher_states)
            ) / len(student_states)
            total = total + cfg.layerwise_weight * out["layerwise_mse"]
        if cfg.infonce_weight:
            out["infonce"] = losses.contrastive_loss(
                F.normalize(teacher, dim=-1), F.normalize(student, dim=-1), self.temperature()
            )
            total = total + cfg.infonce_weight * out["infonce"]
        out["loss"] = total
        return out

    def le_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        image_feat = self.encode_image(batch["images"])
        text, _ = self.encode_target_by_language(batch["text_ids"], batch["text_mask"], list(batch["langs"]))
        itc = losses.contrastive_loss(image_feat, F.normalize(text, dim=-1), self.temperature())
        return {"itc": itc, "loss": itc}

    # ------------------------------------------------------------------------------------------------ save
    def acquired_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what MLA trained (embedding + acquirers): all a user needs on top of the original CLIP."""
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}


def _pad(x: torch.Tensor, width: int, value: int) -> torch.Tensor:
    if x.shape[1] == width:
        return x
    return torch.cat([x, x.new_full((x.shape[0], width - x.shape[1]), value)], dim=1)
