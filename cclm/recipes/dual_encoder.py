"""Retrieval for dual encoders (CLIP + MLA): every image against every caption by feature similarity, scored with
the project's recall metrics (:func:`cclm.evaluation.retrieval.itm_metrics`; no ITM re-ranking -- a dual encoder has
no matching head)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from cclm.data.images import load_image
from cclm.evaluation.datasets import RetrievalSet, load_heldout_sets
from cclm.evaluation.retrieval import itm_metrics


@torch.no_grad()
def dual_encoder_metrics(
    encode_images: Callable[[torch.Tensor], torch.Tensor],
    encode_texts: Callable[[list[str]], torch.Tensor],
    retrieval_set: RetrievalSet,
    image_size: int,
    batch_size: int = 64,
) -> dict[str, float]:
    """``encode_images`` (uint8 [B,3,S,S]) and ``encode_texts`` (list of str) return normalised features."""
    image_feats = []
    for start in range(0, len(retrieval_set.images), batch_size):
        chunk = retrieval_set.images[start : start + batch_size]
        image_feats.append(encode_images(torch.stack([load_image(im, image_size) for im in chunk])).cpu())
    text_feats = [
        encode_texts(list(retrieval_set.texts[start : start + batch_size])).cpu()
        for start in range(0, len(retrieval_set.texts), batch_size)
    ]
    scores = torch.cat(image_feats).float() @ torch.cat(text_feats).float().t()
    return itm_metrics(scores, scores.t(), retrieval_set.txt2img, retrieval_set.img2txt)


def heldout_sets(folders: dict[str, str], languages: Sequence[str]) -> dict[str, dict[str, RetrievalSet]]:
    """name -> language -> set, for the demo-world-format folders of ``eval.retrieval``; every language must be
    there (a missing one is an error naming what the folder has)."""
    out: dict[str, dict[str, RetrievalSet]] = {}
    for name, sets in load_heldout_sets(folders, list(languages)).items():
        out[name] = {s.lang: s for s in sets}
    return out
