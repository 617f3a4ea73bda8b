"""MLM masking for the conditional MLM objective (run in data-loader workers, on CPU).

Chooses ~``mask_prob`` of the maskable tokens (never special tokens or padding), then replaces 80% of them with
``<mask>``, 10% with a random ordinary token and keeps 10%. Labels are -100 everywhere else, so the loss sees
masked positions only. ``span=True`` masks whole spans with geometric lengths (SpanBERT-style).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class MaskingSpec:
    mask_token_id: int
    vocab_size: int
    special_ids: tuple[int, ...]
    mask_prob: float = 0.4
    mask_token_frac: float = 0.8
    random_token_frac: float = 0.1
    max_masks: int | None = None
    span: bool = False
    span_mean_length: float = 3.0

    @classmethod
    def from_tokenizer(cls, tokenizer, **cfg) -> MaskingSpec:
        special = tuple(sorted(set(tokenizer.all_special_ids)))
        return cls(mask_token_id=tokenizer.mask_token_id, vocab_size=len(tokenizer), special_ids=special, **cfg)


@functools.lru_cache(maxsize=8)
def _ordinary_ids(spec: MaskingSpec) -> torch.Tensor:
    keep = torch.ones(spec.vocab_size, dtype=torch.bool)
    keep[[i for i in spec.special_ids if i < spec.vocab_size]] = False
    return keep.nonzero().squeeze(1)


def _maskable(input_ids: torch.Tensor, spec: MaskingSpec) -> torch.Tensor:
    special = torch.tensor(spec.special_ids, dtype=input_ids.dtype)
    return ~torch.isin(input_ids, special)


def _choose_tokens(maskable: torch.Tensor, spec: MaskingSpec, generator: torch.Generator | None) -> torch.Tensor:
    probs = torch.full(maskable.shape, spec.mask_prob)
    return (torch.bernoulli(probs, generator=generator) > 0) & maskable


def _choose_spans(maskable: torch.Tensor, spec: MaskingSpec, generator: torch.Generator | None) -> torch.Tensor:
    # Span starts with probability p / mean_length; each span extends a geometric number of tokens, so the
    # expected masked fraction stays ~p. Vectorised by cumulative "remaining length" along the sequence.
    batch, length = maskable.shape
    start_prob = min(1.0, spec.mask_prob / spec.span_mean_length)
    starts = (torch.rand(batch, length, generator=generator) < start_prob) & maskable
    geo_p = 1.0 / spec.span_mean_length
    u = torch.rand(batch, length, generator=generator).clamp_min(1e-12)
    lengths = (torch.floor(torch.log(u) / torch.log(torch.tensor(1.0 - geo_p))) + 1).long() * starts
    chosen = torch.zeros_like(maskable)
    remaining = torch.zeros(batch, dtype=torch.long)
    for pos in range(length):  # loop over positions (<= max_length), not over samples
        remaining = torch.maximum(remaining, lengths[:, pos])
        chosen[:, pos] = remaining > 0
        remaining = (remaining - 1).clamp_min(0)
    return chosen & maskable


def mask_tokens(
    input_ids: torch.Tensor, spec: MaskingSpec, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(masked_ids, labels)`` for a [B, L] (or [L]) batch of token ids."""
    squeeze = input_ids.ndim == 1
    ids = input_ids.unsqueeze(0) if squeeze else input_ids
    maskable = _maskable(ids, spec)
    chosen = _choose_spans(maskable, spec, generator) if spec.span else _choose_tokens(maskable, spec, generator)
    if spec.max_masks is not None:
        rank = torch.cumsum(chosen.long(), dim=1)
        chosen &= rank <= spec.max_masks
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    action = torch.rand(ids.shape, generator=generator)
    to_mask = chosen & (action < spec.mask_token_frac)
    to_random = chosen & (action >= spec.mask_token_frac) & (action < spec.mask_token_frac + spec.random_token_frac)
    masked = ids.clone()
    masked[to_mask] = spec.mask_token_id
    ordinary = _ordinary_ids(spec)
    picks = ordinary[torch.randint(len(ordinary), (int(to_random.sum()),), generator=generator)]
    masked[to_random] = picks.to(masked.dtype)
    if squeeze:
        return masked[0], labels[0]
    return masked, labels
