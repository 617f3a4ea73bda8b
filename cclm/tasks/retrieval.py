"""Retrieval tasks (xFlickr&CO, WIT) through the project's retrieval evaluation (:mod:`cclm.evaluation`): ITC
similarities for every image x caption, each query's top-k re-scored by the ITM head, Recall@k both ways.

IGLUE reports R@1 of image retrieval (IR, caption -> image: ``img_r1``) and of text retrieval (TR, image ->
caption: ``txt_r1``). The set is built here rather than with ``RetrievalSet.from_entries`` because that merges
entries by image: WIT's lines must stay separate image entries, each with only its own caption as the answer.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from cclm.config import EvalConfig, from_dict
from cclm.evaluation.datasets import RetrievalSet
from cclm.evaluation.run import evaluate_retrieval
from cclm.tasks.examples import RetrievalData

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


def evaluate(
    model,
    data: RetrievalData,
    roots: Mapping[str, str],
    tokenizer,
    image_size: int,
    *,
    k_test: int,
    batch_size: int,
    precision: str,
    device: torch.device,
    num_workers: int = 0,
) -> dict[str, float]:
    """``txt_r1 ... img_r_mean, r_mean`` (percent) of a task model's backbone on one retrieval file."""
    eval_cfg = from_dict(
        EvalConfig,
        {
            "k_test": k_test,
            "batch_size": batch_size,
            "precision": precision,
            "num_workers": num_workers,
            "rerank": True,
        },
    )
    return evaluate_retrieval(
        model.backbone, to_retrieval_set(data, roots), tokenizer, eval_cfg, image_size, device
    )
