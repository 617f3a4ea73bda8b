"""Torch datasets over task examples (images decoded lazily by :func:`cclm.data.images.load_image`) and the collator
that normalises (the model's own text normaliser) and tokenizes texts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from cclm.data.images import load_image
from cclm.data.normalize import Normalizer, normalizer_for
from cclm.tasks.task_data import ClassificationExample, RetrievalData


class ClassificationDataset(Dataset):
    """Items: ``images`` [3,H,W] (or [2,3,H,W] for image pairs), ``text``, ``label``."""

    def __init__(self, examples: Sequence[ClassificationExample], roots: Mapping[str, str], image_size: int):
        self.examples, self.roots, self.image_size = list(examples), dict(roots), image_size

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.examples[index]
        images = [load_image(ref.resolve(self.roots), self.image_size) for ref in example.images]
        return {"images": images[0] if len(images) == 1 else torch.stack(images), **self.fields(example)}

    def fields(self, example) -> dict[str, Any]:
        """What an item carries besides its images (subclasses over other example types change this)."""
        return {"text": example.text, "label": example.label}


class CaptionImagePairs(Dataset):
    """Retrieval training: one item per caption with its image; ``group`` (the image index) marks duplicates."""

    def __init__(self, data: RetrievalData, roots: Mapping[str, str], image_size: int, group_offset: int = 0):
        self.data, self.roots, self.image_size, self.group_offset = (
            data,
            dict(roots),
            image_size,
            group_offset,
        )

    def __len__(self) -> int:
        return len(self.data.texts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_index = self.data.text_image[index]
        image = load_image(self.data.images[image_index].resolve(self.roots), self.image_size)
        return {"images": image, "text": self.data.texts[index], "group": self.group_offset + image_index}


class TaskCollator:
    """Stacks images and tokenizes texts (padding to the longest, truncating by tokens at ``max_length``), each
    text first put through ``normalize`` (the model's text normaliser; None: the text as given). Build it with
    :meth:`for_model` so that fine-tuning and scoring read texts as the model was trained to."""

    def __init__(self, tokenizer, max_length: int, normalize: Normalizer | None = None):
        self.tokenizer, self.max_length, self.normalize = tokenizer, max_length, normalize

    @classmethod
    def for_model(cls, backbone, tokenizer) -> TaskCollator:
        """The collator of a cross-view model (``backbone.cfg.text``): its ``max_length`` and its normaliser."""
        text_cfg = backbone.cfg.text
        return cls(tokenizer, int(text_cfg.max_length), normalizer_for(text_cfg))

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
