"""easy-VQA (PyPI ``easy-vqa``): real 64x64 shape images with English questions and 13 answers, through the
xGQA-style answer classifier, or with ``head: cclm`` the CCLM reference's answer decoder (as xGQA). Files are split names: ``train``, ``dev`` and ``test``. The package ships no dev
split, so ``dev`` is every tenth training image (by image id) with its questions, and ``train`` the rest:
model selection never sees the test split, and no image is shared between train and dev.
"""

from __future__ import annotations

from cclm.tasks.annotations import AnnotationError
from cclm.tasks.images import ImageRef
from cclm.tasks.task_data import ClassificationData, ClassificationExample

KIND = "single"
CCLM_HEAD = "answer_decoder"  # head: cclm (the reference's VQA model)
SPLITS = ("train", "dev", "test")
DEV_EVERY = 10


def _package():
    try:
        import easy_vqa
    except ImportError:
        raise ImportError(
            "easy-vqa is not installed: pip install 'cclm[demo]' (or pip install easy-vqa)"
        ) from None
    return easy_vqa


def labels(data_cfg=None) -> list[str]:
    return sorted(_package().get_answers())


def read(split: str, label_names: list[str] | None = None, max_examples: int = 0) -> ClassificationData:
    if split not in SPLITS:
        raise AnnotationError(f"easy_vqa: unknown split '{split}' (expected one of {SPLITS})")
    package = _package()
    if split == "test":
        questions, answers, image_ids = package.get_test_questions()
        paths = package.get_test_image_paths()
    else:
        questions, answers, image_ids = package.get_train_questions()
        paths = package.get_train_image_paths()
    index = {name: i for i, name in enumerate(label_names or labels())}
    examples, refs = [], set()
    for number, (question, answer, image_id) in enumerate(zip(questions, answers, image_ids)):
        in_dev = image_id % DEV_EVERY == 0
        if split != "test" and in_dev != (split == "dev"):
            continue
        if answer not in index:
            raise AnnotationError(f"easy_vqa {split} question {number}: unknown answer '{answer}'")
        image = ImageRef(None, paths[image_id])
        refs.add(image)
        if max_examples and len(examples) >= max_examples:
            continue
        examples.append(ClassificationExample(f"{split}-{number}", question, (image,), index[answer], "en"))
    return ClassificationData(split, examples, len(examples), refs, {"en"})
