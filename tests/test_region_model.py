"""The region view of CrossViewModel (multi-grained pretraining, CCLM-4M).

Specification: a region batch returns the image view's losses plus the box losses, all finite, with a gradient
for every parameter; each image is encoded once and its tokens shared by its texts; a region text sees only the
vision tokens of its box (changing the others changes nothing it computes), a whole-image text sees the image as
the image view does (same losses); the masks the model draws from the boxes are the data path's; the box losses
are the reference's get_bbox_loss of the box head's prediction over the whole image, and they fall when a tiny
model trains on a toy grounding task."""

from __future__ import annotations

import random

import pytest
import torch

from cclm.data.regions import patch_masks
from cclm.model import CrossViewModel
from cclm.model.boxes import box_loss, box_xyxy_to_cxcywh, token_grid

pytestmark = pytest.mark.usefixtures("one_thread")


def region_batch(vocab: int, images: int = 3, texts: int = 6, seed: int = 0) -> dict:
    """``texts`` texts over ``images`` random images (the first text of each image is its whole-image caption)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (texts, 7), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    corner = torch.rand(texts, 2, generator=g) * 0.5
    boxes = torch.cat([corner, corner + 0.2 + 0.3 * torch.rand(texts, 2, generator=g)], dim=1)
    idx = torch.arange(texts) % images
    is_image = torch.arange(texts) < images
    boxes[is_image] = torch.tensor([0.0, 0.0, 1.0, 1.0])
    return {
        "images": torch.randint(0, 255, (images, 3, 32, 32), dtype=torch.uint8, generator=g),
        "idx_to_group_img": idx,
        "text_ids": ids,
        "text_mask": torch.ones_like(ids),
        "mlm_ids": ids,
        "mlm_labels": labels,
        "group_ids": torch.arange(texts),
        "boxes": boxes,
        "is_image": is_image,
    }


@pytest.fixture
def box_model_cfg(tiny_model_cfg):
    tiny_model_cfg.objectives.bbox = True
    return tiny_model_cfg


def test_a_region_batch_has_finite_losses_and_a_gradient_for_every_parameter(box_model_cfg):
    model = CrossViewModel(box_model_cfg, load_pretrained=False)
    out = model(region_batch(model.encoder_config.vocab_size), "region")
    assert set(out) == {"itc", "itm", "mlm", "bbox", "giou", "loss"}
    assert all(torch.isfinite(v) for v in out.values())
    assert torch.allclose(out["loss"], sum(out[k] for k in ("itc", "itm", "mlm", "bbox", "giou")))
    out["loss"].backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, dead
    assert any(n.startswith("box_head.") for n in model.new_parameter_names())


def test_each_image_is_encoded_once(box_model_cfg):
    model = CrossViewModel(box_model_cfg, load_pretrained=False)
    seen = []
    model.vision.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[0]))
    model(region_batch(model.encoder_config.vocab_size, images=3, texts=6), "region")
    assert seen == [3]


def test_without_a_box_head_a_region_batch_trains_the_image_objectives(tiny_model_cfg):
    model = CrossViewModel(tiny_model_cfg, load_pretrained=False)
    assert model.box_head is None
    out = model(region_batch(model.encoder_config.vocab_size), "region")
    assert set(out) == {"itc", "itm", "mlm", "loss"}


def test_the_model_draws_the_data_paths_masks_from_the_boxes(box_model_cfg):
    model = CrossViewModel(box_model_cfg, load_pretrained=False)
    batch = region_batch(model.encoder_config.vocab_size)
    expected = patch_masks(batch["boxes"], *token_grid(model.vision))
    expected[batch["is_image"]] = True
    assert torch.equal(model.region_masks(batch["boxes"], batch["is_image"]), expected)
    assert token_grid(model.vision) == (4, 4)  # 32 px, patch 8


def fused_regions(model, batch, atts):
    query, _ = model.encode_text(batch["text_ids"], batch["text_mask"])
    memory, feat, _ = model.encode_regions(batch["images"], batch["idx_to_group_img"], atts)
    return model.fuse(query, batch["text_mask"], memory, atts), feat


def test_a_region_text_sees_only_the_vision_tokens_of_its_box(box_model_cfg):
    """Vision tokens outside a box are changed (after the tower: inside a ViT every patch sees every other, as in
    the reference, so the restriction is the fusion's cross-attention and the pooled feature); the region's
    fused output and ITC feature stay the same, a whole-image text's change."""
    model = CrossViewModel(box_model_cfg, load_pretrained=False).eval()
    batch = region_batch(model.encoder_config.vocab_size, images=1, texts=2)
    batch["boxes"][1] = torch.tensor([0.0, 0.0, 0.45, 0.45])  # patches (0,0), (0,1), (1,0), (1,1) of 4 x 4
    atts = model.region_masks(batch["boxes"], batch["is_image"])
    assert atts[1, 1:].sum() == 4
    outside = ~atts[1]  # the same image for both texts
    with torch.no_grad():
        before, feat_before = fused_regions(model, batch, atts)
        handle = model.vision.register_forward_hook(
            lambda _m, _args, out: out + 5.0 * torch.randn_like(out) * outside[None, :, None]
        )
        after, feat_after = fused_regions(model, batch, atts)
        handle.remove()
    torch.testing.assert_close(after[1], before[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(feat_after[1], feat_before[1], rtol=0, atol=1e-6)
    assert not torch.allclose(after[0], before[0], atol=1e-3)  # the whole-image text sees the change


def test_whole_image_texts_give_the_image_views_losses(box_model_cfg):
    """A region batch of whole-image captions, one per image, is an image batch: the same ITC/ITM/MLM and no box
    loss (the reference gives whole-image rows none)."""
    model = CrossViewModel(box_model_cfg, load_pretrained=False).eval()
    batch = region_batch(model.encoder_config.vocab_size, images=4, texts=4)
    image_batch = {
        k: batch[k] for k in ("images", "text_ids", "text_mask", "mlm_ids", "mlm_labels", "group_ids")
    }
    with torch.no_grad():
        model.sampling_generator = torch.Generator().manual_seed(1)
        region = model(batch, "region")
        model.sampling_generator = torch.Generator().manual_seed(1)
        image = model(image_batch, "image")
    for name in ("itc", "itm", "mlm"):
        torch.testing.assert_close(region[name], image[name], rtol=1e-5, atol=1e-5)
    assert region["bbox"] == 0 and region["giou"] == 0


def test_the_box_losses_are_the_references_on_the_whole_image_prediction(box_model_cfg):
    model = CrossViewModel(box_model_cfg, load_pretrained=False).eval()
    batch = region_batch(model.encoder_config.vocab_size)
    with torch.no_grad():
        out = model(batch, "region")
        query, _ = model.encode_text(batch["text_ids"], batch["text_mask"])
        whole = model.image_to_fusion(model.vision(batch["images"]))[batch["idx_to_group_img"]]
        predicted = model.box_head(model.fuse(query, batch["text_mask"], whole)[:, 0])
    expected = box_loss(predicted, box_xyxy_to_cxcywh(batch["boxes"]), batch["is_image"])
    torch.testing.assert_close(out["bbox"], expected.l1)
    torch.testing.assert_close(out["giou"], expected.giou)


def square_task(n: int, rng: random.Random, size: int = 32) -> dict:
    """Black images with one grey square each, the text "a square", the square's box as the target."""
    images = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    boxes = []
    for i in range(n):
        side = rng.randint(10, 20)
        x, y = rng.randint(0, size - side), rng.randint(0, size - side)
        images[i, :, y : y + side, x : x + side] = 200
        boxes.append([x / size, y / size, (x + side) / size, (y + side) / size])
    ids = torch.tensor([[0, 10, 11, 2]] * n)
    return {
        "images": images,
        "idx_to_group_img": torch.arange(n),
        "text_ids": ids,
        "text_mask": torch.ones_like(ids),
        "group_ids": torch.arange(n),
        "boxes": torch.tensor(boxes),
        "is_image": torch.zeros(n, dtype=torch.bool),
    }


def test_the_box_loss_falls_on_a_toy_grounding_task(box_model_cfg):
    """Trained on the box losses alone, the tiny model finds the square on held-out images clearly better than the
    best fixed box (the mean target) does: it reads the box from the image."""
    box_model_cfg.objectives.itc_weight = 0.0
    box_model_cfg.objectives.itm_weight = 0.0
    torch.manual_seed(0)
    model = CrossViewModel(box_model_cfg, load_pretrained=False)
    rng = random.Random(0)
    held_out = square_task(64, rng)
    targets = box_xyxy_to_cxcywh(held_out["boxes"])
    fixed = box_loss(targets.mean(0, keepdim=True).expand_as(targets), targets)

    def held_out_loss() -> float:
        model.eval()
        with torch.no_grad():
            out = model(held_out, "region")
        model.train()
        return float(out["bbox"] + out["giou"])

    before = held_out_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    for _ in range(200):
        out = model(square_task(16, rng), "region")
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    after = held_out_loss()
    assert after < 0.75 * float(fixed.l1 + fixed.giou) < before, (before, float(fixed.l1 + fixed.giou), after)


# ------------------------------------------------------------------------- cross-lingual consistency (xlc)
def with_pairs(batch: dict, vocab: int, pairs: int = 5, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    source = torch.randint(5, vocab, (pairs, 6), generator=g)
    target = torch.randint(5, vocab, (pairs, 8), generator=g)
    return {
        **batch,
        "parallel_ids": source,
        "parallel_mask": torch.ones_like(source),
        "parallel_other_ids": target,
        "parallel_other_mask": torch.ones_like(target),
    }


def fused_cls(model, ids, images) -> torch.Tensor:
    return model.fuse(model.encode_text(ids, torch.ones_like(ids))[0], torch.ones_like(ids), images)[:, 0]


def test_the_consistency_is_the_mse_of_fused_cls_over_the_batch_images_with_the_source_held(box_model_cfg):
    """xlc = MSE(fused [CLS] of side B, fused [CLS] of side A), pair j over the whole image of region text
    j mod (texts); weighted into the loss; no gradient flows through side A."""
    box_model_cfg.objectives.xlc_weight = 0.5
    model = CrossViewModel(box_model_cfg, load_pretrained=False)
    vocab = model.encoder_config.vocab_size
    batch = with_pairs(region_batch(vocab, images=3, texts=4), vocab, pairs=6)
    out = model(batch, "region")
    assert {"itc", "itm", "mlm", "bbox", "giou", "xlc"} <= set(out)
    torch.testing.assert_close(
        out["loss"], sum(out[k] for k in ("itc", "itm", "mlm", "bbox", "giou")) + 0.5 * out["xlc"]
    )
    whole = model.image_to_fusion(model.vision(batch["images"]))[batch["idx_to_group_img"]]
    images = whole[torch.arange(6) % 4]
    source = fused_cls(model, batch["parallel_ids"], images)
    target = fused_cls(model, batch["parallel_other_ids"], images)
    held = torch.nn.functional.mse_loss(target, source.detach())
    torch.testing.assert_close(out["xlc"], held)
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(out["xlc"], params, allow_unused=True)
    want = torch.autograd.grad(held, params, allow_unused=True, retain_graph=True)
    both = torch.autograd.grad(torch.nn.functional.mse_loss(target, source), params, allow_unused=True)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w)
    assert any(g is not None and b is not None and not torch.allclose(g, b) for g, b in zip(got, both))
    same = {
        **batch,
        "parallel_other_ids": batch["parallel_ids"],
        "parallel_other_mask": batch["parallel_mask"],
    }
    with torch.no_grad():
        assert float(model.eval()(same, "region")["xlc"]) == 0.0  # a sentence is consistent with itself


def test_a_region_steps_counted_flops_include_the_consistency(box_model_cfg):
    from cclm.train.flops import train_flops_per_sample

    without = train_flops_per_sample(CrossViewModel(box_model_cfg, load_pretrained=False), "region", 16, 32)
    box_model_cfg.objectives.xlc_weight = 1.0
    model = CrossViewModel(box_model_cfg, load_pretrained=False)
    assert train_flops_per_sample(model, "region", 16, 32) > 1.2 * without


def test_the_consistency_needs_the_pairs_and_stays_off_at_weight_zero(box_model_cfg):
    model = CrossViewModel(box_model_cfg, load_pretrained=False)
    vocab = model.encoder_config.vocab_size
    assert "xlc" not in model(with_pairs(region_batch(vocab), vocab), "region")
    box_model_cfg.objectives.xlc_weight = 1.0
    model = CrossViewModel(box_model_cfg, load_pretrained=False)
    with pytest.raises(ValueError, match="no parallel pairs"):
        model(region_batch(vocab), "region")


# The side task: the text alone says where the box is ("left" / "right"); the images are noise.
SIDE_BOXES = {0: [0.05, 0.3, 0.45, 0.7], 1: [0.55, 0.3, 0.95, 0.7]}
LANG_A = {0: [0, 10, 12, 2], 1: [0, 11, 12, 2]}  # "left thing", "right thing"
LANG_B = {0: [0, 20, 22, 23, 2], 1: [0, 21, 22, 23, 2]}  # other token ids, another length


def side_task(n: int, words: dict, g: torch.Generator) -> dict:
    """``n`` region texts in ``words``' language with their side's box, plus ``n`` pairs A <-> B of random sides."""
    sides = torch.randint(0, 2, (n,), generator=g).tolist()
    pair_sides = torch.randint(0, 2, (n,), generator=g).tolist()
    ids = torch.tensor([words[c] for c in sides])
    a, b = torch.tensor([LANG_A[c] for c in pair_sides]), torch.tensor([LANG_B[c] for c in pair_sides])
    return {
        "images": torch.randint(0, 255, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
        "idx_to_group_img": torch.arange(n),
        "text_ids": ids,
        "text_mask": torch.ones_like(ids),
        "group_ids": torch.arange(n),
        "boxes": torch.tensor([SIDE_BOXES[c] for c in sides]),
        "is_image": torch.zeros(n, dtype=torch.bool),
        "parallel_ids": a,
        "parallel_mask": torch.ones_like(a),
        "parallel_other_ids": b,
        "parallel_other_mask": torch.ones_like(b),
    }


def test_the_consistency_carries_a_box_head_trained_on_one_language_to_another(box_model_cfg):
    """Boxes only ever paired with language A's texts, and pairs A <-> B over the batch's images: with xlc the box
    head places B's held-out texts as well as A's; without it B's boxes are no better than a guess (B's fused
    [CLS] is not one the head was trained on)."""
    box_model_cfg.objectives.itc_weight = 0.0
    box_model_cfg.objectives.itm_weight = 0.0
    box_model_cfg.objectives.mlm_weight = 0.0
    losses = {}
    for weight in (0.0, 1.0):
        box_model_cfg.objectives.xlc_weight = weight
        torch.manual_seed(0)
        model = CrossViewModel(box_model_cfg, load_pretrained=False)
        g = torch.Generator().manual_seed(0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for _ in range(100):  # long enough to converge: at 60 steps the margins moved with CPU and threads
            out = model(side_task(16, LANG_A, g), "region")
            optimizer.zero_grad()
            out["loss"].backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            losses[weight] = [
                float(sum(model(side_task(64, words, torch.Generator().manual_seed(1)), "region")[k]
                          for k in ("bbox", "giou")))
                for words in (LANG_A, LANG_B)
            ]  # fmt: skip
    (a_without, b_without), (a_with, b_with) = losses[0.0], losses[1.0]
    assert a_without < 0.3 and a_with < 0.3, losses  # A's boxes are learnt either way
    assert b_with < 1.5 * a_with, losses  # B is placed nearly as A is
    assert b_without > 0.6 > 3 * b_with, losses  # and only thanks to the consistency


# ------------------------------------------------------------------ copies that fill a region batch (collate_regions)
def test_rows_of_one_group_are_itc_positives_in_a_region_batch(tiny_model_cfg):
    """collate_regions fills a short batch with copies that keep their original's group id; the region ITC counts
    rows of one group as positives, so a copy (whose features differ from its original's under dropout) is not
    its negative. Rows 1 and 4 share a group here, with different texts."""
    from cclm import losses

    model = CrossViewModel(tiny_model_cfg, load_pretrained=False).eval()
    batch = region_batch(model.encoder_config.vocab_size)
    batch["group_ids"][4] = batch["group_ids"][1]
    with torch.no_grad():
        got = model(batch, "region")["itc"]
        masks = model.region_masks(batch["boxes"], batch["is_image"]).long()
        _, region_feat, _ = model.encode_regions(batch["images"], batch["idx_to_group_img"], masks)
        text_feat = model.encode_text(batch["text_ids"], batch["text_mask"])[1]
        temp = model.clamped_temp()
        grouped = losses.contrastive_loss(region_feat, text_feat, temp, group_ids=batch["group_ids"])
        diagonal = losses.contrastive_loss(region_feat, text_feat, temp)
    assert abs(float(grouped) - float(diagonal)) > 1e-3
    assert float(got) == pytest.approx(float(grouped), abs=1e-6)


# ------------------------------------------------------------- timm ViT towers: the summary token and the patches
TINY_VIT_TOWER = {
    "timm_model_name": "vit_tiny_patch16_224",
    "timm_pool": "",
    "timm_proj": "none",
    "image_size": 32,
}


def _tiny_vit_trunk(**trunk_kwargs):
    """A tiny timm ViT trunk (4 x 4 patches of 8 px, one block) built with ``trunk_kwargs`` (no download)."""
    import timm

    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=32,
        patch_size=8,
        depth=1,
        **trunk_kwargs,
    )


def _timm_vit_tower(**trunk_kwargs):
    from cclm.model.vision import VisionTower

    tower = VisionTower(TINY_VIT_TOWER, 16, load_pretrained=False)
    tower.visual.trunk = _tiny_vit_trunk(**trunk_kwargs)
    return tower.eval()


@pytest.mark.parametrize(
    "trunk_kwargs, prefix, class_token",
    [
        ({"class_token": False, "global_pool": "map"}, 0, False),  # open_clip's SigLIP towers
        ({"reg_tokens": 2}, 3, True),  # a class token and two registers
        ({"class_token": False, "reg_tokens": 2, "global_pool": "avg"}, 2, False),  # registers only
        ({}, 1, True),
    ],
)
def test_a_timm_vit_tower_returns_one_summary_token_and_its_patches(trunk_kwargs, prefix, class_token):
    tower = _timm_vit_tower(**trunk_kwargs)
    trunk = tower.visual.trunk
    images = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        tokens = tower(images)
        feats = trunk.forward_features(tower.normalize(images))
    assert token_grid(tower) == (4, 4) and tokens.shape == (2, 1 + 16, trunk.num_features)
    assert feats.shape[1] == prefix + 16
    torch.testing.assert_close(tokens[:, 1:], feats[:, prefix:])  # the patches, prefix tokens dropped
    summary = feats[:, 0] if class_token else feats[:, prefix:].mean(1)  # else the patches' mean, as for Swin
    torch.testing.assert_close(tokens[:, 0], summary)


def test_a_vit_tower_without_a_class_token_trains_the_region_view(tiny_model_cfg):
    """The region view of a class-token-free ViT (196 vs 195 tokens before: a patch was taken for the summary)."""
    tiny_model_cfg.objectives.bbox = True
    tiny_model_cfg.vision.tower = dict(TINY_VIT_TOWER)
    model = CrossViewModel(tiny_model_cfg, load_pretrained=False)
    model.vision.visual.trunk = _tiny_vit_trunk(class_token=False, global_pool="map")
    out = model(region_batch(model.encoder_config.vocab_size), "region")
    assert all(torch.isfinite(v) for v in out.values())
