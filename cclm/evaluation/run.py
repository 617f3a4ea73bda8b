"""Evaluate a model on retrieval sets: the one code path used by ``cclm evaluate retrieval``, by periodic
evaluation during pretraining, by the IGLUE retrieval tasks and by the demo."""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from cclm.config import EvalConfig, Precision, RankTies
from cclm.data.images import load_image
from cclm.evaluation.datasets import RetrievalSet, load_heldout_sets
from cclm.evaluation.results import mean_over_languages
from cclm.evaluation.retrieval import (
    RetrievalOutput,
    embed_gallery,
    tie_breaking,
    tokenize_for_model,
    two_stage_ranks,
)

logger = logging.getLogger(__name__)


def run_retrieval(
    model,
    retrieval_set: RetrievalSet,
    tokenizer,
    image_size: int,
    *,
    k_test: int = EvalConfig.k_test,
    batch_size: int = EvalConfig.batch_size,
    rerank: bool = EvalConfig.rerank,
    rerank_batch_size: int = EvalConfig.rerank_batch_size,
    itc_weight: float = EvalConfig.itc_weight_in_rerank,
    precision: str | Precision = EvalConfig.precision,
    num_workers: int = EvalConfig.num_workers,
    device=None,
    rescore_all: bool = False,
    kv_cache: bool = True,
) -> RetrievalOutput:
    """Two-stage (or, with ``rerank=False``, ITC-only) retrieval on one set; returns metrics and per-query ranks.

    The settings are those of :class:`cclm.config.EvalConfig` (same names and defaults; ``itc_weight`` is its
    ``itc_weight_in_rerank``). ``rescore_all`` re-scores every top-k pair, even of queries whose rank ITM cannot
    change (same metrics); ``kv_cache=False`` re-scores without sharing the per-image and per-caption work
    across pairs (same metrics; see :func:`cclm.evaluation.retrieval.itm_scores`). Images are loaded by
    :func:`cclm.data.images.load_image`; captions go through the model's own text normaliser
    (``model.cfg.text.normalize``, :func:`cclm.evaluation.retrieval.tokenize_for_model`) before tokenising. The
    model is put in eval mode for the call and its previous mode restored."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    token_ids = tokenize_for_model(model, tokenizer, retrieval_set.texts)
    was_training = model.training
    model.eval()
    try:
        emb = embed_gallery(
            model,
            retrieval_set.images,
            token_ids,
            functools.partial(load_image, size=image_size),
            tokenizer.pad_token_id,
            batch_size,
            device,
            keep_tokens=rerank,
            num_workers=num_workers,
            precision=precision,
        )
        return two_stage_ranks(
            model,
            emb,
            retrieval_set.txt2img,
            retrieval_set.img2txt,
            k_test,
            rerank_batch_size=rerank_batch_size,
            do_rerank=rerank,
            itc_weight=itc_weight,
            precision=precision,
            rescore_all=rescore_all,
            kv_cache=kv_cache,
        )
    finally:
        model.train(was_training)


def settings(eval_cfg: EvalConfig, rerank: bool | None = None) -> dict[str, Any]:
    """The keyword settings of :func:`run_retrieval` from an :class:`EvalConfig` (``rerank`` overrides its own)."""
    return {
        "k_test": eval_cfg.k_test,
        "batch_size": eval_cfg.batch_size,
        "rerank": eval_cfg.rerank if rerank is None else rerank,
        "rerank_batch_size": eval_cfg.rerank_batch_size,
        "itc_weight": eval_cfg.itc_weight_in_rerank,
        "precision": eval_cfg.precision,
        "num_workers": eval_cfg.num_workers,
    }


def evaluate_retrieval(
    model,
    retrieval_set: RetrievalSet,
    tokenizer,
    eval_cfg,
    image_size: int,
    device=None,
    rerank: bool | None = None,
) -> dict[str, float]:
    """Metrics (``txt_r1 ... r_mean``, median/mean ranks) of ``model`` on one retrieval set with the settings of
    an :class:`EvalConfig` (its ``ties`` too); ``rerank`` overrides ``eval_cfg.rerank``."""
    with tie_breaking(str(getattr(eval_cfg, "ties", RankTies.against))):
        return run_retrieval(
            model, retrieval_set, tokenizer, image_size, device=device, **settings(eval_cfg, rerank)
        ).metrics


def evaluate_folds(
    model, retrieval_set: RetrievalSet, folds: int, tokenizer, eval_cfg, image_size: int, device=None
) -> dict[str, float]:
    """Mean metrics over consecutive image folds (MSCOCO 1k protocol); one fold = the whole set."""
    results = [
        evaluate_retrieval(model, part, tokenizer, eval_cfg, image_size, device)
        for part in retrieval_set.folds(folds)
    ]
    return {key: sum(r[key] for r in results) / len(results) for key in results[0]}


def load_periodic_sets(eval_cfg) -> dict[str, list[RetrievalSet]]:
    """The held-out sets named in ``EvalConfig.datasets`` (name -> demo-world held-out folder), loaded once."""
    return load_heldout_sets(dict(eval_cfg.datasets), list(eval_cfg.languages))


def evaluate_during_training(
    model, sets: dict[str, list[RetrievalSet]], tokenizer, eval_cfg, image_size: int, device=None
) -> dict[str, float]:
    """Zero-shot retrieval on every held-out set and language, ITC-only unless ``eval_cfg.periodic_rerank``.

    Returns flat scalars ``eval/<set>/<lang>/<metric>`` plus ``eval/<set>/mean/<metric>`` (mean over languages),
    ready for TensorBoard and metrics.jsonl."""
    out: dict[str, float] = {}
    for name, per_lang in sets.items():
        rows = {}
        for retrieval_set in per_lang:
            rows[retrieval_set.lang] = evaluate_retrieval(
                model, retrieval_set, tokenizer, eval_cfg, image_size, device, rerank=eval_cfg.periodic_rerank
            )
        out.update(flatten_metrics({name: rows}))
    return out


def flatten_metrics(results: dict[str, dict[str, dict[str, float]]], prefix: str = "eval") -> dict[str, Any]:
    """{set: {lang: metrics}} -> {"eval/set/lang/metric": value}, with a "mean" pseudo-language per set."""
    flat: dict[str, Any] = {}
    for name, rows in results.items():
        for lang, metrics in {**rows, "mean": mean_over_languages(rows)}.items():
            for key, value in metrics.items():
                flat[f"{prefix}/{name}/{lang}/{key}"] = value
    return flat
