"""Multi30K and MSCOCO retrieval fine-tuning in the CCLM reference's layout (its README, "Data: MSCOCO and
Multi30K"; the ALBEF/X-VLM files): one JSON array per file and language.

- training files (``train.de.json``, ``en.train.json``): one item per caption,
  ``{"caption": "...", "image": "coco/val2014/COCO_val2014_000000522418.jpg", "image_id": 522418}``;
- valid and test files (``val.cs.json``, ``ja.1k_test.json``): one item per image, ``{"image": ..., "caption":
  ["...", ...]}``.

Images are ``<data.image_roots.images>/<image>`` (the reference's ``image_root``). The captions of one image
(equal ``image_id``, else equal ``image`` path) are one image entry: in training they are each other's positives in
ITC, as the reference's ``idx`` targets make them. The file's language is read from its name.
"""

from __future__ import annotations

from pathlib import Path

from cclm.tasks.annotations import (
    IDENTIFIER,
    TEXT_LIST,
    AnnotationError,
    field,
    language_from_path,
    optional_field,
    read_array_items,
)
from cclm.tasks.images import ImageRef
from cclm.tasks.task_data import RetrievalData

KIND = "retrieval"
MAIN_METRIC = "r_mean"  # the mean of R@1/5/10 both ways: what the CCLM paper reports for Multi30K and MSCOCO
COLUMNS = ("r_mean", "img_r1", "txt_r1")
IMAGE_ROOT = "images"
_NOT_LANGUAGES = {"val", "dev", "ann", "all", "raw"}


def language_of(path: str | Path) -> str:
    """``train.de.json`` / ``de.train.json`` / ``test_2016_flickr.cs.json`` / ``ja.1k_test.json`` -> the code."""
    parts = Path(path).name.split(".")[:-1]
    codes = [part for part in parts if 2 <= len(part) <= 3 and part.isalpha() and part.islower()]
    codes = [code for code in codes if code not in _NOT_LANGUAGES]
    return codes[-1] if codes else language_from_path(path)


def read(path: str | Path, label_names=None, max_examples: int = 0) -> RetrievalData:
    index: dict[object, int] = {}
    images, ids, texts, text_image = [], [], [], []
    for line, record in read_array_items(path):
        where = f"{path}:{line}"
        if not isinstance(record, dict):
            raise AnnotationError(f"{where}: expected a JSON object per item")
        image = field(record, "image", where)
        captions = record.get("caption")  # a training item's one caption, or an evaluation item's list
        captions = [captions] if isinstance(captions, str) else field(record, "caption", where, TEXT_LIST)
        image_id = optional_field(record, "image_id", where, IDENTIFIER, image)
        if image_id not in index:
            index[image_id] = len(images)
            images.append(ImageRef(IMAGE_ROOT, image))
            ids.append(image_id)
        texts.extend(captions)
        text_image.extend([index[image_id]] * len(captions))
    data = RetrievalData(str(path), images, ids, texts, text_image, {language_of(path)})
    return data.truncated(max_examples)
