"""OpenAI's CLIP weights were trained with QuickGELU: a tower that will load them is built with it (under plain
GELU the same weights compute other features). Nothing is downloaded: the towers are built, not loaded."""

from __future__ import annotations

import pytest
import torch
from open_clip.transformer import QuickGELU

from cclm.model.vision import VisionTower, resolve_open_clip_vision_cfg


def _activations(tower: VisionTower) -> set[type]:
    return {type(m.mlp.gelu) for m in tower.visual.transformer.resblocks}


@pytest.mark.parametrize(
    "name, pretrained, quick",
    [
        ("ViT-B-32", "openai", True),
        ("ViT-B-32", "laion2b_s34b_b79k", False),
        ("ViT-B-32", None, False),
        ("ViT-B-32-quickgelu", None, True),
    ],
)
def test_the_tower_uses_the_activation_its_weights_were_trained_with(name, pretrained, quick):
    cfg, embed_dim = resolve_open_clip_vision_cfg(name, pretrained=pretrained)
    assert bool(cfg.get("quick_gelu")) is quick
    cfg.update(layers=1)  # one block is enough to see the activation
    tower = VisionTower(cfg, embed_dim, load_pretrained=False)
    assert _activations(tower) == ({QuickGELU} if quick else {torch.nn.GELU})
