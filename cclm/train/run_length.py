"""A pretraining run's length counted as the reference counts it: ``epochs`` passes over the image-caption
data, each ``ceil(N / (batch x world x grad_accum))`` iterations, an iteration being one optimizer update per view
(under ``alternate`` with unequal stream weights, as many updates as make that many image-caption updates in
expectation)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

from cclm.config import ConfigError, DataConfig, TrainConfig, ViewSchedule
from cclm.data.shards import expand_shards, read_sizes


def _exact(value: float | int | Fraction) -> Fraction:
    """``value`` as the decimal it was written as: ``1.1`` epochs is 11/10, not 1.1000000000000000888."""
    return value if isinstance(value, Fraction) else Fraction(str(value))


def max_steps_from_epochs(
    epochs: float,
    dataset_size: int,
    batch_size: int,
    world_size: int,
    views_per_iteration: float | Fraction = 1,
    grad_accum: int = 1,
) -> int:
    """Optimizer updates of ``epochs`` epochs over ``dataset_size`` samples at ``batch_size`` per rank on
    ``world_size`` ranks, each update reading ``grad_accum`` batches: ``ceil(epochs x ceil(N / (batch x world x
    grad_accum)))`` iterations, each ``views_per_iteration`` updates (:func:`updates_per_iteration`)."""
    if (
        epochs <= 0
        or dataset_size <= 0
        or batch_size <= 0
        or world_size <= 0
        or views_per_iteration <= 0
        or grad_accum <= 0
    ):
        raise ConfigError(
            f"run length from epochs needs positive epochs ({epochs}), dataset size ({dataset_size}), "
            f"batch size ({batch_size}), world size ({world_size}), gradient accumulation ({grad_accum}) and "
            f"views per iteration ({views_per_iteration})"
        )
    per_epoch = math.ceil(dataset_size / (batch_size * world_size * grad_accum))
    iterations = math.ceil(_exact(epochs) * per_epoch)
    return math.ceil(iterations * _exact(views_per_iteration))


def updates_per_iteration(train_cfg: TrainConfig, data_cfg: DataConfig, views: Sequence[str]) -> Fraction:
    """Optimizer updates per image-caption update: 1 with one view or under ``sum`` (each update reads both),
    2 under ``interleave``, and under ``alternate`` (the view drawn per update by the streams' weights)
    ``(w_image + w_text) / w_image``: 2 at equal weights, the reference's one update per view and iteration."""
    if len(views) < 2 or ViewSchedule(train_cfg.view_schedule) == ViewSchedule.sum:
        return Fraction(1)
    if ViewSchedule(train_cfg.view_schedule) == ViewSchedule.interleave:
        return Fraction(2)
    image, text = _exact(data_cfg.image_caption.weight), _exact(data_cfg.parallel_text.weight)
    return (image + text) / image


def image_caption_size(data_cfg: DataConfig) -> int:
    """N: the image-caption samples of ``data.image_caption.shards``, summed from the ``sizes.json`` written
    with the shards (before any language filter or skipped sample). Unknown sizes (remote shards, no sizes
    file) raise a :class:`ConfigError`."""
    stream = data_cfg.image_caption
    if stream is None:
        raise ConfigError(
            "train.epochs counts passes over data.image_caption, which is not set; set train.max_steps"
        )
    try:
        # the data stream reads (and warns about) the same list: duplicates are dropped here without a second warning
        sizes = read_sizes(expand_shards(stream.shards, "data.image_caption.shards", warn=False))
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"data.image_caption.shards: {err}") from None
    unknown = [url for url, size in sizes.items() if size is None]
    if unknown:
        raise ConfigError(
            f"train.epochs: the sample count of {len(unknown)} image-caption shard(s) is unknown (e.g. "
            f"{unknown[0]}: no sizes.json entry); set train.dataset_size or train.max_steps"
        )
    return sum(int(size) for size in sizes.values())


def train_max_steps(
    train_cfg: TrainConfig, data_cfg: DataConfig, world_size: int, views: Sequence[str]
) -> int:
    """The run's optimizer updates: ``train.max_steps``, or, when ``train.epochs > 0``,
    :func:`max_steps_from_epochs` over ``train.dataset_size`` (or :func:`image_caption_size` when it is 0) at
    the image-caption batch size, ``train.grad_accum`` and the views' :func:`updates_per_iteration`."""
    if train_cfg.epochs <= 0:
        return int(train_cfg.max_steps)
    if data_cfg.image_caption is None:
        raise ConfigError(
            "train.epochs counts passes over data.image_caption, which is not set; set train.max_steps"
        )
    if data_cfg.image_caption.weight <= 0:  # a stream of weight 0 is never drawn (and not among the views)
        raise ConfigError(
            "train.epochs counts passes over data.image_caption, whose weight is 0 (never drawn); set "
            "train.max_steps"
        )
    size = int(train_cfg.dataset_size) if train_cfg.dataset_size > 0 else image_caption_size(data_cfg)
    return max_steps_from_epochs(
        float(train_cfg.epochs),
        size,
        int(data_cfg.image_caption.batch_size),
        world_size,
        updates_per_iteration(train_cfg, data_cfg, views),
        int(train_cfg.grad_accum),
    )
