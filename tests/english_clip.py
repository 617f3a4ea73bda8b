"""Fitting a small English CLIP on the synthetic world's English captions with open_clip's own loss: the frozen
starting point of the MLA tests and benchmark (a real user starts from a released CLIP instead)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cclm.recipes.clip import normalize_images


def fit_clip(
    clip: nn.Module,
    tokenize: Callable[[list[str]], torch.Tensor],
    data,
    steps: int,
    lr: float = 1e-3,
    device: str | torch.device = "cpu",
) -> list[float]:
    """Train a CLIP contrastively on the image view of a :class:`cclm.data.pipeline.PretrainData` (e.g. English
    captions of the synthetic world), with open_clip's own loss. Returns the loss of every step."""
    from open_clip.loss import ClipLoss

    loss_fn = ClipLoss()
    clip.to(device).train()
    optimizer = torch.optim.AdamW([p for p in clip.parameters() if p.requires_grad], lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    history = []
    for _ in range(steps):
        batch = data.next_batch("image")
        images = normalize_images(batch["images"].to(device))
        texts = tokenize(batch["texts"]).to(device)
        image_feat = F.normalize(clip.encode_image(images), dim=-1)
        text_feat = F.normalize(clip.encode_text(texts), dim=-1)
        loss = loss_fn(image_feat, text_feat, clip.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, 4.6052)
        history.append(float(loss.detach()))
    clip.eval()
    return history
