"""xGQA (cross-lingual GQA): a question about a GQA image, classified over GQA's 1,842 answers.

Files: GQA question JSON (``{question_id: {"question", "answer", "imageId", ...}}``); the answer vocabulary is
``trainval_ans2label.json`` (``data.label_vocab``). Images: ``<image_roots.gqa>/<imageId>.jpg``.
"""

from __future__ import annotations

from pathlib import Path

from cclm.jsonl import read_json
from cclm.tasks.annotations import AnnotationError, field, language_from_path
from cclm.tasks.images import ImageRef
from cclm.tasks.task_data import ClassificationData, ClassificationExample

KIND = "single"


def labels(data_cfg) -> list[str]:
    """Answer names ordered by their label id in ``trainval_ans2label.json``."""
    if not data_cfg.label_vocab:
        raise AnnotationError("config key 'data.label_vocab' must name GQA's trainval_ans2label.json")
    ans2label = read_json(data_cfg.label_vocab)
    ordered = sorted(ans2label.items(), key=lambda kv: kv[1])
    if [i for _, i in ordered] != list(range(len(ordered))):
        raise AnnotationError(f"{data_cfg.label_vocab}: label ids are not 0..{len(ordered) - 1}")
    return [name for name, _ in ordered]


def read(path: str | Path, label_names: list[str] | None = None, max_examples: int = 0) -> ClassificationData:
    questions = read_json(path)
    if not isinstance(questions, dict):
        raise AnnotationError(f"{path}: expected a JSON object of question_id -> question")
    index = {name: i for i, name in enumerate(label_names)} if label_names else None
    language = language_from_path(path)
    examples, refs = [], set()
    for qid, record in questions.items():
        where = f"{path}: question {qid}"
        image = ImageRef("gqa", f"{field(record, 'imageId', where)}.jpg")
        refs.add(image)
        if index is None or (max_examples and len(examples) >= max_examples):
            continue
        answer = field(record, "answer", where)
        if answer not in index:
            raise AnnotationError(f"{where}: unknown answer '{answer}' (not in the answer vocabulary)")
        examples.append(
            ClassificationExample(
                str(qid), field(record, "question", where), (image,), index[answer], language
            )
        )
    return ClassificationData(str(path), examples, len(questions), refs, {language})
