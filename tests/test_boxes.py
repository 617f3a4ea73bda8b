"""cclm.model.boxes: conversions and GIoU equal torchvision's on random boxes, the box loss is the reference's
``get_bbox_loss`` (L1 + GIoU on cxcywh, whole-image rows left out) with finite gradients, the box head has the
reference's ``bbox_head`` shape, and the token grid is the one the towers return."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, generalized_box_iou

from cclm.model.boxes import (
    BoxHead,
    box_cxcywh_to_xyxy,
    box_loss,
    box_xyxy_to_cxcywh,
    denormalize_boxes,
    normalize_boxes,
    paired_generalized_iou,
    token_grid,
)
from cclm.model.vision import VisionTower
from tests.test_convert_reference import SWIN_B_SHAPE, TINY_SWIN, TINY_SWIN_B

pytestmark = pytest.mark.usefixtures("one_thread")


def random_xyxy(n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    corner = torch.rand(n, 2, generator=g, dtype=torch.float64) * 0.8 * scale
    size = (torch.rand(n, 2, generator=g, dtype=torch.float64) * 0.5 + 1e-3) * scale
    return torch.cat([corner, corner + size], dim=1)


def test_conversions_equal_torchvisions_and_invert_each_other():
    boxes = random_xyxy(200, 0, scale=640)
    cxcywh = box_xyxy_to_cxcywh(boxes)
    torch.testing.assert_close(cxcywh, box_convert(boxes, "xyxy", "cxcywh"))
    torch.testing.assert_close(box_cxcywh_to_xyxy(cxcywh), box_convert(cxcywh, "cxcywh", "xyxy"))
    torch.testing.assert_close(box_cxcywh_to_xyxy(cxcywh), boxes)


def test_normalising_to_an_image_size_and_back():
    boxes = random_xyxy(50, 1, scale=300)
    normalised = normalize_boxes(boxes, 640, 480)
    torch.testing.assert_close(normalised[:, 0], boxes[:, 0] / 640)
    torch.testing.assert_close(normalised[:, 3], boxes[:, 3] / 480)
    torch.testing.assert_close(denormalize_boxes(normalised, 640, 480), boxes)


def test_paired_giou_is_the_diagonal_of_torchvisions_including_disjoint_and_nested_pairs():
    a, b = random_xyxy(300, 2), random_xyxy(300, 3)
    b[:10] = a[:10]  # identical: GIoU 1
    b[10:20] = a[10:20] + 2.0  # far apart: GIoU < 0
    b[20:30] = (a[20:30] + a[20:30].roll(2, dims=1)) / 2  # overlapping differently
    ours = paired_generalized_iou(a, b, eps=0)
    torch.testing.assert_close(ours, torch.diag(generalized_box_iou(a, b)))
    assert torch.allclose(ours[:10], torch.ones(10, dtype=ours.dtype)) and (ours[10:20] < 0).all()


def test_box_loss_is_the_references_l1_plus_giou_without_whole_image_rows():
    predicted = box_xyxy_to_cxcywh(random_xyxy(8, 4)).float().requires_grad_()
    target = box_xyxy_to_cxcywh(random_xyxy(8, 5)).float()
    is_image = torch.tensor([1, 0, 0, 1, 0, 0, 0, 0], dtype=torch.bool)
    loss = box_loss(predicted, target, is_image)
    region = ~is_image
    l1 = (
        F.l1_loss(predicted, target, reduction="none").sum()
        - F.l1_loss(predicted[is_image], target[is_image], reduction="none").sum()
    )
    giou = torch.diag(
        generalized_box_iou(box_cxcywh_to_xyxy(predicted[region]), box_cxcywh_to_xyxy(target[region]))
    )
    torch.testing.assert_close(loss.l1, l1 / 6)
    torch.testing.assert_close(loss.giou, (1 - giou).sum() / 6)
    (loss.l1 + loss.giou).backward()
    assert torch.isfinite(predicted.grad).all() and predicted.grad[region].abs().sum() > 0
    assert (predicted.grad[is_image] == 0).all()
    whole = box_loss(predicted, target)
    torch.testing.assert_close(whole.l1, F.l1_loss(predicted, target, reduction="none").sum() / 8)


def test_box_loss_gradients_stay_finite_for_degenerate_and_whole_image_only_batches():
    predicted = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.2, 0.2, 0.1, 0.0]], requires_grad=True)
    target = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.7, 0.7, 0.2, 0.2]])
    loss = box_loss(predicted, target)
    (loss.l1 + loss.giou).backward()
    assert torch.isfinite(loss.giou) and torch.isfinite(predicted.grad).all()
    only_images = box_loss(predicted, target, torch.tensor([True, True]))
    assert only_images.l1.item() == 0 and only_images.giou.item() == 0


def test_box_head_has_the_references_bbox_head_shape_and_predicts_unit_boxes():
    head = BoxHead(64)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {
        "mlp.0.weight": (128, 64),
        "mlp.0.bias": (128,),
        "mlp.1.weight": (128,),
        "mlp.1.bias": (128,),
        "mlp.3.weight": (4, 128),
        "mlp.3.bias": (4,),
    }
    out = head(torch.randn(5, 64) * 10)
    assert out.shape == (5, 4) and ((out > 0) & (out < 1)).all()


@pytest.mark.parametrize(
    "tower, size, grid",
    [
        ({"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16}, 32, (4, 4)),
        ({"timm_model_name": TINY_SWIN, "image_size": 32, "timm_pool": "", "timm_proj": "none"}, 32, (4, 4)),
        (
            {"timm_model_name": TINY_SWIN_B, "timm_pool": "", "timm_proj": "none"},
            SWIN_B_SHAPE["img_size"],
            (7, 7),
        ),
    ],
    ids=["vit", "swin-2-stages", "swin-b-shape"],
)
def test_token_grid_is_the_grid_of_the_tokens_the_tower_returns(tower, size, grid):
    vision = VisionTower(tower, embed_dim=16, load_pretrained=False).eval()
    assert token_grid(vision) == grid
    with torch.no_grad():
        tokens = vision(torch.zeros(1, 3, size, size, dtype=torch.uint8))
    assert tokens.shape[1] == 1 + grid[0] * grid[1]
