"""Task metrics: accuracy (percent) and IGLUE's average over non-English languages."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cclm.evaluation.results import non_english_average


def accuracy(predictions: Sequence[int] | torch.Tensor, labels: Sequence[int] | torch.Tensor) -> float:
    predictions, labels = torch.as_tensor(predictions), torch.as_tensor(labels)
    if predictions.shape != labels.shape:
        raise ValueError(f"{predictions.shape[0]} predictions for {labels.shape[0]} labels")
    if labels.numel() == 0:
        raise ValueError("accuracy of an empty set")
    return 100.0 * (predictions == labels).double().mean().item()


def average_non_english(rows: Sequence[dict], columns: Sequence[str]) -> dict[str, float] | None:
    """Mean of each metric column over the rows whose language is not English (IGLUE's 'avg'); None if none."""
    return non_english_average({row["language"]: row for row in rows}, columns)
