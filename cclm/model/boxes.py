"""Boxes on the model side of the region path (X-VLM / CCLM-4M): conversions, the box loss, the box head, and the
token grid that region masks are drawn on.

Conventions: ``xyxy`` = (x0, y0, x1, y1), ``cxcywh`` = (centre x, centre y, width, height), both either in pixels
or normalised to the (square) model input, 0..1. The data path (:mod:`cclm.data.regions`) hands over normalised
``xyxy`` boxes; the box head predicts normalised ``cxcywh`` (a sigmoid), and the loss compares in ``cxcywh`` as
the reference's ``get_bbox_loss`` does (L1 on the four numbers + 1 - GIoU).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def normalize_boxes(boxes: torch.Tensor, width: float, height: float) -> torch.Tensor:
    """Pixel boxes (``xyxy`` or ``cxcywh``: both scale the same way) of a ``width`` x ``height`` image -> 0..1."""
    return boxes / boxes.new_tensor([width, height, width, height])


def denormalize_boxes(boxes: torch.Tensor, width: float, height: float) -> torch.Tensor:
    return boxes * boxes.new_tensor([width, height, width, height])


def paired_generalized_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """GIoU of ``boxes1[i]`` with ``boxes2[i]`` (``xyxy``, [N, 4] each) -> [N]: the diagonal of torchvision's
    pairwise ``generalized_box_iou`` without the N x N matrix. ``eps`` keeps a zero-area pair finite."""
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    inner = (torch.min(boxes1[:, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    intersection = inner[:, 0] * inner[:, 1]
    union = area1 + area2 - intersection
    outer = (torch.max(boxes1[:, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    hull = outer[:, 0] * outer[:, 1]
    return intersection / (union + eps) - (hull - union) / (hull + eps)


class BoxLoss(NamedTuple):
    l1: torch.Tensor
    giou: torch.Tensor


def box_loss(predicted: torch.Tensor, target: torch.Tensor, is_image: torch.Tensor | None = None) -> BoxLoss:
    """The reference's ``get_bbox_loss``: L1 over the four ``cxcywh`` numbers (summed per box) and 1 - GIoU, each
    averaged over the boxes. Rows where ``is_image`` is true (a whole-image caption, target = the whole image)
    do not count. Without a region row both losses are 0 (the reference divides by zero there).

    The reference zeroes the GIoU term when any box has x1 < x0; a sigmoid ``cxcywh`` prediction never has, and
    the data path never makes such a target, so that data-dependent branch (a host sync) is left out."""
    l1 = (predicted - target).abs().sum(dim=-1)
    giou = 1 - paired_generalized_iou(box_cxcywh_to_xyxy(predicted), box_cxcywh_to_xyxy(target))
    if is_image is None:
        return BoxLoss(l1.mean(), giou.mean())
    weight = (~is_image.bool()).to(predicted.dtype)
    count = weight.sum().clamp(min=1)
    return BoxLoss((l1 * weight).sum() / count, (giou * weight).sum() / count)


class BoxHead(nn.Module):
    """The fused [CLS] -> a normalised ``cxcywh`` box. The reference's ``bbox_head`` (``build_mlp``): Linear(d, 2d),
    LayerNorm, GELU, Linear(2d, 4), then a sigmoid; ``self.mlp`` is that ``nn.Sequential``, so a reference
    checkpoint's ``bbox_head.{0,1,3}.{weight,bias}`` load as ``mlp.{0,1,3}.*``."""

    def __init__(self, width: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.LayerNorm(2 * width), nn.GELU(), nn.Linear(2 * width, 4)
        )

    def forward(self, fused_cls: torch.Tensor) -> torch.Tensor:
        return self.mlp(fused_cls).sigmoid()


def token_grid(vision: nn.Module) -> tuple[int, int]:
    """(rows, cols) of the patch tokens a :class:`cclm.model.vision.VisionTower` returns after its first
    (summary) token, row-major: an open_clip ViT's patch grid, a timm tower's final-stage grid (Swin: image / 32).
    Region masks (:func:`cclm.data.regions.patch_masks`) are drawn on this grid."""
    visual = vision.visual
    if getattr(vision, "is_timm", False):
        from cclm.model.resize import timm_trunk_image_size

        trunk = visual.trunk
        size = timm_trunk_image_size(trunk)
        reduction = int(trunk.feature_info[-1]["reduction"])
        if not size or size % reduction:
            raise ValueError(
                f"the timm tower's input size {size} is not a multiple of its stride {reduction}"
            )
        return size // reduction, size // reduction
    rows, cols = visual.grid_size
    return int(rows), int(cols)
