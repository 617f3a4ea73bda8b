"""Torch datasets over task examples (images decoded lazily by :func:`cclm.data.images.load_image`, or, for
training with ``data.augment``, augmented by :class:`cclm.tasks.images.TaskAugment`), the collator that normalises
(the model's own text normaliser) and tokenizes texts, and the training batches that tell the augmentation the
epoch (:class:`TaskBatches`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import ConcatDataset, Dataset

from cclm.config import ConfigError
from cclm.data.images import load_image
from cclm.data.normalize import Normalizer, normalizer_for
from cclm.model.text import token_limit
from cclm.runtime.sources import EpochBatches
from cclm.tasks.images import TaskAugment
from cclm.tasks.task_data import ClassificationData, ClassificationExample, RetrievalData


def _check_augment(augment: TaskAugment | None, image_size: int) -> TaskAugment | None:
    if augment is not None and augment.size != image_size:
        raise ValueError(
            f"the augmentation makes {augment.size} px images, the dataset needs {image_size} px"
        )
    return augment


class ClassificationDataset(Dataset):
    """Items: ``images`` [3,H,W] (or [2,3,H,W] for image pairs), ``text``, ``label``. With ``augment`` (training
    only: dev and test sets never get one) each image is augmented with the randomness of (seed, epoch,
    ``index``, its position in the example)."""

    def __init__(
        self,
        examples: Sequence[ClassificationExample],
        roots: Mapping[str, str],
        image_size: int,
        augment: TaskAugment | None = None,
    ):
        self.examples, self.roots, self.image_size = list(examples), dict(roots), image_size
        self.augment = _check_augment(augment, image_size)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.examples[index]
        paths = [ref.resolve(self.roots) for ref in example.images]
        if self.augment is None:
            images = [load_image(path, self.image_size) for path in paths]
        else:
            text, lang, label = self.augment_inputs(example)
            images = [
                self.augment.load(path, text, lang, index, slot, label) for slot, path in enumerate(paths)
            ]
        return {"images": images[0] if len(images) == 1 else torch.stack(images), **self.fields(example)}

    def augment_inputs(self, example) -> tuple[str, str, int | None]:
        """What the augmentation's flip check reads: the text, its language and the label (subclasses over other
        example types change this)."""
        return example.text, example.language, example.label

    def set_epoch(self, epoch: int) -> None:
        if self.augment is not None:
            self.augment.set_epoch(epoch)

    def fields(self, example) -> dict[str, Any]:
        """What an item carries besides its images (subclasses over other example types change this)."""
        return {"text": example.text, "label": example.label}


class CaptionImagePairs(Dataset):
    """Retrieval training: one item per caption with its image; ``group`` (the image index) marks duplicates.
    With ``augment``, caption ``i``'s image is augmented as training example ``index_offset + i`` (the offsets
    keep the examples of several files apart)."""

    def __init__(
        self,
        data: RetrievalData,
        roots: Mapping[str, str],
        image_size: int,
        group_offset: int = 0,
        augment: TaskAugment | None = None,
        index_offset: int = 0,
    ):
        self.data, self.roots, self.image_size, self.group_offset = (
            data,
            dict(roots),
            image_size,
            group_offset,
        )
        self.augment, self.index_offset = _check_augment(augment, image_size), int(index_offset)
        # the language the flip check reads captions in: the file's, when it has one
        self.language = next(iter(data.languages)) if len(data.languages) == 1 else ""

    def __len__(self) -> int:
        return len(self.data.texts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_index = self.data.text_image[index]
        path = self.data.images[image_index].resolve(self.roots)
        text = self.data.texts[index]
        if self.augment is None:
            image = load_image(path, self.image_size)
        else:
            image = self.augment.load(path, text, self.language, self.index_offset + index)
        return {"images": image, "text": text, "group": self.group_offset + image_index}

    def set_epoch(self, epoch: int) -> None:
        if self.augment is not None:
            self.augment.set_epoch(epoch)


class TaskConcat(ConcatDataset):
    """Several training sets as one, passing :meth:`set_epoch` on to each."""

    def set_epoch(self, epoch: int) -> None:
        for dataset in self.datasets:
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)


def training_dataset(
    kind: str,
    datas: Sequence[ClassificationData | RetrievalData],
    roots: Mapping[str, str],
    image_size: int,
    augment: TaskAugment | None = None,
) -> Dataset:
    """The training set of a task's files: retrieval (``kind``) files as caption-image pairs whose image groups
    and augmentation indices do not collide across files; classification files as one list of examples."""
    if kind == "retrieval":
        parts, groups, indices = [], 0, 0
        for data in datas:
            parts.append(CaptionImagePairs(data, roots, image_size, groups, augment, indices))
            groups, indices = groups + len(data.images), indices + len(data.texts)
        return TaskConcat(parts)
    return ClassificationDataset([e for d in datas for e in d.examples], roots, image_size, augment)


class TaskBatches(EpochBatches):
    """:class:`~cclm.runtime.sources.EpochBatches` that hands the epoch to its dataset (``set_epoch``) before each
    epoch's loader starts (and its workers copy the dataset): the augmentation of an example is then a function
    of (seed, epoch, index), and a run resumed mid-epoch augments as the uninterrupted one."""

    def _open(self):
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(self.epoch)
        return super()._open()


class TaskCollator:
    """Stacks images and tokenizes texts (padding to the longest, truncating by tokens at ``max_length``), each
    text first put through ``normalize`` (the model's text normaliser; None: the text as given). Build it with
    :meth:`for_model` so that fine-tuning and scoring read texts as the model was trained to."""

    def __init__(self, tokenizer, max_length: int, normalize: Normalizer | None = None):
        self.tokenizer, self.max_length, self.normalize = tokenizer, max_length, normalize

    @classmethod
    def for_model(cls, backbone, tokenizer, max_length: int = 0) -> TaskCollator:
        """The collator of a cross-view model (``backbone.cfg.text``): its normaliser and its ``max_length``, or
        a task's own cap ``max_length`` (``data.max_length``) when that is > 0, shorter or longer than the
        model's (the reference fine-tunes XVNLI, xFlickr&CO and WIT at 80 tokens, models pretrained at 40), up
        to what the encoder's position table holds."""
        text_cfg = backbone.cfg.text
        length = int(text_cfg.max_length)
        if max_length and int(max_length) > 0:
            length = int(max_length)
            limit = token_limit(backbone.encoder_config)
            if length > limit:
                raise ConfigError(
                    f"data.max_length={length}: the text encoder has "
                    f"{backbone.encoder_config.max_position_embeddings} positions (at most {limit} tokens)"
                )
        return cls(tokenizer, length, normalizer_for(text_cfg))

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if self.normalize is not None:
            texts = [self.normalize(t) for t in texts]
        encoded = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"text_ids": encoded["input_ids"], "text_mask": encoded["attention_mask"]}

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.tokenize([item["text"] for item in items])
        batch["images"] = torch.stack([item["images"] for item in items])
        if "label" in items[0]:
            batch["labels"] = torch.tensor([item["label"] for item in items], dtype=torch.long)
        if "group" in items[0]:
            batch["group_ids"] = torch.tensor([item["group"] for item in items], dtype=torch.long)
        return batch
