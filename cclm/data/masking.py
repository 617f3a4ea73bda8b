"""MLM masking for the conditional MLM objective (run in data-loader workers, on CPU).

Two rules choose the positions (``MaskingSpec.rule``):

* ``bernoulli`` (the default): each maskable token (never a special token or padding) independently with
  probability ``mask_prob``; ``span=True`` instead masks whole spans of geometric length (SpanBERT-style) until
  ``mask_prob`` of the row's maskable tokens are covered.
* ``count`` (the CCLM reference's ``TextMaskingGenerator``): a row of ``n`` tokens (its non-padding positions,
  ``<s>`` and ``</s>`` included) gets exactly ``n_pred = min(max_masks, max(1, round(n * mask_prob)))`` masks
  (Python's ``round``, half to even). The candidates are all of the row's tokens but the first (``<s>``) --
  so, as in the reference, the closing ``</s>`` can be masked (its label is then ``</s>``). Candidates are
  visited in a random order, skipping those already masked; each starts, with probability ``skipgram_prob``,
  an n-gram of ``2..skipgram_size`` tokens (uniform; cut at the row's end), else masks just itself, until
  ``n_pred`` tokens are masked; if the last n-gram overshoots, a uniform random ``n_pred`` of the masked
  positions are kept. A row with at least two tokens therefore always gets at least one mask.

``max_masks`` caps the masks of a row under both rules; when more positions were chosen, a uniform random
subset of ``max_masks`` of them is kept (no preference for the start of the row).

The chosen positions are then replaced: ``mask_token_frac`` (80%) by ``<mask>``, ``random_token_frac`` (10%) by
a random ordinary (non-special) token, the rest keep their token. Labels are the original ids at the chosen
positions and -100 everywhere else, so the loss sees masked positions only. Every random draw comes from the
``generator`` passed to :func:`mask_tokens`, so a batch masked with the same seed is masked the same way.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from cclm.config import MaskRule

IGNORE_INDEX = -100
RULES = tuple(rule.value for rule in MaskRule)


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
    rule: str = MaskRule.bernoulli.value
    skipgram_prob: float = 0.0
    skipgram_size: int = 3
    # Padding, for finding a row's length when no attention mask is passed (None: no padding to skip).
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        rule = getattr(self.rule, "value", self.rule)
        if rule not in RULES:
            raise ValueError(f"masking.rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        object.__setattr__(self, "rule", str(rule))
        if self.mask_token_id is None:
            raise ValueError("masking needs a tokenizer with a mask token")
        if self.vocab_size < 1:
            raise ValueError(f"masking: vocab_size must be positive, got {self.vocab_size}")
        if not 0 < self.mask_prob <= 1:
            raise ValueError(f"masking.mask_prob must be in (0, 1], got {self.mask_prob}")
        fracs = (self.mask_token_frac, self.random_token_frac)
        if min(fracs) < 0 or sum(fracs) > 1:
            raise ValueError(
                "masking.mask_token_frac and masking.random_token_frac must be >= 0 with a sum <= 1, got "
                f"{self.mask_token_frac} and {self.random_token_frac}"
            )
        if self.max_masks is not None and (isinstance(self.max_masks, bool) or int(self.max_masks) < 1):
            raise ValueError(f"masking.max_masks must be >= 1 or null (no cap), got {self.max_masks}")
        if self.span and self.span_mean_length < 1:
            raise ValueError(f"masking.span_mean_length must be >= 1, got {self.span_mean_length}")
        if self.span and rule == MaskRule.count.value:
            raise ValueError(
                "masking.span applies to rule=bernoulli; rule=count masks n-grams through "
                "masking.skipgram_prob / masking.skipgram_size instead"
            )
        if not 0 <= self.skipgram_prob <= 1:
            raise ValueError(f"masking.skipgram_prob must be in [0, 1], got {self.skipgram_prob}")
        if self.skipgram_prob > 0 and rule != MaskRule.count.value:
            raise ValueError(
                "masking.skipgram_prob > 0 needs masking.rule=count (bernoulli has masking.span)"
            )
        if self.skipgram_prob > 0 and self.skipgram_size < 2:
            raise ValueError(
                f"masking.skipgram_size must be >= 2 when masking.skipgram_prob > 0, got {self.skipgram_size}"
            )

    @classmethod
    def from_tokenizer(cls, tokenizer, **cfg) -> MaskingSpec:
        special = tuple(sorted(set(tokenizer.all_special_ids)))
        cfg.setdefault("pad_token_id", tokenizer.pad_token_id)
        return cls(
            mask_token_id=tokenizer.mask_token_id, vocab_size=len(tokenizer), special_ids=special, **cfg
        )


def count_rule_masks(length: int, spec: MaskingSpec) -> int:
    """``n_pred`` of the count rule for a row of ``length`` tokens (``<s>`` and ``</s>`` included), before
    it is limited to the row's ``length - 1`` candidates."""
    n_pred = max(1, int(round(length * spec.mask_prob)))
    return n_pred if spec.max_masks is None else min(int(spec.max_masks), n_pred)


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


def _count_row(n: int, n_pred: int, order, starts_ngram, sizes, keep_keys, ngram: bool) -> list[int]:
    """The count rule for one row of ``n`` tokens: the masked token indices (into the row's tokens). ``order``
    starts with a uniform permutation of the candidates 1..n-1; ``starts_ngram``, ``sizes`` and ``keep_keys``
    are this row's random draws (per visited candidate, per token index)."""
    masked: set[int] = set()
    for k in range(n - 1):
        if len(masked) >= n_pred:
            break
        pos = order[k]
        if pos in masked:
            continue
        size = sizes[k] if ngram and starts_ngram[k] else 1
        masked.update(range(pos, min(pos + size, n)))  # an n-gram may run over masked tokens; cut at the end
    if len(masked) > n_pred:  # the last n-gram overshot: keep a uniform random n_pred of the masked tokens
        return sorted(masked, key=keep_keys.__getitem__)[:n_pred]
    return list(masked)


def _choose_count(
    present: torch.Tensor, spec: MaskingSpec, generator: torch.Generator | None
) -> torch.Tensor:
    """The count rule (see the module docstring); ``present`` marks the non-padding positions. The random
    draws are made for the whole batch up front; the per-row loop is plain Python."""
    batch, width = present.shape
    lengths = present.sum(dim=1)
    index = torch.arange(width)
    # a uniform random order of each row's candidates 1..n-1 (float64 keys: ties are practically impossible)
    order_keys = torch.rand(batch, width, generator=generator, dtype=torch.float64)
    order_keys = order_keys.masked_fill((index == 0) | (index[None, :] >= lengths[:, None]), 2.0)
    order = torch.argsort(order_keys, dim=1).tolist()
    ngram = spec.skipgram_prob > 0
    starts_ngram = (torch.rand(batch, width, generator=generator) < spec.skipgram_prob).tolist()
    sizes = torch.randint(2, max(2, spec.skipgram_size) + 1, (batch, width), generator=generator).tolist()
    keep_keys = torch.rand(batch, width, generator=generator, dtype=torch.float64).tolist()
    rows, tokens = [], []
    for row, n in enumerate(lengths.tolist()):
        if n < 2:
            continue
        picked = _count_row(
            n, count_rule_masks(n, spec), order[row], starts_ngram[row], sizes[row], keep_keys[row], ngram
        )
        rows += [row] * len(picked)
        tokens += picked
    # token index -> position: the present positions of each row, in order, come first in a stable sort
    position_of = torch.sort((~present).to(torch.uint8), dim=1, stable=True).indices
    chosen = torch.zeros(present.shape, dtype=torch.bool)
    if rows:
        rows_t, tokens_t = torch.tensor(rows), torch.tensor(tokens)
        chosen[rows_t, position_of[rows_t, tokens_t]] = True
    return chosen


def _cap(chosen: torch.Tensor, max_masks: int, generator: torch.Generator | None) -> torch.Tensor:
    """Keep a uniform random subset of at most ``max_masks`` chosen positions per row."""
    if not bool((chosen.sum(dim=1) > max_masks).any()):
        return chosen
    score = torch.rand(chosen.shape, generator=generator, dtype=torch.float64).masked_fill(~chosen, 2.0)
    rank = torch.argsort(torch.argsort(score, dim=1), dim=1)
    return chosen & (rank < max_masks)


def mask_tokens(
    input_ids: torch.Tensor,
    spec: MaskingSpec,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(masked_ids, labels)`` for a [B, L] (or [L]) batch of token ids.

    ``attention_mask`` (same shape, 1 = token, 0 = padding) gives the rows' lengths for the count rule; without
    it, padding is the positions holding ``spec.pad_token_id``. The bernoulli rule never masks special tokens,
    so it needs neither."""
    squeeze = input_ids.ndim == 1
    ids = input_ids.unsqueeze(0) if squeeze else input_ids
    if spec.rule == MaskRule.count.value:
        if attention_mask is not None:
            present = (attention_mask.unsqueeze(0) if squeeze else attention_mask).bool()
        elif spec.pad_token_id is not None:
            present = ids != spec.pad_token_id
        else:
            present = torch.ones(ids.shape, dtype=torch.bool)
        chosen = _choose_count(present, spec, generator)  # n_pred already respects max_masks
    else:
        maskable = _maskable(ids, spec)
        if spec.span:
            chosen = _choose_spans(maskable, spec, generator)
        else:
            chosen = _choose_tokens(maskable, spec, generator)
        if spec.max_masks is not None:
            chosen = _cap(chosen, int(spec.max_masks), generator)
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
