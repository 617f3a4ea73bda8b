"""FLOPs of a cross-view training step, counted (not guessed) with torch's FlopCounterMode on a dummy batch, for
MFU (the trainer divides by :func:`cclm.runtime.flops.peak_flops`)."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode


def dummy_batch(
    view: str,
    batch_size: int,
    max_length: int,
    image_size: int,
    vocab_size: int,
    parallel_pairs: bool = False,
) -> dict:
    """``parallel_pairs``: a region batch also carries one parallel pair per text (the cross-lingual consistency
    objective's input; in training their number is the parallel-text batch size)."""
    ids = torch.randint(5, vocab_size, (batch_size, max_length))
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, -100)
    labels[:, 1 : 1 + max(1, int(0.4 * max_length))] = 7  # ~40% masked positions, as in training
    batch = {
        "text_ids": ids,
        "text_mask": mask,
        "mlm_ids": ids,
        "mlm_labels": labels,
        "group_ids": torch.arange(batch_size),
    }
    if view in ("image", "region"):
        batch["images"] = torch.zeros(batch_size, 3, image_size, image_size, dtype=torch.uint8)
    if view == "region":  # one region text per image, a centred box of a quarter of the image
        batch["idx_to_group_img"] = torch.arange(batch_size)
        batch["boxes"] = torch.tensor([[0.25, 0.25, 0.75, 0.75]]).repeat(batch_size, 1)
        batch["is_image"] = torch.zeros(batch_size, dtype=torch.bool)
        if parallel_pairs:
            batch["parallel_ids"], batch["parallel_mask"] = ids.clone(), mask.clone()
            batch["parallel_other_ids"], batch["parallel_other_mask"] = ids.clone(), mask.clone()
    elif view == "text":
        batch["other_ids"], batch["other_mask"] = ids.clone(), mask.clone()
    return batch


def train_flops_per_sample(model, view: str, max_length: int, image_size: int) -> float:
    """Forward+backward FLOPs of one sample of ``view`` (3x the counted forward), all objectives included."""
    batch_size = 2
    pairs = bool(model.cfg.objectives.xlc_weight)
    batch = dummy_batch(view, batch_size, max_length, image_size, model.encoder_config.vocab_size, pairs)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(batch, view)
    return 3.0 * counter.get_total_flops() / batch_size
