"""The three CCLM objectives, written once for both views.

* contrastive (ITC / TTC): symmetric cross-entropy of L2-normalised features at a learnable temperature, with
  features all-gathered across ranks *with gradient* so that W ranks x batch b equal 1 rank x batch W*b
  (``grad="reference"``: the CCLM reference's all-gather, whose backward keeps only this rank's slice of its
  own gradient, so that after the ranks' gradients are averaged the contrastive terms weigh 1/W of the exact);
* matching (ITM / TTM): hard negatives drawn from softmax(similarity), positives and their duplicates excluded,
  sampled for all rows at once;
* conditional MLM: cross-entropy on masked positions only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cclm.runtime.env import dist_info


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice (reduce-scatter), or with
    ``reduce=False`` returns this rank's own gradient for its slice (the CCLM reference's ``AllGather``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, reduce: bool) -> torch.Tensor:
        rank, world = dist_info()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows, ctx.reduce = rank, x.shape[0], reduce
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        if ctx.reduce:
            dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None


def gather_with_grad(x: torch.Tensor, reduce_grad: bool = True) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every rank) from all ranks along dim 0, differentiably;
    ``reduce_grad=False`` gives the reference's backward (see the module docstring)."""
    _, world = dist_info()
    if world == 1:
        return x
    if not x.requires_grad:
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)
    return _AllGatherWithGrad.apply(x, reduce_grad)


def gather_padded(x: torch.Tensor, pad_value: int | float = 0) -> torch.Tensor:
    """``gather_with_grad`` for [B, L, ...] tensors whose L differs between ranks (padded to the longest)."""
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
    return gather_with_grad(x)


def contrastive_loss(
    feat_a: torch.Tensor,
    feat_b: torch.Tensor,
    temp: torch.Tensor | float,
    gather: bool = True,
    local_loss: bool = False,
    grad: str = "exact",
    group_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE between row-aligned, L2-normalised features ``feat_a[i] <-> feat_b[i]``.

    ``gather``: score against the features of every rank. ``local_loss``: each rank only scores its own rows
    (the ranks' mean is the global loss; open_clip's memory-saving option). Equal to open_clip's ``ClipLoss``
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
    rank, world = dist_info()
    row_groups = col_groups = group_ids
    if gather and world > 1:
        reduce_grad = grad == "exact"
        all_a, all_b = gather_with_grad(feat_a, reduce_grad), gather_with_grad(feat_b, reduce_grad)
        col_groups = None if group_ids is None else gather_with_grad(group_ids)
        if local_loss:
            logits_a = feat_a @ all_b.t() / temp
            logits_b = feat_b @ all_a.t() / temp
            labels = torch.arange(feat_a.shape[0], device=feat_a.device) + rank * feat_a.shape[0]
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
