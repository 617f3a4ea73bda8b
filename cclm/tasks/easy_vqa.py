"""easy-VQA (PyPI ``easy-vqa``): real 64x64 shape images with English questions and 13 answers, through the
xGQA-style answer classifier, or with ``head: cclm`` the CCLM reference's answer decoder (as xGQA). Files are
split names: ``train``, ``dev`` and ``test``. The package ships no dev split, so ``dev`` is every tenth training
image (by image id) with its questions, and ``train`` the rest: model selection never sees the test split, and no
image is shared between train and dev.

``<split>:<lang>`` (``test:ja``, ``train:hi``) is the split with its questions said in another language by the
template grammar of :mod:`cclm.tasks.easy_vqa_languages` (exact translations; same example ids, images and
answers as the English split, so a translated split is aligned with the English one by id).
"""

from __future__ import annotations

from cclm.tasks import easy_vqa_languages
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


def split_language(name: str) -> tuple[str, str]:
    """``"test:ja"`` -> ``("test", "ja")``; a bare split name is English."""
    split, _, lang = name.partition(":")
    lang = lang or "en"
    if split not in SPLITS:
        raise AnnotationError(
            f"easy_vqa: unknown split '{split}' (expected one of {SPLITS}, optionally ':<lang>')"
        )
    if lang not in easy_vqa_languages.LANGUAGES:
        raise AnnotationError(
            f"easy_vqa: no questions in language '{lang}' (the grammar speaks {list(easy_vqa_languages.LANGUAGES)})"
        )
    return split, lang


def read(name: str, label_names: list[str] | None = None, max_examples: int = 0) -> ClassificationData:
    split, lang = split_language(name)
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
        if lang != "en":
            question = easy_vqa_languages.render(question, lang)
        examples.append(ClassificationExample(f"{split}-{number}", question, (image,), index[answer], lang))
    return ClassificationData(name, examples, len(examples), refs, {lang})
