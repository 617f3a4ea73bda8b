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
        return cls(
            mask_token_id=tokenizer.mask_token_id, vocab_size=len(tokenizer), special_ids=special, **cfg
        )


@functools.lru_cache(maxsize=8)
def _ordinary_ids(spec: MaskingSpec) -> torch.Tensor:
    keep = torch.ones(spec.vocab_size, dtype=torch.bool)
    keep[[i for i in spec.special_ids if i < spec.vocab_size]] = False
    return keep.nonzero().squeeze(1)


def _maskable(input_ids: torch.Tensor, spec: MaskingSpec) -> torch.Tensor:
    special = torch.tensor(spec.special_ids, dtype=input_ids.dtype)
    return ~torch.isin(input_ids, special)


def _choose_tokens(
    maskable: torch.Tensor, spec: MaskingSpec, generator: torch.Generator | None
) -> torch.Tensor:
    probs = torch.full(maskable.shape, spec.mask_prob)
    return (torch.bernoulli(probs, generator=generator) > 0) & maskable


def _choose_spans(
    maskable: torch.Tensor, spec: MaskingSpec, generator: torch.Generator | None
) -> torch.Tensor:
    """Cut each row's maskable tokens into consecutive chunks of geometric length (mean ``span_mean_length``),
    then take chunks in random order until ``mask_prob`` of the row is covered (the last chunk is cut to fit).
    Vectorised over the batch; the per-row budget uses stochastic rounding so the ratio holds on average."""
    batch, length = maskable.shape
    n_maskable = maskable.sum(dim=1)
    budget = torch.floor(n_maskable * spec.mask_prob + torch.rand(batch, generator=generator)).long()
    order = torch.cumsum(maskable.long(), dim=1) - 1  # index among the row's maskable tokens
    u = torch.rand(batch, length, generator=generator).clamp_min(1e-12)
    geo_p = 1.0 / spec.span_mean_length
    span_lengths = torch.floor(torch.log(u) / torch.log(torch.tensor(1.0 - geo_p))).long() + 1
    boundaries = torch.cumsum(span_lengths, dim=1)
    chunk = torch.searchsorted(boundaries, order.clamp_min(0), right=True)
    chunk_score = torch.rand(batch, length + 1, generator=generator)
    score = torch.gather(chunk_score, 1, chunk.clamp_max(length)).masked_fill(~maskable, float("inf"))
    sorted_scores = torch.sort(score, dim=1).values
    threshold = torch.gather(sorted_scores, 1, (budget - 1).clamp_min(0)[:, None])
    below = score < threshold
    ties = score == threshold
    still_needed = budget[:, None] - below.sum(dim=1, keepdim=True)
    chosen = below | (ties & (torch.cumsum(ties.long(), dim=1) <= still_needed))
    return chosen & maskable & (budget[:, None] > 0)


def mask_tokens(
    input_ids: torch.Tensor, spec: MaskingSpec, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(masked_ids, labels)`` for a [B, L] (or [L]) batch of token ids."""
    squeeze = input_ids.ndim == 1
    ids = input_ids.unsqueeze(0) if squeeze else input_ids
    maskable = _maskable(ids, spec)
    chosen = (
        _choose_spans(maskable, spec, generator) if spec.span else _choose_tokens(maskable, spec, generator)
    )
    if spec.max_masks is not None:
        rank = torch.cumsum(chosen.long(), dim=1)
        chosen &= rank <= spec.max_masks
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    action = torch.rand(ids.shape, generator=generator)
    to_mask = chosen & (action < spec.mask_token_frac)
    to_random = (
        chosen & (action >= spec.mask_token_frac) & (action < spec.mask_token_frac + spec.random_token_frac)
    )
    masked = ids.clone()
    masked[to_mask] = spec.mask_token_id
    ordinary = _ordinary_ids(spec)
    picks = ordinary[torch.randint(len(ordinary), (int(to_random.sum()),), generator=generator)]
    masked[to_random] = picks.to(masked.dtype)
    if squeeze:
        return masked[0], labels[0]
    return masked, labels
