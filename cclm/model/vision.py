"""The image side: any open_clip visual tower, returning a token sequence whose first token summarises the image.

Towers are always built from an open_clip vision config (so a saved model can be rebuilt offline), and
pretrained weights, when asked for, are loaded afterwards from an open_clip pretrained tag, an ``hf-hub:`` /
``local-dir:`` model, or a local checkpoint file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resolve_open_clip_vision_cfg(name: str) -> tuple[dict[str, Any], int]:
    """The ``vision_cfg`` and ``embed_dim`` of an open_clip model name (built-in, ``local-dir:`` or ``hf-hub:``)."""
    import open_clip

    if name.startswith("local-dir:"):
        model_cfg = json.loads((Path(name[len("local-dir:") :]) / "open_clip_config.json").read_text())[
            "model_cfg"
        ]
    elif name.startswith("hf-hub:"):
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(name[len("hf-hub:") :], "open_clip_config.json")
        model_cfg = json.loads(Path(path).read_text())["model_cfg"]
    else:
        model_cfg = open_clip.get_model_config(name)
        if model_cfg is None:
            raise ValueError(f"unknown open_clip model '{name}'; see open_clip.list_models()")
    return dict(model_cfg["vision_cfg"]), int(model_cfg["embed_dim"])


def load_pretrained_visual_state(name: str, pretrained: str | None) -> dict[str, torch.Tensor]:
    """State dict of the visual tower of a pretrained open_clip model (tag, local file, or schema'd name)."""
    import open_clip

    if name.startswith(("hf-hub:", "local-dir:")):
        model = open_clip.create_model(name)
    else:
        model = open_clip.create_model(name, pretrained=pretrained, require_pretrained=True)
    return model.visual.state_dict()


class VisionTower(nn.Module):
    """Wraps an open_clip visual tower; ``forward(images) -> [B, 1 + N, width]``.

    ViT towers return their class token followed by the patch tokens after ``ln_post``; timm towers without a
    class token (Swin, ConvNeXt) get the mean of their spatial tokens prepended, as X-VLM/CCLM do.
    uint8 images (the data pipeline's output) are normalised here with the CLIP statistics, so that
    normalisation runs on the training device.
    """

    def __init__(self, tower_cfg: dict[str, Any], embed_dim: int):
        super().__init__()
        from open_clip.model import _build_vision_tower

        cfg = dict(tower_cfg)
        cfg.pop("output_tokens", None)
        self.visual = _build_vision_tower(embed_dim, cfg)
        self.tower_cfg = cfg
        self.is_timm = bool(cfg.get("timm_model_name"))
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.width = self._infer_width()

    def drop_clip_projection(self) -> None:
        """Remove open_clip's own image->CLIP-space projection: cclm projects the first token with its own
        ``vision_proj``, so the tower's projection would be a dead parameter (after any pretrained load)."""
        if self.is_timm:
            self.visual.head = nn.Identity()
        else:
            self.visual.proj = None

    def _infer_width(self) -> int:
        if self.is_timm:
            return int(self.visual.trunk.num_features)
        return int(self.visual.transformer.width)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            dtype = self.mean.dtype if self.mean.is_floating_point() else torch.float32
            images = (images.to(dtype) / 255.0 - self.mean) / self.std
        return images.to(next(self.visual.parameters()).dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalize(images)
        if self.is_timm:
            trunk = self.visual.trunk
            feats = trunk.forward_features(x)
            if feats.ndim == 4:
                if getattr(trunk, "output_fmt", "NCHW") == "NCHW":
                    feats = feats.permute(0, 2, 3, 1)
                feats = feats.flatten(1, 2)
                feats = torch.cat([feats.mean(dim=1, keepdim=True), feats], dim=1)
            return feats
        out = self.visual.forward_intermediates(
            x,
            indices=1,
            normalize_intermediates=True,
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=True,
        )
        return torch.cat([out["image_intermediates_prefix"][-1], out["image_intermediates"][-1]], dim=1)
