"""XVNLI (cross-lingual visual NLI): a Flickr30k image as premise, ``sentence2`` as hypothesis, 3 classes.

Files: SNLI-VE-style jsonl (``gold_label``, ``sentence2``, ``Flikr30kID`` -- IGLUE's spelling -- or the SNLI-VE
release's ``Flickr30K_ID``). A record whose ``gold_label`` is ``-`` (no annotator consensus, as in SNLI; 14 in
every test file) is kept with the label ``NO_GOLD_CLASS`` and counted: scored as wrong, as IGLUE scores it
(volta gives it an all-zero target: 1,164 records per test file), or left out as the CCLM reference does
(``data.no_gold_label=drop``); training leaves it out. Any other unknown label fails. Images:
``<image_roots.flickr30k>/<Flikr30kID>.jpg``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from cclm.tasks.annotations import (
    IDENTIFIER,
    AnnotationError,
    check_type,
    field,
    language_from_path,
    optional_field,
    read_records,
)
from cclm.tasks.images import ImageRef
from cclm.tasks.task_data import NO_GOLD_CLASS, ClassificationData, ClassificationExample

KIND = "single"
LABELS = ["contradiction", "neutral", "entailment"]
NO_GOLD_LABEL = "-"
NO_CONSENSUS = "no gold label ('-')"
IMAGE_ID_FIELDS = ("Flikr30kID", "Flickr30K_ID")


def labels(data_cfg=None) -> list[str]:
    return list(LABELS)


def _image_id(record: dict, where: str) -> str:
    """IGLUE writes ``Flikr30kID``; the SNLI-VE release (the English training source) ``Flickr30K_ID``."""
    for key in IMAGE_ID_FIELDS:
        if key in record:
            return str(check_type(record[key], IDENTIFIER, f"field '{key}'", where))
    raise AnnotationError(f"{where}: missing field '{IMAGE_ID_FIELDS[0]}' (or '{IMAGE_ID_FIELDS[1]}')")


def read(path: str | Path, label_names: list[str] | None = None, max_examples: int = 0) -> ClassificationData:
    index = {name: i for i, name in enumerate(label_names or LABELS)}
    language = language_from_path(path)
    examples, refs, no_gold_class, records = [], set(), Counter(), 0
    for number, record in read_records(path):
        where = f"{path}:{number}"
        records += 1
        # every field is checked on every record, also those skipped below: a wrong type means a damaged file
        image = ImageRef("flickr30k", f"{_image_id(record, where)}.jpg")
        label = field(record, "gold_label", where)
        hypothesis = field(record, "sentence2", where)
        uid = str(optional_field(record, "pairID", where, IDENTIFIER, f"{Path(path).name}:{number}"))
        refs.add(image)
        if label != NO_GOLD_LABEL and label not in index:
            raise AnnotationError(f"{where}: unknown label '{label}' (expected one of {sorted(index)})")
        if max_examples and len(examples) >= max_examples:
            continue
        if label == NO_GOLD_LABEL:
            no_gold_class[NO_CONSENSUS] += 1
        examples.append(
            ClassificationExample(uid, hypothesis, (image,), index.get(label, NO_GOLD_CLASS), language)
        )
    return ClassificationData(str(path), examples, records, refs, {language}, no_gold_class=no_gold_class)
