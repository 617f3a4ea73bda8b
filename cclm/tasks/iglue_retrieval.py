"""Retrieval tasks (xFlickr&CO, WIT) through the project's retrieval evaluation (:mod:`cclm.evaluation`): ITC
similarities for every image x caption, each query's top-k re-scored by the ITM head, Recall@k both ways.

IGLUE reports R@1 of image retrieval (IR, caption -> image: ``img_r1``) and of text retrieval (TR, image ->
caption: ``txt_r1``). The set is built here rather than with ``RetrievalSet.from_entries`` because that merges
entries by image: WIT's lines must stay separate image entries, each with only its own caption as the answer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import torch

from cclm.config import Precision
from cclm.evaluation.datasets import RetrievalSet, caption_files
from cclm.evaluation.run import run_retrieval
from cclm.tasks import wit, xflickrco
from cclm.tasks.task_data import RetrievalData

IR_R1, TR_R1 = "img_r1", "txt_r1"


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
    """``txt_r1 ... img_r_mean, r_mean`` (percent) of a task model's backbone on one retrieval file."""
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
    """A benchmark set from IGLUE test files: ``captions: {lang: [file]}`` names them and ``options.image_roots``
    the image folders (keys flickr30k, coco, wit). Images are keyed on their annotation path (``img_path`` / image
    URL), never on the ambiguous numeric id; an image that the reader lists several times (WIT: each line is its
    own gallery entry) stays several entries."""
    roots = dict(cfg.options.get("image_roots", {}))
    entries = []
    for path in caption_files(cfg, lang):
        data = reader(path)
        captions: list[list[str]] = [[] for _ in data.images]
        for text, image in zip(data.texts, data.text_image):
            captions[image].append(text)
        repeated = {ref for ref, n in Counter(data.images).items() if n > 1}
        for i, (ref, caps) in enumerate(zip(data.images, captions)):
            key = f"{ref.root}:{ref.path}" + (f"#{path.name}:{i}" if ref in repeated else "")
            entries.append((ref.resolve(roots), key, caps))
    return RetrievalSet.from_entries(name, lang, entries)


def load_xflickrco(cfg, lang: str) -> RetrievalSet:
    """``cclm evaluate retrieval`` loader of xFlickr&CO (``format: python``, ``loader: cclm.tasks.iglue_retrieval:
    load_xflickrco``)."""
    return _iglue_retrieval_set(xflickrco.read, cfg, lang, "xflickrco")


def load_wit(cfg, lang: str) -> RetrievalSet:
    """``cclm evaluate retrieval`` loader of IGLUE's WIT test files (``loader: cclm.tasks.iglue_retrieval:load_wit``)."""
    return _iglue_retrieval_set(wit.read, cfg, lang, "wit")
