"""Evaluation: image-text retrieval (two-stage ITC -> ITM) on the standard multilingual benchmarks, and the
per-language results tables."""

from cclm.evaluation.datasets import RetrievalDataConfig, RetrievalSet, load_retrieval_set
from cclm.evaluation.results import write_results
from cclm.evaluation.retrieval import itm_metrics, metrics_from_ranks
from cclm.evaluation.run import (
    evaluate_during_training,
    evaluate_retrieval,
    load_periodic_sets,
    run_retrieval,
)

__all__ = [
    "RetrievalDataConfig",
    "RetrievalSet",
    "evaluate_during_training",
    "evaluate_retrieval",
    "itm_metrics",
    "load_periodic_sets",
    "load_retrieval_set",
    "metrics_from_ranks",
    "run_retrieval",
    "write_results",
]
