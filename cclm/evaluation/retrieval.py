"""Image-text retrieval: recall metrics, and the two-stage ITC -> ITM evaluation.

Two stages, as in ALBEF/X-VLM/CCLM, but batched across queries:
  1. every image and every caption is embedded once (batched, under ``torch.inference_mode``, bf16 on GPU);
     the ITC similarities are computed in blocks of queries, never the whole matrix at once, keeping each query's
     top-k candidates and the ITC rank of its gold items;
  2. the (query, candidate) pairs of all queries are pooled, de-duplicated across the two directions, sorted by
     caption length (so each batch is padded only to its own longest caption) and re-scored by the ITM head;
     what depends on one side of a pair only is shared across pairs -- an image's cross-attention keys/values in
     every fusion layer are computed once (in chunks of images, so the cache stays bounded), a caption's
     first-layer self-attention once per few batches of its pairs (which are adjacent) -- and the last fusion
     layer computes only the [CLS] position the head reads.
Candidates outside a query's top-k rank below all re-scored ones, in their ITC order; so a gold item outside the
top-k has its ITC rank (> k) and is a miss for every R@K with K <= k. With ``k = n`` this is full ITM ranking.
A query with no gold item in its top-k therefore has the same rank whatever ITM says: its pairs are not
re-scored (``rescore_all=True`` scores them anyway; ranks and metrics are identical).

Ranks are 1-based. By default ties count against the query: a query's rank is 1 + the number of non-gold
candidates that score at least as high as its best gold candidate (a constant scorer therefore gets chance-level
recall, not 100%). With ``ties="index"`` (for IGLUE's tasks) ties are broken by candidate index, as a stable
sort by descending score would: a non-gold candidate that ties the best gold score ranks above it only when it
comes first. IGLUE ranks by numpy's default ``np.argsort(-scores)``, which is not stable: its order among
exactly equal scores is unspecified (it depends on the array and the numpy version), so the index order is a
deterministic stand-in that agrees with it wherever the gold candidate has no exact tie. Functions take
``ties`` (None = the default of the calling context, :func:`tie_breaking`; ``"against"`` outside one). An
image query's gold items are all its captions; a caption query's gold item is its image.

On several ranks (``torch.distributed`` initialised) each rank embeds a slice of the images and captions (the
embeddings are all-gathered), scores a slice of the queries of both directions, and the ranks are gathered, so
every rank returns the same metrics as a single process would.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from cclm.config import ConfigError, Precision
from cclm.data.normalize import Normalizer, normalizer_for
from cclm.runtime.env import autocast, compute_dtype, dist_info

logger = logging.getLogger(__name__)

RECALL_AT = (1, 5, 10)
METRIC_KEYS = (
    "txt_r1",
    "txt_r5",
    "txt_r10",
    "txt_r_mean",
    "img_r1",
    "img_r5",
    "img_r10",
    "img_r_mean",
    "r_mean",
    "txt_medr",
    "txt_meanr",
    "img_medr",
    "img_meanr",
)
MATCH = 1  # index of the "match" class of the ITM head
# Upper bound on the elements of one block of the similarity matrix (64 MiB of fp32).
DEFAULT_BLOCK_ELEMENTS = 1 << 24
# Upper bound on the cached cross-attention keys/values of the images being re-ranked (256 MiB of fp32).
DEFAULT_KV_CACHE_ELEMENTS = 1 << 26
# Batches of pairs whose captions are prepared (query_prefix) together: few, since their pairs are adjacent.
PREFIX_BATCHES = 8


# ------------------------------------------------------------------------------------------------------ metrics
def _to_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    return torch.as_tensor(np.asarray(x))


def gold_matrix(gold: Sequence[Any], n_candidates: int | None = None) -> torch.Tensor:
    """Gold candidates per query as a [n_queries, max_gold] long tensor padded with -1.

    ``gold[q]`` is one index or a list of indices (an image's captions)."""
    lists = [[int(g)] if np.ndim(g) == 0 else [int(x) for x in g] for g in gold]
    if any(len(g) == 0 for g in lists):
        empty = next(q for q, g in enumerate(lists) if not g)
        raise ValueError(f"query {empty} has no gold candidate")
    width = max((len(g) for g in lists), default=1)
    out = torch.full((len(lists), width), -1, dtype=torch.long)
    for q, g in enumerate(lists):
        out[q, : len(g)] = torch.tensor(g, dtype=torch.long)
    if n_candidates is not None and len(lists) and (out.max() >= n_candidates):
        raise ValueError(f"gold index {int(out.max())} out of range for {n_candidates} candidates")
    return out


def _gold_mask(gold: torch.Tensor, n_candidates: int) -> torch.Tensor:
    """[b, max_gold] padded gold indices -> [b, n_candidates] boolean mask."""
    mask = torch.zeros(gold.shape[0], n_candidates + 1, dtype=torch.bool, device=gold.device)
    mask.scatter_(1, torch.where(gold < 0, n_candidates, gold), True)
    return mask[:, :n_candidates]


# -------------------------------------------------------------------------------------------------------- ties
TIES_AGAINST = "against"  # a non-gold candidate scoring as high as the best gold one ranks above it
# ties broken by candidate index (a stable sort by descending score), cclm's choice for the IGLUE tasks: IGLUE's
# np.argsort(-scores) is not stable (its order on exact ties is unspecified); the two agree wherever the gold
# candidate ties nothing
TIES_INDEX = "index"
TIES = (TIES_AGAINST, TIES_INDEX)
_DEFAULT_TIES: ContextVar[str] = ContextVar("cclm_retrieval_ties", default=TIES_AGAINST)


def resolve_ties(ties: str | None = None) -> str:
    """``ties``, or the calling context's default (:func:`tie_breaking`) when None; an unknown value fails."""
    ties = _DEFAULT_TIES.get() if ties is None else str(ties)
    if ties not in TIES:
        raise ValueError(f"unknown tie breaking '{ties}' (expected one of {', '.join(TIES)})")
    return ties


@contextmanager
def tie_breaking(ties: str) -> Iterator[None]:
    """Within the block, the functions of this module called without ``ties`` break ties ``ties``
    (``"index"``: cclm's choice for the IGLUE tasks; a ``contextvars`` default, so it stays with this thread/task)."""
    token = _DEFAULT_TIES.set(resolve_ties(ties))
    try:
        yield
    finally:
        _DEFAULT_TIES.reset(token)


def ranks_from_scores(
    scores: torch.Tensor,
    gold_mask: torch.Tensor,
    ties: str | None = None,
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rank of each query's best gold candidate: 1 + #non-gold candidates scoring >= the best gold score
    (``ties="against"``), or, with ``ties="index"``, 1 + #non-gold candidates scoring higher or scoring the same
    and coming before the first gold candidate with that score. ``order`` [b, n] gives each column's candidate
    index (default: the column index), e.g. the candidates of a top-k list."""
    ties = resolve_ties(ties)
    best_gold = scores.masked_fill(~gold_mask, float("-inf")).amax(dim=1, keepdim=True)
    if ties == TIES_AGAINST:
        return 1 + ((scores >= best_gold) & ~gold_mask).sum(dim=1)
    if order is None:
        order = torch.arange(scores.shape[1], device=scores.device).expand_as(scores)
    tied = scores == best_gold
    first_gold = order.masked_fill(~(tied & gold_mask), torch.iinfo(torch.long).max).amin(dim=1, keepdim=True)
    ahead = (scores > best_gold) | (tied & (order < first_gold))
    return 1 + (ahead & ~gold_mask).sum(dim=1)


def metrics_from_ranks(i2t_ranks: Any, t2i_ranks: Any) -> dict[str, float]:
    """Recall@1/5/10 (percent), their means, and the median / mean rank, from 1-based ranks.

    ``i2t_ranks``: per image query (text retrieval, ``txt_*``); ``t2i_ranks``: per caption query (``img_*``)."""
    out: dict[str, float] = {}
    for prefix, ranks in (("txt", _to_tensor(i2t_ranks)), ("img", _to_tensor(t2i_ranks))):
        ranks = ranks.double()
        for k in RECALL_AT:
            out[f"{prefix}_r{k}"] = 100.0 * (ranks <= k).double().mean().item()
        out[f"{prefix}_r_mean"] = sum(out[f"{prefix}_r{k}"] for k in RECALL_AT) / len(RECALL_AT)
        out[f"{prefix}_medr"] = float(np.median(ranks.numpy()))
        out[f"{prefix}_meanr"] = ranks.mean().item()
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return {key: out[key] for key in METRIC_KEYS}


def itm_metrics(
    scores_i2t: Any,
    scores_t2i: Any,
    txt2img: Sequence[Any],
    img2txt: Sequence[Any],
    ties: str | None = None,
) -> dict[str, float]:
    """Retrieval metrics from dense score matrices (arrays or tensors).

    ``scores_i2t`` [n_images, n_texts] (text retrieval, image queries), ``scores_t2i`` [n_texts, n_images];
    ``txt2img[t]`` the gold image of text t, ``img2txt[i]`` the list of gold texts of image i. Returns the
    percentages ``txt_r1 ... img_r_mean, r_mean`` plus ``*_medr`` / ``*_meanr`` (an image's rank is the best rank
    of its gold texts); ``ties`` as in :func:`ranks_from_scores`. Vectorised: no Python loop over queries."""
    s_i2t, s_t2i = _to_tensor(scores_i2t).double(), _to_tensor(scores_t2i).double()
    n_images, n_texts = s_i2t.shape
    if s_t2i.shape != (n_texts, n_images):
        raise ValueError(f"scores_t2i has shape {tuple(s_t2i.shape)}, expected {(n_texts, n_images)}")
    if len(img2txt) != n_images or len(txt2img) != n_texts:
        raise ValueError(
            f"{len(img2txt)} img2txt / {len(txt2img)} txt2img entries for a {n_images}x{n_texts} matrix"
        )
    i2t = ranks_from_scores(s_i2t, _gold_mask(gold_matrix(img2txt, n_texts), n_texts), ties)
    t2i = ranks_from_scores(s_t2i, _gold_mask(gold_matrix(txt2img, n_images), n_images), ties)
    return metrics_from_ranks(i2t, t2i)


# ---------------------------------------------------------------------------------------------- stage 1: ITC
@dataclass
class TopK:
    """Per query: the top-k candidates by ITC, their ITC scores, and the ITC rank of the best gold item."""

    indices: torch.Tensor  # [n_queries, k] long
    scores: torch.Tensor  # [n_queries, k] float
    itc_ranks: torch.Tensor  # [n_queries] long
    is_gold: torch.Tensor  # [n_queries, k] bool: the candidate is a gold item of the query

    @property
    def has_gold(self) -> torch.Tensor:
        """[n_queries] bool: some gold item made the top-k (only these queries' ranks depend on ITM)."""
        return self.is_gold.any(dim=1)


def itc_topk(
    query_feats: torch.Tensor,
    candidate_feats: torch.Tensor,
    gold: torch.Tensor,
    k: int,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    ties: str | None = None,
) -> TopK:
    """Top-k candidates of every query by cosine similarity, computed in blocks of query rows so that at most
    ``block_elements`` similarities exist at a time. ``gold`` is the [n_queries, max_gold] padded gold matrix.
    With ``ties="index"`` the top-k list is the head of a stable sort (equal scores in candidate order), as the
    ranks."""
    ties = resolve_ties(ties)
    n_queries, n_candidates = query_feats.shape[0], candidate_feats.shape[0]
    k = min(k, n_candidates)
    rows = max(1, block_elements // max(1, n_candidates))
    indices, scores, ranks, is_gold = [], [], [], []
    gold = gold.to(query_feats.device)
    for start in range(0, n_queries, rows):
        sims = (query_feats[start : start + rows] @ candidate_feats.t()).float()
        gold_mask = _gold_mask(gold[start : start + rows], n_candidates)
        ranks.append(ranks_from_scores(sims, gold_mask, ties))
        if ties == TIES_INDEX:
            values, top_indices = sims.sort(dim=1, descending=True, stable=True)
            values, top_indices = values[:, :k], top_indices[:, :k]
        else:
            values, top_indices = sims.topk(k, dim=1)
        indices.append(top_indices)
        scores.append(values)
        is_gold.append(gold_mask.gather(1, top_indices))
    device = query_feats.device
    if not indices:
        empty = torch.empty(0, k, device=device)
        return TopK(empty.long(), empty, empty.long()[:, 0], empty.bool())
    return TopK(torch.cat(indices), torch.cat(scores), torch.cat(ranks), torch.cat(is_gold))


# ---------------------------------------------------------------------------------------------- embeddings
@dataclass
class Embeddings:
    """Everything the two stages need about a gallery; tokens are None when ITM re-ranking is off."""

    image_feats: torch.Tensor  # [n_images, E]
    text_feats: torch.Tensor  # [n_texts, E]
    image_tokens: torch.Tensor | None = None  # [n_images, 1+N, H]
    text_tokens: torch.Tensor | None = None  # [n_texts, L, H]
    text_masks: torch.Tensor | None = None  # [n_texts, L]

    @property
    def text_lengths(self) -> torch.Tensor:
        assert self.text_masks is not None
        return self.text_masks.sum(dim=1)


def shard_range(n: int, rank: int, world: int) -> range:
    """The contiguous slice of ``n`` rows that ``rank`` handles (ceil-sized chunks, in rank order)."""
    chunk = math.ceil(n / world) if n else 0
    return range(min(n, rank * chunk), min(n, (rank + 1) * chunk))


def gather_rows(local: torch.Tensor, n_total: int) -> torch.Tensor:
    """All-gather the per-rank slices made by :func:`shard_range` back into the full [n_total, ...] tensor."""
    world = dist_info()[1]
    if world == 1:
        return local
    chunk = math.ceil(n_total / world) if n_total else 0
    padded = local.new_zeros((chunk, *local.shape[1:]))
    padded[: local.shape[0]] = local
    if dist.get_backend() == "gloo" and padded.dtype == torch.bfloat16:  # gloo cannot reduce/gather bf16
        parts = [torch.empty_like(padded, dtype=torch.float32) for _ in range(world)]
        dist.all_gather(parts, padded.float())
        parts = [p.to(torch.bfloat16) for p in parts]
    else:
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
    return torch.cat(parts)[:n_total]


@torch.inference_mode()
def embed_images(
    model,
    images: Sequence[Any],
    load_image,
    batch_size: int,
    device,
    keep_tokens: bool,
    num_workers: int = 0,
    precision: str | Precision = Precision.auto,
):
    """Embed ``images`` (anything ``load_image`` turns into a uint8 [3,H,W] tensor) in batches.

    Returns (tokens or None, feats) for the given images, in order."""
    device = torch.device(device)
    loader = torch.utils.data.DataLoader(
        _MappedList(images, load_image), batch_size=batch_size, num_workers=num_workers, shuffle=False
    )
    tokens, feats = [], []
    token_dtype = compute_dtype(device, precision)  # bf16 halves the ITM stage's memory
    with autocast(device, precision):
        for batch in loader:
            tok, feat = model.encode_image(batch.to(device, non_blocking=True))
            feats.append(feat.float())  # fp32 similarities: bf16 would create ties in the top-k
            if keep_tokens:
                tokens.append(tok.to(token_dtype))
    return (torch.cat(tokens) if tokens else None), (torch.cat(feats) if feats else None)


class _MappedList(torch.utils.data.Dataset):
    def __init__(self, items: Sequence[Any], fn):
        self.items, self.fn = items, fn

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.fn(self.items[i])


def tokenize_texts(
    tokenizer, texts: Sequence[str], max_length: int, normalize: Normalizer | None = None
) -> list[list[int]]:
    """Token ids of every text, truncated to ``max_length`` tokens. ``normalize`` (the model's text normaliser,
    :func:`cclm.data.normalize.normalizer_for`) is applied to each text first; None tokenises the text as given.
    Use :func:`tokenize_for_model` to get both from a model's config."""
    if not texts:
        return []
    texts = [normalize(t) for t in texts] if normalize is not None else list(texts)
    return tokenizer(texts, truncation=True, max_length=max_length, padding=False)["input_ids"]


def tokenize_for_model(model, tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of ``texts`` as ``model`` was trained to read them: its text normaliser
    (``model.cfg.text.normalize`` / ``max_words``, saved with the model) and its ``max_length``."""
    text_cfg = model.cfg.text
    return tokenize_texts(tokenizer, texts, int(text_cfg.max_length), normalizer_for(text_cfg))


@torch.inference_mode()
def embed_texts(
    model,
    token_ids: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int,
    device,
    keep_tokens: bool,
    width: int | None = None,
    precision: str | Precision = Precision.auto,
):
    """Embed pre-tokenised texts in batches of similar length (each padded only to its own longest text).

    Returns (tokens [n, width, H] or None, masks [n, width] or None, feats [n, E]) in the input order;
    ``width`` defaults to the longest text."""
    device = torch.device(device)
    n = len(token_ids)
    lengths = torch.tensor([len(t) for t in token_ids], dtype=torch.long)
    width = int(width or (lengths.max().item() if n else 1))
    order = torch.argsort(lengths, descending=True, stable=True).tolist()
    tokens = masks = feats = None
    token_dtype = compute_dtype(device, precision)
    with autocast(device, precision):
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            longest = int(lengths[idx].max())
            ids = torch.full((len(idx), longest), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), longest), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, : lengths[i]] = torch.tensor(token_ids[i], dtype=torch.long)
                mask[row, : lengths[i]] = 1
            ids, mask = ids.to(device), mask.to(device)
            tok, feat = model.encode_text(ids, mask)
            if feats is None:
                feats = feat.new_zeros((n, feat.shape[1]), dtype=torch.float32)
                if keep_tokens:
                    tokens = tok.new_zeros((n, width, tok.shape[2]), dtype=token_dtype)
                    masks = torch.zeros((n, width), dtype=torch.long, device=device)
            where = torch.tensor(idx, device=device)
            feats[where] = feat.float()
            if keep_tokens:
                tokens[where, :longest] = tok.to(tokens.dtype)
                masks[where, :longest] = mask
    return tokens, masks, feats


# ---------------------------------------------------------------------------------------------- stage 2: ITM
@torch.inference_mode()
def itm_scores(
    model,
    emb: Embeddings,
    image_idx: torch.Tensor,
    text_idx: torch.Tensor,
    batch_size: int,
    precision: str | Precision = Precision.auto,
    probability: bool = False,
    kv_cache: bool = True,
    kv_cache_elements: int = DEFAULT_KV_CACHE_ELEMENTS,
) -> torch.Tensor:
    """ITM match scores of the pairs (image_idx[j], text_idx[j]), batched: the match logit (index 1 of the head,
    as ALBEF/CCLM rank), or with ``probability`` the match probability (softmax of the two logits, index 1).

    Pairs are sorted by caption length so that each batch is padded only to its own longest caption. With
    ``kv_cache`` (the default) the work that depends on one side of a pair only is shared by its pairs
    (:func:`_cached_pair_logits`; the same scores to float rounding), with at most ``kv_cache_elements``
    cached key/value elements at a time; without it every pair runs through the whole fusion stack."""
    if emb.image_tokens is None or emb.text_tokens is None:
        raise ValueError("ITM scoring needs embeddings computed with keep_tokens=True")
    device = emb.image_tokens.device
    image_idx, text_idx = image_idx.to(device), text_idx.to(device)
    out = torch.empty(len(image_idx), dtype=torch.float32, device=device)
    if kv_cache:
        batches = _cached_pair_logits(model, emb, image_idx, text_idx, batch_size, kv_cache_elements)
    else:
        batches = _pair_logits(model, emb, image_idx, text_idx, batch_size)
    with autocast(device, precision):
        for sel, logits in batches:
            logits = logits.float()
            out[sel] = (logits.softmax(dim=-1) if probability else logits)[:, MATCH]
    return out


def _pair_logits(model, emb: Embeddings, image_idx, text_idx, batch_size: int):
    """Yield (pair positions, ITM logits) per batch: every pair through the whole fusion stack."""
    lengths = emb.text_lengths[text_idx]
    order = torch.argsort(lengths, descending=True, stable=True)
    memory_mask = torch.ones((batch_size, emb.image_tokens.shape[1]), dtype=torch.long, device=lengths.device)
    for start in range(0, len(order), batch_size):
        sel = order[start : start + batch_size]
        txt, img = text_idx[sel], image_idx[sel]
        longest = int(lengths[sel].max())
        fused = model.fuse(
            emb.text_tokens[txt, :longest],
            emb.text_masks[txt, :longest],
            emb.image_tokens[img],
            memory_mask[: len(sel)],
        )
        yield sel, model.itm_logits(fused)


def _cached_pair_logits(model, emb: Embeddings, image_idx, text_idx, batch_size: int, kv_cache_elements: int):
    """Yield (pair positions, ITM logits) per batch, doing per image and per caption what depends on it alone.

    The distinct images are taken in chunks whose cross-attention keys/values (every fusion layer) fit in
    ``kv_cache_elements``; each chunk's are computed once and gathered per pair. Within a chunk the pairs are
    sorted by caption length, then caption, so that the pairs of a caption are adjacent; the captions of
    :data:`PREFIX_BATCHES` batches at a time are prepared together
    (:meth:`~cclm.model.CrossViewModel.query_prefix`)."""
    images, image_rows = torch.unique(image_idx, return_inverse=True)
    per_chunk = max(1, kv_cache_elements // _kv_elements_per_image(model, emb))
    lengths = emb.text_lengths[text_idx]
    for first in range(0, len(images), per_chunk):
        memory = model.memory_kv(emb.image_tokens[images[first : first + per_chunk]])
        pairs = torch.nonzero(image_rows // per_chunk == first // per_chunk).squeeze(1)
        pairs = pairs[_longest_caption_first(lengths[pairs], text_idx[pairs])]
        for block in pairs.split(batch_size * PREFIX_BATCHES):
            captions, caption_rows = torch.unique_consecutive(text_idx[block], return_inverse=True)
            longest = int(lengths[block[0]])  # the block's pairs are sorted longest first
            prefix = model.query_prefix(
                emb.text_tokens[captions, :longest], emb.text_masks[captions, :longest]
            )
            for start in range(0, len(block), batch_size):
                sel = block[start : start + batch_size]
                queries = prefix.select(caption_rows[start : start + batch_size], int(lengths[sel[0]]))
                yield sel, model.cached_itm_logits(queries, memory.select(image_rows[sel] - first))


def _kv_elements_per_image(model, emb: Embeddings) -> int:
    """Elements of one image's cached keys and values: two per token and fusion layer, at the fusion width."""
    return 2 * len(model.fusion.layers) * emb.image_tokens.shape[1] * emb.image_tokens.shape[2]


def _longest_caption_first(lengths: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
    """The order of pairs by caption length (longest first), then by caption, so equal captions are adjacent."""
    by_caption = torch.argsort(captions, stable=True)
    return by_caption[torch.argsort(lengths[by_caption], descending=True, stable=True)]


def _query_pairs(top: TopK, queries: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(query index, candidate index) of every top-k entry of the selected rows, flattened."""
    candidates = top.indices[rows]
    return queries.to(candidates.device)[rows][:, None].expand_as(candidates).reshape(-1), candidates.reshape(
        -1
    )


def rerank(
    model,
    emb: Embeddings,
    i2t: TopK,
    t2i: TopK,
    image_queries: torch.Tensor,
    text_queries: torch.Tensor,
    batch_size: int,
    itc_weight: float = 0.0,
    precision: str | Precision = Precision.auto,
    rescore_all: bool = False,
    kv_cache: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-score the top-k lists with ITM (+ ``itc_weight`` x ITC); returns new [n_queries, k] scores per direction.

    Only queries with a gold item in their top-k are re-scored unless ``rescore_all``: the others rank their
    gold at its ITC rank whatever ITM says (their rows are left at -inf). Pairs occurring in both directions
    are scored once; ``kv_cache`` as in :func:`itm_scores`."""
    n_texts = emb.text_feats.shape[0]
    device = i2t.indices.device
    rows_i2t = torch.ones_like(i2t.has_gold) if rescore_all else i2t.has_gold
    rows_t2i = torch.ones_like(t2i.has_gold) if rescore_all else t2i.has_gold
    img_a, txt_a = _query_pairs(i2t, image_queries, rows_i2t)
    txt_b, img_b = _query_pairs(t2i, text_queries, rows_t2i)
    keys = torch.cat([img_a * n_texts + txt_a, img_b * n_texts + txt_b])
    unique, inverse = torch.unique(keys, return_inverse=True)
    scores = itm_scores(
        model, emb, unique // n_texts, unique % n_texts, batch_size, precision, kv_cache=kv_cache
    )[inverse]
    out = []
    for top, rows, part in (
        (i2t, rows_i2t, scores[: txt_a.numel()]),
        (t2i, rows_t2i, scores[txt_a.numel() :]),
    ):
        full = torch.full(top.scores.shape, float("-inf"), device=device)
        full[rows] = part.view(-1, top.scores.shape[1]) + itc_weight * top.scores[rows].float()
        out.append(full)
    return out[0], out[1]


def ranks_after_rerank(top: TopK, rerank_scores: torch.Tensor, ties: str | None = None) -> torch.Tensor:
    """Final rank of each query: its rank among the re-scored top-k when a gold item is in it, else its ITC rank
    (every top-k candidate then ranks above the gold items, the rest keep their ITC order). With ``ties="index"``
    equal re-scores are ordered by candidate index."""
    topk_ranks = ranks_from_scores(rerank_scores, top.is_gold, ties, order=top.indices)
    return torch.where(top.has_gold, topk_ranks, top.itc_ranks)


# ------------------------------------------------------------------------------------------------- together
@dataclass
class RetrievalOutput:
    metrics: dict[str, float]
    i2t_ranks: torch.Tensor  # [n_images], 1-based
    t2i_ranks: torch.Tensor  # [n_texts]


def check_k_test(k: int, rerank: bool) -> None:
    """``eval.k_test``, the ITC candidates ITM re-scores per query: at least 1 when re-ranking (0 would silently
    give ITC-only ranks), never negative. Call it before embedding a gallery, so a bad value costs nothing."""
    if rerank and k < 1:
        raise ConfigError(
            f"eval.k_test must be at least 1 when re-ranking (it is how many ITC candidates of each query the ITM "
            f"head re-scores), got {k}; for ITC-only ranks set eval.rerank=false"
        )
    if k < 0:
        raise ConfigError(f"eval.k_test must be 0 or more, got {k}")


def two_stage_ranks(
    model,
    emb: Embeddings,
    txt2img: Sequence[Any],
    img2txt: Sequence[Any],
    k: int,
    rerank_batch_size: int = 256,
    do_rerank: bool = True,
    itc_weight: float = 0.0,
    precision: str | Precision = Precision.auto,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    rescore_all: bool = False,
    kv_cache: bool = True,
    ties: str | None = None,
) -> RetrievalOutput:
    """Stage 1 (ITC top-k) and stage 2 (ITM re-ranking) over embeddings already computed for the whole gallery.

    This rank scores its slice of the image queries and of the caption queries; ranks are gathered. ITM scores
    only the queries whose rank depends on it (a gold item in the top-k) unless ``rescore_all``; the ranks and
    metrics are the same either way. ``kv_cache=False`` runs every pair through the whole fusion stack (see
    :func:`itm_scores`; the same scores to float rounding). ``ties`` as in :func:`ranks_from_scores` (None: the
    context's, :func:`tie_breaking`). ``k`` is checked by :func:`check_k_test`."""
    check_k_test(k, do_rerank)
    ties = resolve_ties(ties)
    rank, world = dist_info()
    n_images, n_texts = emb.image_feats.shape[0], emb.text_feats.shape[0]
    gold_i2t, gold_t2i = gold_matrix(img2txt, n_texts), gold_matrix(txt2img, n_images)
    my_images = torch.tensor(shard_range(n_images, rank, world), dtype=torch.long)
    my_texts = torch.tensor(shard_range(n_texts, rank, world), dtype=torch.long)
    i2t = itc_topk(emb.image_feats[my_images], emb.text_feats, gold_i2t[my_images], k, block_elements, ties)
    t2i = itc_topk(emb.text_feats[my_texts], emb.image_feats, gold_t2i[my_texts], k, block_elements, ties)
    if do_rerank:
        i2t_scores, t2i_scores = rerank(
            model,
            emb,
            i2t,
            t2i,
            my_images,
            my_texts,
            rerank_batch_size,
            itc_weight,
            precision,
            rescore_all,
            kv_cache,
        )
        i2t_ranks = ranks_after_rerank(i2t, i2t_scores, ties)
        t2i_ranks = ranks_after_rerank(t2i, t2i_scores, ties)
    else:
        i2t_ranks, t2i_ranks = i2t.itc_ranks, t2i.itc_ranks
    i2t_ranks = gather_rows(i2t_ranks, n_images).cpu()
    t2i_ranks = gather_rows(t2i_ranks, n_texts).cpu()
    return RetrievalOutput(metrics_from_ranks(i2t_ranks, t2i_ranks), i2t_ranks, t2i_ranks)


def embed_gallery(
    model,
    images: Sequence[Any],
    token_ids: Sequence[Sequence[int]],
    load_image,
    pad_id: int,
    batch_size: int,
    device,
    keep_tokens: bool,
    num_workers: int = 0,
    precision: str | Precision = Precision.auto,
) -> Embeddings:
    """Embed all images and (pre-tokenised) captions; on several ranks each embeds its slice and all get all."""
    rank, world = dist_info()
    n_images, n_texts = len(images), len(token_ids)
    if min(n_images, n_texts) < world:
        raise ValueError(f"{n_images} images / {n_texts} captions cannot be split over {world} ranks")
    width = max(len(t) for t in token_ids)
    img_part, txt_part = shard_range(n_images, rank, world), shard_range(n_texts, rank, world)
    image_tokens, image_feats = embed_images(
        model,
        images[img_part.start : img_part.stop],
        load_image,
        batch_size,
        device,
        keep_tokens,
        num_workers,
        precision,
    )
    text_tokens, text_masks, text_feats = embed_texts(
        model,
        token_ids[txt_part.start : txt_part.stop],
        pad_id,
        batch_size,
        device,
        keep_tokens,
        width,
        precision,
    )
    gather_img, gather_txt = (lambda t: gather_rows(t, n_images)), (lambda t: gather_rows(t, n_texts))
    return Embeddings(
        image_feats=gather_img(image_feats),
        text_feats=gather_txt(text_feats),
        image_tokens=gather_img(image_tokens) if keep_tokens else None,
        text_tokens=gather_txt(text_tokens) if keep_tokens else None,
        text_masks=gather_txt(text_masks) if keep_tokens else None,
    )
