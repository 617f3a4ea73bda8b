"""Counting skipped samples, with rate-limited warnings.

A multi-day run must not die on one bad JPEG, and must not flood the log either: each reason is logged on its
1st, 2nd, ..., 10th occurrence, then on the 100th, 1,000th, ... The exact counts are kept for logging by the
trainer (``PretrainData.skip_counts``) and for the converters' closing summaries and manifests.
"""

from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger("cclm.data")


class SkipSample(Exception):
    """Raised while processing one sample: the sample is dropped and counted under ``reason``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _should_log(count: int) -> bool:
    if count <= 10:
        return True
    while count % 10 == 0:
        count //= 10
    return count == 1


class SkipCounter:
    def __init__(self, initial: dict[str, int] | None = None, where: str = ""):
        self.counts: Counter[str] = Counter(initial or {})
        self.where = where

    def add(self, reason: str, detail: str = "", n: int = 1, warn: bool = True) -> None:
        """Count ``n`` skips under ``reason``; ``warn=False`` counts without logging."""
        before = self.counts[reason]
        self.counts[reason] += n
        if warn and any(_should_log(c) for c in range(before + 1, before + n + 1)):
            where = f" [{self.where}]" if self.where else ""
            log.warning(
                "skipped sample%s: %s%s (%d so far)",
                where,
                reason,
                f" ({detail})" if detail else "",
                self.counts[reason],
            )

    def as_dict(self) -> dict[str, int]:
        return {k: int(v) for k, v in sorted(self.counts.items()) if v}

    def total(self) -> int:
        return int(sum(self.counts.values()))
