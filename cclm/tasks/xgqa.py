"""xGQA (cross-lingual GQA): a question about a GQA image, classified over GQA's 1,842 answers (``head: iglue``),
or answered by the CCLM reference's answer decoder ranking those answers (``head: cclm``,
:mod:`cclm.tasks.answer_decoder`).

Files: GQA question JSON (``{question_id: {"question", "answer", "imageId", ...}}``); the answer vocabulary is
``trainval_ans2label.json`` (``data.label_vocab``). Images: ``<image_roots.gqa>/<imageId>.jpg``.

A question whose answer is not in the vocabulary (GQA testdev-balanced has two, "bottle cap", both in
IGLUE's ``test.json``) is kept with the label ``NO_GOLD_CLASS``: scored as wrong and counted, as IGLUE's
``GQA_score.py`` and the CCLM reference's ``get_acc`` count it (9,666 questions per test file); training leaves
it out.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from cclm.tasks.annotations import (
    IDENTIFIER,
    INTEGER,
    OBJECT,
    AnnotationError,
    check_type,
    field,
    language_from_path,
    read_object_entries,
)
from cclm.tasks.images import ImageRef
from cclm.tasks.task_data import NO_GOLD_CLASS, ClassificationData, ClassificationExample

KIND = "single"
ANSWER_NOT_IN_VOCABULARY = "answer not in the answer vocabulary"
CCLM_HEAD = "answer_decoder"  # head: cclm (the reference's VQA model)
# data.hflip_careful=false: the reference's vqa_dataset does not flip when the question or an answer holds these
REFERENCE_SIDE_WORDS = ("left", "right")


def labels(data_cfg) -> list[str]:
    """Answer names ordered by their label id in ``trainval_ans2label.json``."""
    if not data_cfg.label_vocab:
        raise AnnotationError("config key 'data.label_vocab' must name GQA's trainval_ans2label.json")
    path = data_cfg.label_vocab
    ans2label = {
        answer: check_type(label, INTEGER, f"the label id of answer '{answer}'", f"{path}:{line}")
        for line, answer, label in read_object_entries(path)
    }
    ordered = sorted(ans2label.items(), key=lambda kv: kv[1])
    if [i for _, i in ordered] != list(range(len(ordered))):
        raise AnnotationError(f"{path}: label ids are not 0..{len(ordered) - 1}")
    return [name for name, _ in ordered]


def read(path: str | Path, label_names: list[str] | None = None, max_examples: int = 0) -> ClassificationData:
    index = {name: i for i, name in enumerate(label_names)} if label_names else None
    language = language_from_path(path)
    examples, refs, questions, not_built, no_gold_class = [], set(), 0, 0, Counter()
    for line, qid, record in read_object_entries(path):
        where = f"{path}:{line}: question {qid}"
        questions += 1
        # every field is checked on every question, also those not used below: a wrong type means a damaged file
        check_type(record, OBJECT, "the question", where)
        image = ImageRef("gqa", f"{field(record, 'imageId', where, IDENTIFIER)}.jpg")
        question, answer = field(record, "question", where), field(record, "answer", where)
        refs.add(image)
        if max_examples and len(examples) + not_built >= max_examples:
            continue
        if index is None:
            not_built += 1
            continue
        if answer not in index:
            no_gold_class[ANSWER_NOT_IN_VOCABULARY] += 1
        label = index.get(answer, NO_GOLD_CLASS)
        examples.append(ClassificationExample(str(qid), question, (image,), label, language))
    return ClassificationData(
        str(path), examples, questions, refs, {language}, not_built=not_built, no_gold_class=no_gold_class
    )
