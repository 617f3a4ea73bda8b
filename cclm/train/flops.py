"""FLOPs of a cross-view training step, counted (not guessed) with torch's FlopCounterMode on dummy batches, for
MFU (the trainer divides by :func:`cclm.runtime.flops.peak_flops`).

What the counts cover:

* attention: on the CPU, where the counting runs, ``scaled_dot_product_attention`` dispatches to
  ``aten._scaled_dot_product_flash_attention_for_cpu``, for which torch registers no formula (it would count 0).
  :func:`count_flops` adds torch's own SDPA formula for it (and its backward), so the CPU count equals what the
  GPU kernels (flash, memory-efficient, cuDNN: all registered) are counted at;
* each batch at its own shape: a batch is padded to its longest text, not to ``max_length``, and a region batch
  holds M images and N > M region-text pairs. :class:`StepFlops` is fitted on a few dummy batches of different
  shapes: the FLOPs of a step are a polynomial in the batch's shapes (linear in the images, the texts and the MLM
  positions, quadratic in the text lengths through attention), so a handful of exact counts fixes it exactly;
  the trainer then charges each batch from its shapes alone (:meth:`StepFlops.batch_flops`: host arithmetic on
  tensor shapes, no device read).

The training FLOPs are three times the forward's (the backward costs two forwards), as MFU conventionally counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

IGNORE_INDEX = -100  # cclm.data.masking.IGNORE_INDEX (an MLM label that is not predicted)
MLM_SHARE = 0.4  # masked positions of a dummy row at full length (the figure StepFlops' float value assumes)
TRAIN_FACTOR = 3.0  # forward + backward = 3 forwards

_aten = torch.ops.aten


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flop(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# The CPU attention kernels torch's FLOP registry leaves out, with the formula of their GPU counterparts.
CPU_ATTENTION_FLOPS: dict[Any, Callable] = {}
if hasattr(_aten, "_scaled_dot_product_flash_attention_for_cpu"):
    CPU_ATTENTION_FLOPS[_aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flop
if hasattr(_aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
    CPU_ATTENTION_FLOPS[_aten._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_cpu_backward_flop


def flop_counter() -> FlopCounterMode:
    """torch's FlopCounterMode with the CPU attention kernels counted: the one counter for cclm's models and the
    benchmarks' peers, so that FLOPs (and MFU) compare."""
    return FlopCounterMode(display=False, custom_mapping=dict(CPU_ATTENTION_FLOPS))


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of ``fn()`` run under ``no_grad`` (a forward), attention included on every device. The global RNG
    is left as it was (a count's dummy data and dropout draw from it)."""
    counter = flop_counter()
    with torch.random.fork_rng(devices=[]), torch.no_grad(), counter:
        fn()
    return int(counter.get_total_flops())


# ------------------------------------------------------------------------------------------------- batches
def dummy_batch(
    view: str,
    batch_size: int,
    max_length: int,
    image_size: int,
    vocab_size: int,
    parallel_pairs: bool = False,
    *,
    other_length: int | None = None,
    images: int | None = None,
    masked: int | None = None,
    pairs: int | None = None,
    pair_lengths: tuple[int, int] | None = None,
) -> dict:
    """A batch of ``batch_size`` texts of ``max_length`` tokens. ``parallel_pairs``: a region batch also carries
    parallel pairs (the cross-lingual consistency objective's input; in training their number is the
    parallel-text batch size). The shape of every part can be set: ``other_length`` (a text batch's side B),
    ``images`` (a region batch's images; default one per text), ``masked`` (MLM positions per row; default
    ~40% of ``max_length``), ``pairs`` and ``pair_lengths`` (a region batch's parallel pairs, default one per
    text at ``max_length``)."""
    ids = torch.randint(5, vocab_size, (batch_size, max_length))
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    masked = max(1, int(MLM_SHARE * max_length)) if masked is None else masked
    labels[:, 1 : 1 + masked] = 7
    batch = {
        "text_ids": ids,
        "text_mask": mask,
        "mlm_ids": ids,
        "mlm_labels": labels,
        "group_ids": torch.arange(batch_size),
    }
    if view in ("image", "region"):
        count = batch_size if view == "image" or images is None else images
        batch["images"] = torch.zeros(count, 3, image_size, image_size, dtype=torch.uint8)
    if view == "region":  # region texts spread over the images; a centred box of a quarter of the image
        batch["idx_to_group_img"] = torch.arange(batch_size) % batch["images"].shape[0]
        batch["boxes"] = torch.tensor([[0.25, 0.25, 0.75, 0.75]]).repeat(batch_size, 1)
        batch["is_image"] = torch.zeros(batch_size, dtype=torch.bool)
        if parallel_pairs:
            count = batch_size if pairs is None else pairs
            side_a, side_b = pair_lengths or (max_length, max_length)
            for key, length in (("parallel", side_a), ("parallel_other", side_b)):
                batch[f"{key}_ids"] = torch.randint(5, vocab_size, (count, length))
                batch[f"{key}_mask"] = torch.ones(count, length, dtype=torch.long)
    elif view == "text":
        length = max_length if other_length is None else other_length
        batch["other_ids"] = torch.randint(5, vocab_size, (batch_size, length))
        batch["other_mask"] = torch.ones(batch_size, length, dtype=torch.long)
    return batch


# ----------------------------------------------------------------------------------------------- the model
def batch_shape(view: str, batch: Mapping[str, Any]) -> dict[str, int]:
    """What a batch's FLOPs depend on, read from its tensors' shapes (and, for the MLM positions, its labels on
    the host): texts, images, text lengths, MLM positions, parallel pairs."""
    texts, length = (int(n) for n in batch["text_ids"].shape)
    shape = {"texts": texts, "length": length, "masked": _masked(batch, texts, length)}
    if view == "text":
        shape["other_length"] = int(batch["other_ids"].shape[1])
    if view == "region":
        shape["images"] = int(batch["images"].shape[0])
        if "parallel_ids" in batch:
            shape["pairs"] = int(batch["parallel_ids"].shape[0])
            shape["pair_length"] = int(batch["parallel_ids"].shape[1])
            shape["pair_other_length"] = int(batch["parallel_other_ids"].shape[1])
    return shape


def _masked(batch: Mapping[str, Any], texts: int, length: int) -> int:
    labels = batch.get("mlm_labels")
    if labels is None:
        return 0
    if labels.device.type != "cpu":  # reading a device tensor would make the host wait: the dummy's share
        return texts * max(1, int(MLM_SHARE * length))
    return int((labels != IGNORE_INDEX).sum())


def features(view: str, shape: Mapping[str, int]) -> dict[str, float]:
    """The terms the FLOPs of a batch are a linear combination of. Every text runs the text and fusion stacks
    (constant, linear and quadratic in its length: attention), every MLM position the vocabulary head, every
    image the vision tower (the image view: one image per text). A text batch's sides cross-attend (the
    product of their lengths); a region batch's parallel pairs run both sides over an image."""
    n, length = shape["texts"], shape["length"]
    out = {"texts": n, "texts*L": n * length, "texts*L^2": n * length**2, "masked": shape["masked"]}
    if view == "text":
        other = shape["other_length"]
        out.update({"texts*Lb": n * other, "texts*Lb^2": n * other**2, "texts*L*Lb": n * length * other})
    if view == "region":
        out["images"] = shape["images"]
        if shape.get("pairs"):
            k, a, b = shape["pairs"], shape["pair_length"], shape["pair_other_length"]
            out.update({"pairs": k, "pairs*L": k * (a + b), "pairs*L^2": k * (a * a + b * b)})
    return {key: float(value) for key, value in out.items()}


class StepFlops(float):
    """Training FLOPs of one view's batches as a function of their shapes (fitted by :func:`step_flops`).

    The float value is the per-sample figure of a full-length batch (``max_length`` tokens, ~40% of them
    masked; for regions one image and one parallel pair per text), what older code multiplied by the number of
    samples; :meth:`batch_flops` is what the trainer charges a real batch."""

    view: str
    coefficients: dict[str, float]

    def __new__(cls, per_sample: float, view: str, coefficients: Mapping[str, float]):
        obj = super().__new__(cls, per_sample)
        obj.view, obj.coefficients = view, dict(coefficients)
        return obj

    def __reduce__(self):
        return (StepFlops, (float(self), self.view, self.coefficients))

    def at(self, shape: Mapping[str, int]) -> float:
        terms = features(self.view, shape)
        return sum(self.coefficients.get(key, 0.0) * value for key, value in terms.items())

    def batch_flops(self, batch: Mapping[str, Any]) -> float:
        """Forward + backward FLOPs of ``batch`` at its own shapes."""
        return self.at(batch_shape(self.view, batch))


def _lengths(max_length: int) -> tuple[int, int, int]:
    """Three text lengths to count at: ``max_length``, about half and a quarter of it (at least 3 tokens, room
    for two MLM positions after [CLS]); a tiny ``max_length`` repeats some (the fit is then exact at the lengths
    a batch can have, which is all it needs)."""
    full = max(3, max_length)
    lengths = sorted({full, max(3, math.ceil(full / 2)), max(3, full // 4)}, reverse=True)
    lengths += [lengths[-1]] * (3 - len(lengths))
    return lengths[0], lengths[1], lengths[2]


def _designs(view: str, max_length: int, pairs: bool) -> list[dict[str, int]]:
    """The shapes counted to fit a view's polynomial: two texts throughout (the per-batch terms of ITC and the
    hard-negative draw, quadratic in the batch but tiny, stay in the per-text constant), three lengths, and the
    other parts varied one at a time; as many independent shapes as the polynomial has terms."""
    a, b, c = _lengths(max_length)
    base = {"texts": 2, "length": a, "masked": 2}
    if view == "text":
        base["other_length"] = a
        grid = [(a, a), (a, b), (a, c), (b, a), (b, b), (c, a)]  # unisolvent for a quadratic in two lengths
        designs = [dict(base, length=x, other_length=y) for x, y in grid]
    else:
        designs = [dict(base, length=x) for x in (a, b, c)]
    designs.append(dict(base, masked=4))
    if view == "region":
        for design in designs:
            design["images"] = 2
        designs.append(dict(base, images=1))
        if pairs:
            for design in designs:
                design.update(pairs=2, pair_length=a, pair_other_length=a)
            designs += [
                dict(designs[0], pair_length=b, pair_other_length=b),
                dict(designs[0], pair_length=c, pair_other_length=c),
                dict(designs[0], pairs=1),
            ]
    return designs


def _dummy_at(view: str, shape: Mapping[str, int], image_size: int, vocab_size: int) -> dict:
    pairs = bool(shape.get("pairs"))
    return dummy_batch(
        view,
        shape["texts"],
        shape["length"],
        image_size,
        vocab_size,
        pairs,
        other_length=shape.get("other_length"),
        images=shape.get("images"),
        masked=shape["masked"] // shape["texts"],
        pairs=shape.get("pairs"),
        pair_lengths=(shape["pair_length"], shape["pair_other_length"]) if pairs else None,
    )


def step_flops(model, view: str, max_length: int, image_size: int) -> StepFlops:
    """Count the model's forward on :func:`_designs`' dummy batches and fit the view's FLOPs polynomial. The
    global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        return _fit(model, view, max_length, image_size)


def _fit(model, view: str, max_length: int, image_size: int) -> StepFlops:
    pairs = view == "region" and bool(model.cfg.objectives.xlc_weight)
    vocab = model.encoder_config.vocab_size
    designs = _designs(view, max_length, pairs)
    keys = list(features(view, designs[0]))
    rows, counts = [], []
    for shape in designs:
        batch = _dummy_at(view, shape, image_size, vocab)
        counts.append(TRAIN_FACTOR * count_flops(lambda b=batch: model(b, view)))
        rows.append([features(view, shape)[k] for k in keys])
    matrix = np.array(rows, dtype=np.float64)
    if len(set(_lengths(max_length))) == 3 and np.linalg.matrix_rank(matrix) < len(keys):
        raise RuntimeError(f"FLOPs fit of the {view} view: the counted shapes do not fix every term")
    solution = np.linalg.lstsq(matrix, np.array(counts, dtype=np.float64), rcond=None)[0]
    coefficients = dict(zip(keys, (float(x) for x in solution)))
    full = {"texts": 1, "length": max_length, "masked": max(1, int(MLM_SHARE * max_length))}
    if view == "text":
        full["other_length"] = max_length
    if view == "region":
        full["images"] = 1
        if pairs:
            full.update(pairs=1, pair_length=max_length, pair_other_length=max_length)
    flops = StepFlops(0.0, view, coefficients)
    return StepFlops(flops.at(full), view, coefficients)


def train_flops_per_sample(model, view: str, max_length: int, image_size: int) -> StepFlops:
    """Forward+backward FLOPs of ``view``'s batches, all objectives included: a float (one full-length sample;
    for regions one image with one text) that also charges any batch at its own shapes
    (:meth:`StepFlops.batch_flops`, what the trainer logs)."""
    return step_flops(model, view, max_length, image_size)
