"""An ordered map over worker processes with a progress bar, for the data-preparation jobs."""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Callable, Iterable, Iterator

from tqdm import tqdm


def ordered_map(
    fn: Callable,
    items: Iterable,
    num_workers: int,
    total: int | None,
    show: bool,
    desc: str,
    unit: str = "item",
    chunksize: int = 16,
) -> Iterator:
    """``fn`` over ``items`` in ``num_workers`` forked processes (inline for 0), results in input order."""
    bar = tqdm(total=total, desc=desc, unit=unit, disable=not show, file=sys.stderr)
    try:
        if num_workers <= 0:
            for item in items:
                yield fn(item)
                bar.update()
        else:
            with multiprocessing.get_context("fork").Pool(num_workers) as pool:
                for result in pool.imap(fn, items, chunksize=chunksize):
                    yield result
                    bar.update()
    finally:
        bar.close()
