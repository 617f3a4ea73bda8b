"""The three CCLM objectives, written once for both views.

* contrastive (ITC / TTC): symmetric cross-entropy of L2-normalised features at a learnable temperature, with
  features all-gathered across ranks *with gradient* so that W ranks x batch b equal 1 rank x batch W*b
  (``grad="reference"``: the CCLM reference's all-gather, whose backward keeps only this rank's slice of its
  own gradient, so that after the ranks' gradients are averaged the contrastive terms weigh 1/W of the exact);
  ranks may hold different numbers of rows where the caller says so (``uneven_rows``, ``counts``: the gathers
  then exchange the counts, pad to the most and keep only the real rows, in the forward and the backward); by
  default every rank holds as many (the pipelines' batches are full, region batches filled), since exchanging
  the counts makes the host wait for the device once per loss;
* matching (ITM / TTM): hard negatives drawn from softmax(similarity), positives and their duplicates excluded,
  sampled for all rows at once;
* conditional MLM: cross-entropy on masked positions only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cclm.runtime.env import dist_info


def row_counts(rows: int, device: torch.device | str = "cpu") -> list[int]:
    """Every rank's number of rows, in rank order (``[rows]`` in one process): one all_gather of one number. On
    an accelerator reading it makes the host wait for the device, once per call; the gathers below take the
    counts so that one loss exchanges them once."""
    _, world = dist_info()
    if world == 1:
        return [rows]
    mine = torch.tensor([rows], dtype=torch.long, device=device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine)
    return [int(n) for n in torch.cat(parts).tolist()]


def _all_gather_rows(x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The rows of every rank, concatenated in rank order; rank r holds ``counts[r]`` rows (padded to the most
    for the collective, which needs one shape on every rank, and cut back after it)."""
    rank, world = dist_info()
    if len(counts) != world or x.shape[0] != counts[rank]:
        raise ValueError(f"rank {rank} has {x.shape[0]} rows, but the row counts per rank are {counts}")
    longest = max(counts)
    if x.shape[0] < longest:
        x = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))], dim=0)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    if min(counts) == longest:
        return torch.cat(parts, dim=0)
    return torch.cat([part[:n] for part, n in zip(parts, counts)], dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's rows (reduce-scatter), or with
    ``reduce=False`` returns this rank's own gradient for its rows (the CCLM reference's ``AllGather``). Ranks
    may hold different numbers of rows (``counts``): the gathered tensor holds only real rows, and each rank's
    gradient is cut at its own offset."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, reduce: bool, counts: tuple[int, ...]) -> torch.Tensor:
        rank, _ = dist_info()
        ctx.start, ctx.rows, ctx.reduce = sum(counts[:rank]), counts[rank], reduce
        return _all_gather_rows(x, list(counts))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad = grad.contiguous()
        if ctx.reduce:  # every rank's gradient has the same shape: the sum of the counts
            dist.all_reduce(grad)
        return grad[ctx.start : ctx.start + ctx.rows], None, None


def gather_with_grad(
    x: torch.Tensor, reduce_grad: bool = True, counts: list[int] | None = None
) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0, differentiably. The other dims must agree; the number of
    rows may differ between ranks (``counts``: every rank's, from :func:`row_counts`; None: every rank holds as
    many as this one). ``reduce_grad=False`` gives the reference's backward (see the module
    docstring)."""
    _, world = dist_info()
    if world == 1:
        return x
    if counts is None:
        counts = [x.shape[0]] * world
    if not x.requires_grad:
        return _all_gather_rows(x, counts)
    return _AllGatherWithGrad.apply(x, reduce_grad, tuple(counts))


def gather_padded(
    x: torch.Tensor, pad_value: int | float = 0, counts: list[int] | None = None
) -> torch.Tensor:
    """``gather_with_grad`` for [B, L, ...] tensors whose L (and B: ``counts``) differ between ranks: padded
    along dim 1 to the longest with ``pad_value``."""
    _, world = dist_info()
    if world == 1:
        return x
    length = torch.tensor([x.shape[1]], device=x.device)
    dist.all_reduce(length, op=dist.ReduceOp.MAX)
    pad = int(length.item()) - x.shape[1]
    if pad:
        pad_shape = list(x.shape)
        pad_shape[1] = pad
        x = torch.cat([x, x.new_full(pad_shape, pad_value)], dim=1)
    return gather_with_grad(x, counts=counts)


def contrastive_loss(
    feat_a: torch.Tensor,
    feat_b: torch.Tensor,
    temp: torch.Tensor | float,
    gather: bool = True,
    local_loss: bool = False,
    grad: str = "exact",
    group_ids: torch.Tensor | None = None,
    uneven_rows: bool = False,
) -> torch.Tensor:
    """Symmetric InfoNCE between row-aligned, L2-normalised features ``feat_a[i] <-> feat_b[i]``.

    ``gather``: score against the features of every rank. ``local_loss``: each rank only scores its own rows
    (the ranks' mean is the global loss when every rank holds as many rows; open_clip's memory-saving option).
    ``uneven_rows``: ranks may hold different numbers of rows (exchanged first: a host wait on an accelerator);
    the gathered logits then have exactly the real rows of all ranks (the global loss is a single process's on
    their concatenation). Without it, every rank must hold as many rows. Equal to open_clip's ``ClipLoss``
    with ``logit_scale = 1 / temp``. ``grad``: "exact" or "reference" (module docstring; not with local_loss,
    whose per-rank losses differ, so the reference's scaling would not be the reference's gradient).
    ``group_ids`` [B]: every pair of the same group is a positive, each row's target spread evenly over its
    positives (the reference's retrieval fine-tuning, ``idx``: other captions of the same image are not
    negatives); None: only the diagonal.
    """
    if grad not in ("exact", "reference"):
        raise ValueError(f"contrastive gradient must be 'exact' or 'reference', got {grad!r}")
    if grad == "reference" and local_loss:
        raise ValueError(
            "model.objectives.contrastive_grad=reference needs local_loss=false, as the reference"
        )
    if feat_a.shape[0] != feat_b.shape[0]:
        raise ValueError(f"contrastive_loss: {feat_a.shape[0]} rows against {feat_b.shape[0]}; they pair up")
    rank, world = dist_info()
    row_groups = col_groups = group_ids
    if gather and world > 1:
        reduce_grad = grad == "exact"
        rows = feat_a.shape[0]
        counts = row_counts(rows, feat_a.device) if uneven_rows else [rows] * world
        all_a = gather_with_grad(feat_a, reduce_grad, counts)
        all_b = gather_with_grad(feat_b, reduce_grad, counts)
        col_groups = None if group_ids is None else gather_with_grad(group_ids, counts=counts)
        if local_loss:
            logits_a = feat_a @ all_b.t() / temp
            logits_b = feat_b @ all_a.t() / temp
            labels = torch.arange(feat_a.shape[0], device=feat_a.device) + sum(counts[:rank])
        else:
            logits_a = all_a @ all_b.t() / temp
            logits_b = logits_a.t()
            labels = torch.arange(all_a.shape[0], device=feat_a.device)
            row_groups = col_groups
    else:
        logits_a = feat_a @ feat_b.t() / temp
        logits_b = logits_a.t()
        labels = torch.arange(feat_a.shape[0], device=feat_a.device)
    if group_ids is None:
        return 0.5 * (F.cross_entropy(logits_a.float(), labels) + F.cross_entropy(logits_b.float(), labels))
    positives = positive_mask(row_groups, col_groups).float()
    targets = positives / positives.sum(dim=1, keepdim=True)
    return 0.5 * (_soft_cross_entropy(logits_a, targets) + _soft_cross_entropy(logits_b, targets))


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(F.log_softmax(logits.float(), dim=1) * targets).sum(dim=1).mean()


def positive_mask(group_ids: torch.Tensor, other_group_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[B, B'] True where two samples share a group (the same image or the same sentence)."""
    other = group_ids if other_group_ids is None else other_group_ids
    return group_ids[:, None] == other[None, :]


def sample_hard_negatives(
    logits: torch.Tensor, positives: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One negative column per row, drawn from softmax(logits) restricted to non-positive columns.

    Returns ``(index [B], valid [B])``; ``valid`` is False for a row whose every column is a positive (e.g. a
    batch of one image's captions), which then has no negative. No Python loop, no host sync.
    """
    masked = logits.detach().float().masked_fill(positives, float("-inf"))
    valid = ~positives.all(dim=1)
    # Rows without a candidate get uniform weights so multinomial is defined; they are marked invalid.
    masked = torch.where(valid[:, None], masked, torch.zeros_like(masked))
    weights = torch.softmax(masked, dim=1)
    index = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    return index, valid


def matching_loss(
    pos_logits: torch.Tensor, neg_logits: torch.Tensor, neg_valid: torch.Tensor
) -> torch.Tensor:
    """2-way cross-entropy over B positive pairs (label 1) and the valid negative pairs (label 0)."""
    logits = torch.cat([pos_logits, neg_logits], dim=0).float()
    labels = torch.cat(
        [torch.ones(len(pos_logits), dtype=torch.long), torch.zeros(len(neg_logits), dtype=torch.long)]
    ).to(logits.device)
    weights = torch.cat([torch.ones(len(pos_logits), device=logits.device), neg_valid.float()])
    per_pair = F.cross_entropy(logits, labels, reduction="none")
    return (per_pair * weights).sum() / weights.sum()


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of already-selected masked positions ([M, V] logits, [M] labels)."""
    if labels.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels)
