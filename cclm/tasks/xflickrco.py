"""xFlickr&CO (and Flickr30k ``*_ann.jsonl``): image-text retrieval over Flickr30k and COCO images.

Records: ``{"sentences": [...], "id": ..., "img_path": ...}``. Images are keyed on ``img_path`` (Flickr ids are
strings and COCO ids integers, so ``id`` alone is ambiguous); lines naming the same image pool their captions.
``COCO_*`` files are read from ``image_roots.coco`` (val2014), the rest from ``image_roots.flickr30k``.
"""

from __future__ import annotations

from pathlib import Path

from cclm.tasks.annotations import (
    IDENTIFIER,
    TEXT_LIST,
    field,
    language_from_path,
    optional_field,
    read_records,
)
from cclm.tasks.images import ImageRef
from cclm.tasks.task_data import RetrievalData

KIND = "retrieval"


def image_ref(img_path: str) -> ImageRef:
    return ImageRef("coco" if img_path.startswith("COCO_") else "flickr30k", img_path)


def read(path: str | Path, label_names=None, max_examples: int = 0) -> RetrievalData:
    index: dict[str, int] = {}
    images, ids, texts, text_image = [], [], [], []
    for number, record in read_records(path):
        where = f"{path}:{number}"
        img_path = field(record, "img_path", where)
        sentences = field(record, "sentences", where, TEXT_LIST)
        image_id = optional_field(record, "id", where, IDENTIFIER, img_path)
        if img_path not in index:
            index[img_path] = len(images)
            images.append(image_ref(img_path))
            ids.append(image_id)
        texts.extend(sentences)
        text_image.extend([index[img_path]] * len(sentences))
    data = RetrievalData(str(path), images, ids, texts, text_image, {language_from_path(path)})
    return data.truncated(max_examples)
