"""Retrieval tasks (xFlickr&CO, WIT) through the project's retrieval evaluation (:mod:`cclm.evaluation`): ITC
similarities for every image x caption, each query's top-k re-scored by the ITM head, Recall@k both ways.

IGLUE reports R@1 of image retrieval (IR, caption -> image: ``img_r1``) and of text retrieval (TR, image ->
caption: ``txt_r1``). Ranks break exact ties by index order, not against the query as the project's default
does. IGLUE ranks by numpy's default ``np.argsort(-scores)``, which is not a stable sort: the order it gives
exactly equal scores is unspecified (it depends on the array and the numpy version), so no deterministic rule
reproduces it; the index order agrees with IGLUE wherever no candidate ties the gold one.

What lines that share an image are (``data.duplicate_images``, :class:`~cclm.config.DuplicateImages`); the
readers keep every line, this module groups them:

- ``iglue`` (default): IGLUE's image entries -- one per key of its evaluation (``RetrievalDatasetVal``): WIT's
  ``wit_ix`` (the lines of one picture share it in every released test file, so each picture is one entry holding
  the captions of all its lines; a line without ``wit_ix`` is its own entry), xFlickr&CO's ``img_path``;
- ``merge``: the CCLM reference's -- lines naming the same image file (WIT: the file name of ``image_url``, as
  the reference keys on ``image_url``) are one image with several captions.

Both give the released files the same entries; they differ on files where the keys and the images disagree.
Keeping the lines of one picture as separate entries (what cclm did before) makes identical images score alike,
so a caption's own entry ties with its copies and image-retrieval R@1 collapses (514 of the 1,000 lines of WIT
``test_en.jsonl`` share their picture).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Mapping
from types import ModuleType

import torch

from cclm.config import DuplicateImages, Precision
from cclm.evaluation.datasets import RetrievalSet, caption_files
from cclm.evaluation.retrieval import TIES_INDEX, tie_breaking
from cclm.evaluation.run import run_retrieval
from cclm.tasks import wit, xflickrco
from cclm.tasks.task_data import RetrievalData

IR_R1, TR_R1 = "img_r1", "txt_r1"
TIES = TIES_INDEX  # how the IGLUE retrieval tasks break equal scores


def entry_keys(reader: ModuleType, data: RetrievalData, convention: DuplicateImages | str) -> list[Hashable]:
    """The key of each image of ``data`` (as ``reader`` read it) under ``convention``: equal keys are one entry."""
    if DuplicateImages(str(convention)) == DuplicateImages.merge:
        return list(data.images)  # the image file (WIT: the file name of image_url)
    if reader is wit:
        return list(data.image_ids)  # wit_ix (else the line): IGLUE's key
    return list(data.images)  # xFlickr&CO / Flickr30k: img_path, which IGLUE keys on and the reader merged by


def with_duplicate_images(
    reader: ModuleType, data: RetrievalData, convention: DuplicateImages | str = DuplicateImages.iglue
) -> RetrievalData:
    """``data`` with its lines grouped into image entries as ``convention`` says (see the module docstring)."""
    return data.grouped(entry_keys(reader, data, convention))


def to_retrieval_set(data: RetrievalData, roots: Mapping[str, str]) -> RetrievalSet:
    img2txt: list[list[int]] = [[] for _ in data.images]
    for text, image in enumerate(data.text_image):
        img2txt[image].append(text)
    language = sorted(data.languages)[0] if data.languages else "?"
    return RetrievalSet(
        name=data.file,
        lang=language,
        images=[ref.resolve(roots) for ref in data.images],
        texts=list(data.texts),
        txt2img=list(data.text_image),
        img2txt=img2txt,
        image_ids=[f"{i}:{ref.root}:{ref.path}" for i, ref in enumerate(data.images)],
    )


def score_retrieval(
    model,
    data: RetrievalData,
    roots: Mapping[str, str],
    tokenizer,
    image_size: int,
    *,
    k_test: int,
    batch_size: int,
    precision: str | Precision,
    device: torch.device,
    num_workers: int = 0,
) -> dict[str, float]:
    """``txt_r1 ... img_r_mean, r_mean`` (percent) of a task model's backbone on one retrieval file (its image
    entries already grouped, :func:`with_duplicate_images`); equal scores are ranked in index order."""
    with tie_breaking(TIES):
        return run_retrieval(
            model.backbone,
            to_retrieval_set(data, roots),
            tokenizer,
            image_size,
            k_test=k_test,
            batch_size=batch_size,
            precision=precision,
            num_workers=num_workers,
            device=device,
        ).metrics


def _iglue_retrieval_set(reader, cfg, lang: str, name: str) -> RetrievalSet:
    """A benchmark set from IGLUE test files: ``captions: {lang: [file]}`` names them, ``options.image_roots`` the
    image folders (keys flickr30k, coco, wit) and ``options.duplicate_images`` (iglue | merge) what lines sharing
    an image are. Images are keyed on their annotation path (``img_path`` / image URL), never on the ambiguous
    numeric id; two entries of one image file (only where the convention's keys say so) stay two entries. Every
    line's caption is kept as read, blank ones too (xFlickr&CO de has an empty one, WIT el and id a no-break
    space): IGLUE scores them, and so does fine-tuning's scoring of the same file."""
    roots = dict(cfg.options.get("image_roots", {}))
    convention = DuplicateImages(str(cfg.options.get("duplicate_images", DuplicateImages.iglue)))
    entries = []
    for path in caption_files(cfg, lang):
        data = with_duplicate_images(reader, reader.read(path), convention)
        captions: list[list[str]] = [[] for _ in data.images]
        for text, image in zip(data.texts, data.text_image):
            captions[image].append(text)
        repeated = {ref for ref, n in Counter(data.images).items() if n > 1}
        for i, (ref, caps) in enumerate(zip(data.images, captions)):
            key = f"{ref.root}:{ref.path}" + (f"#{path.name}:{i}" if ref in repeated else "")
            entries.append((ref.resolve(roots), key, caps))
    return RetrievalSet.from_entries(name, lang, entries, keep_blank=True)


def load_xflickrco(cfg, lang: str) -> RetrievalSet:
    """``cclm evaluate retrieval`` loader of xFlickr&CO (``format: python``, ``loader: cclm.tasks.iglue_retrieval:
    load_xflickrco``)."""
    return _iglue_retrieval_set(xflickrco, cfg, lang, "xflickrco")


def load_wit(cfg, lang: str) -> RetrievalSet:
    """``cclm evaluate retrieval`` loader of IGLUE's WIT test files (``loader: cclm.tasks.iglue_retrieval:load_wit``)."""
    return _iglue_retrieval_set(wit, cfg, lang, "wit")
