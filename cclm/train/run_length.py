"""A pretraining run's length counted as the reference counts it: ``epochs`` passes over the image-caption
data, each ``ceil(N / (batch x world))`` iterations, an iteration being one optimizer update per view."""

from __future__ import annotations

import math

from cclm.config import ConfigError, DataConfig, TrainConfig
from cclm.data.shards import expand_shards, read_sizes


def max_steps_from_epochs(
    epochs: float, dataset_size: int, batch_size: int, world_size: int, views_per_iteration: int = 1
) -> int:
    """Optimizer updates of ``epochs`` epochs over ``dataset_size`` samples at ``batch_size`` per rank on
    ``world_size`` ranks: ``ceil(epochs x ceil(N / (batch x world)))`` iterations, each
    ``views_per_iteration`` updates."""
    if epochs <= 0 or dataset_size <= 0 or batch_size <= 0 or world_size <= 0 or views_per_iteration <= 0:
        raise ConfigError(
            f"run length from epochs needs positive epochs ({epochs}), dataset size ({dataset_size}), "
            f"batch size ({batch_size}), world size ({world_size}) and views per iteration "
            f"({views_per_iteration})"
        )
    per_epoch = math.ceil(dataset_size / (batch_size * world_size))
    return math.ceil(epochs * per_epoch) * views_per_iteration


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
    train_cfg: TrainConfig, data_cfg: DataConfig, world_size: int, views_per_iteration: int
) -> int:
    """The run's optimizer updates: ``train.max_steps``, or, when ``train.epochs > 0``,
    :func:`max_steps_from_epochs` over ``train.dataset_size`` (or :func:`image_caption_size` when it is 0) at
    the image-caption batch size."""
    if train_cfg.epochs <= 0:
        return int(train_cfg.max_steps)
    if data_cfg.image_caption is None:
        raise ConfigError(
            "train.epochs counts passes over data.image_caption, which is not set; set train.max_steps"
        )
    size = int(train_cfg.dataset_size) if train_cfg.dataset_size > 0 else image_caption_size(data_cfg)
    return max_steps_from_epochs(
        float(train_cfg.epochs), size, int(data_cfg.image_caption.batch_size), world_size, views_per_iteration
    )
