"""An ordered map over worker processes with a progress bar, for the data-preparation jobs."""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from tqdm import tqdm

from cclm.errors import UserError

CHUNKS_PER_WORKER = 2  # chunks read ahead of the consumer per worker: enough to keep every worker busy


class WorkerDiedError(UserError):
    """A worker process ended without returning its work: killed (the out-of-memory killer's SIGKILL) or crashed."""


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
    """``fn`` over ``items`` in ``num_workers`` forked processes (inline for 0), results in input order.

    ``items`` is read lazily, in chunks of ``chunksize``, by a thread of its own (so an iterator that blocks until
    the consumer has taken results, as ``image_caption._write_all``'s does, cannot block the consumer): at most
    ``CHUNKS_PER_WORKER * num_workers + 2`` chunks are read and not yet yielded, whatever the length of ``items``.
    An exception of ``fn`` reaches the consumer in place of its chunk's results (as with ``Pool.imap``), one
    of reading ``items`` after the results of what was read before it. A worker that dies (SIGKILL from the
    out-of-memory killer, a crash in native code) stops the map with :class:`WorkerDiedError` naming its signal
    or exit status, instead of waiting for its results forever; the other workers are stopped."""
    bar = tqdm(total=total, desc=desc, unit=unit, disable=not show, file=sys.stderr)
    try:
        if num_workers <= 0:
            for item in items:
                yield fn(item)
                bar.update()
        else:
            with contextlib.closing(_pooled(fn, items, num_workers, chunksize, desc)) as results:
                for result in results:  # closed with this generator: the pool stops at once
                    yield result
                    bar.update()
    finally:
        bar.close()


_END = object()


def _run_chunk(fn: Callable, chunk: list) -> list:
    return [fn(item) for item in chunk]


def _pooled(fn: Callable, items: Iterable, num_workers: int, chunksize: int, desc: str) -> Iterator:
    executor = ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("fork"))
    workers: list = []  # the worker processes, to name a dead one's signal
    finished = False
    try:
        # Fork every worker now, from this thread, before the reading thread exists (a fork copies no thread).
        executor.submit(int).result()
        workers = _processes(executor)
        pending: queue.Queue = queue.Queue(maxsize=CHUNKS_PER_WORKER * num_workers)
        stop = threading.Event()
        reader = threading.Thread(
            target=_feed, args=(executor, fn, iter(items), chunksize, pending, stop), daemon=True
        )
        reader.start()
        try:
            while True:
                future = pending.get()
                if future is _END:
                    break
                if isinstance(future, BaseException):  # reading ``items`` (or submitting) failed here
                    raise future
                yield from future.result()
            finished = True
        finally:
            stop.set()  # a reader blocked in ``items`` itself (a daemon) is left there
            if finished:
                reader.join()
    except BrokenProcessPool as err:
        raise WorkerDiedError(_died(desc, workers)) from err
    finally:
        if not finished:  # an error or an abandoned generator: stop the workers now, as Pool.terminate did
            for process in _processes(executor):
                if process.exitcode is None:
                    process.terminate()
        executor.shutdown(wait=True, cancel_futures=True)


def _processes(executor: ProcessPoolExecutor) -> list:
    """The executor's worker processes (a private attribute: none where a Python version lacks it)."""
    return list((getattr(executor, "_processes", None) or {}).values())


def _feed(executor, fn: Callable, items: Iterator, chunksize: int, pending: queue.Queue, stop) -> None:
    """Submit ``items`` chunk by chunk, putting each chunk's future (then :data:`_END`, or the exception that
    reading ``items`` or submitting raised) on ``pending``; returns early once ``stop`` is set."""

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                pending.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        while not stop.is_set():
            chunk: list = []
            failed: BaseException | None = None
            try:
                chunk.extend(itertools.islice(items, chunksize))
            except BaseException as err:  # noqa: BLE001 - raised after the items read before it
                failed = err
            if chunk and not put(executor.submit(_run_chunk, fn, chunk)):
                return
            if failed is not None:
                put(failed)
                return
            if not chunk:
                break
    except BaseException as err:  # noqa: BLE001 - submitting failed: handed to the consumer, which raises it
        put(err)
        return
    put(_END)


def _died(desc: str, workers: list) -> str:
    """What ended the pool: the signal or exit status of the worker(s) that died on their own."""
    # The pool stops the others: wait until every exit status is known. The executor's own thread reaps them too,
    # and a join that loses that race returns before the status is set, so look again until it is.
    deadline = time.monotonic() + 5
    while any(p.exitcode is None for p in workers) and time.monotonic() < deadline:
        for process in workers:
            process.join(timeout=0.05)
    ended = [p for p in workers if p.exitcode not in (None, 0)]
    # the pool terminates (SIGTERM) the others once one died: name the one that died first where it is known
    first = [p for p in ended if p.exitcode != -signal.SIGTERM] or ended
    how = "; ".join(f"pid {p.pid} {_exit_text(p.exitcode)}" for p in first) or "it ended without its results"
    return (
        f"a worker process died in {desc} ({how}); a SIGKILL is often the out-of-memory killer's: run with "
        "fewer --num-workers, or with more memory"
    )


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    return f"exited with status {code}"
