"""MaRVL (and its English training source NLVR2): is a caption true of a pair of images? Binary. ``head: iglue``
fuses the caption with each image and concatenates the two [CLS]; ``head: cclm`` reads both images through the
reference's doubled fusion stack (:mod:`cclm.tasks.nlvr_fusion`).

MaRVL records: ``caption``, ``left_img``/``right_img``, ``concept``, ``language``, ``label`` (bool); images at
``<image_roots.marvl>/<language>/images/<concept>/<file>`` (few-shot files already name ``<concept>/<file>``).
NLVR2 records: ``sentence``, ``identifier`` (``test1-0-1-0``), ``label`` ("True"/"False"), optional
``directory`` (train); images at ``<image_roots.nlvr2>/<split>/[<directory>/]<split>-0-1-img0.png`` as released.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cclm.tasks.annotations import (
    BOOLEAN_OR_TEXT,
    IDENTIFIER,
    AnnotationError,
    field,
    optional_field,
    read_records,
)
from cclm.tasks.images import ImageRef
from cclm.tasks.task_data import ClassificationData, ClassificationExample

KIND = "pair"
CCLM_HEAD = "dual_image_fusion"  # head: cclm (the reference's NLVR model)
LABELS = ["false", "true"]
_TRUTH = {True: 1, False: 0, "true": 1, "false": 0, "True": 1, "False": 0}


def labels(data_cfg=None) -> list[str]:
    return list(LABELS)


def _marvl_images(record: dict[str, Any], where: str) -> tuple[ImageRef, ImageRef]:
    language = field(record, "language", where)
    concept = field(record, "concept", where)
    refs = []
    for key in ("left_img", "right_img"):
        name = field(record, key, where)
        relative = name if "/" in name else f"{concept}/{name}"
        refs.append(ImageRef("marvl", f"{language}/images/{relative}"))
    return refs[0], refs[1]


def _nlvr2_images(record: dict[str, Any], where: str) -> tuple[ImageRef, ImageRef]:
    identifier = field(record, "identifier", where)
    stem = identifier.rsplit("-", 1)[0]
    split = stem.split("-", 1)[0]
    directory = optional_field(record, "directory", where, IDENTIFIER)  # the train split's sub-folders
    folder = split if directory is None else f"{split}/{directory}"
    return ImageRef("nlvr2", f"{folder}/{stem}-img0.png"), ImageRef("nlvr2", f"{folder}/{stem}-img1.png")


def read(path: str | Path, label_names: list[str] | None = None, max_examples: int = 0) -> ClassificationData:
    examples, refs, languages, records = [], set(), set(), 0
    for number, record in read_records(path):
        where = f"{path}:{number}"
        records += 1
        # every field is checked on every record, also those not used below: a wrong type means a damaged file
        if "caption" in record:
            images, text = _marvl_images(record, where), field(record, "caption", where)
            language = record["language"]
        else:
            images, text, language = _nlvr2_images(record, where), field(record, "sentence", where), "en"
        label = field(record, "label", where, BOOLEAN_OR_TEXT)
        if label not in _TRUTH:
            raise AnnotationError(f"{where}: unknown label {label!r} (expected true/false)")
        fallback_uid = record.get("identifier", f"{Path(path).name}:{number}")
        uid = str(optional_field(record, "id", where, IDENTIFIER, fallback_uid))
        refs.update(images)
        languages.add(language)
        if max_examples and len(examples) >= max_examples:
            continue
        examples.append(ClassificationExample(uid, text, images, _TRUTH[label], language))
    return ClassificationData(str(path), examples, records, refs, languages)
