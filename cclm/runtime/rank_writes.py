"""Writes that several ranks take part in, where one rank's failure must stop them all.

A checkpoint (or the best weights of a run that selects a model) is written by every rank, between collectives.
If the one rank whose disk is full raised at once, the others would wait in the next collective until the
watchdog's timeout, and their logs would never say why. Here a rank whose write fails records the error, skips
its remaining writes and still reaches the collectives the others wait in; :meth:`RankWrites.failure` (itself a
collective) then tells every rank which rank failed and why, so that all of them stop with the same message."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch

from cclm.runtime.env import dist_info


def is_write_failure(err: BaseException) -> bool:
    """An OSError, or a RuntimeError that is not a collective's or the device's own (those keep their message):
    torch.save reports a failed write as a RuntimeError."""
    if isinstance(err, OSError):
        return True
    if not isinstance(err, RuntimeError):
        return False
    not_writes = tuple(
        kind
        for kind in (getattr(torch.distributed, "DistError", None), getattr(torch, "OutOfMemoryError", None))
        if isinstance(kind, type)
    )
    return not isinstance(err, not_writes) and "CUDA" not in str(err)


def write_error_cause(err: BaseException) -> str:
    """An OSError's reason (``No space left on device``), else the first line of the message."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return (str(err).splitlines() or [type(err).__name__])[0]


class RankWrites:
    """This rank's writes of one save: the first that fails is kept (not raised) and the later ones are skipped."""

    def __init__(self):
        self.error: BaseException | None = None

    def run(self, write: Callable[..., Any], *args, **kwargs) -> Any:
        if self.error is not None:
            return None
        try:
            return write(*args, **kwargs)
        except (OSError, RuntimeError) as err:
            if not is_write_failure(err):
                raise
            self.error = err
            return None

    def failure(self) -> str | None:
        """Which rank's write failed and why (``rank 1: No space left on device``; without the rank in a one-rank
        run), or None when every rank's writes succeeded. A collective: every rank must call it."""
        import torch.distributed as dist

        rank, world = dist_info()
        mine = ""
        if self.error is not None:
            cause = write_error_cause(self.error)
            mine = f"rank {rank}: {cause}" if world > 1 else cause
        reports = [mine]
        if dist.is_initialized() and world > 1:
            reports = [""] * world
            dist.all_gather_object(reports, mine)
        failed = [report for report in reports if report]
        if not failed:
            return None
        more = f"; {len(failed) - 1} more rank(s) failed too" if len(failed) > 1 else ""
        return failed[0] + more


class _DeferringEngine:
    """DeepSpeed's checkpoint engine with ``save`` and ``makedirs`` run through :class:`RankWrites`; everything
    else is delegated."""

    def __init__(self, engine, writes: RankWrites):
        self._engine, self._writes = engine, writes

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def save(self, *args, **kwargs):
        return self._writes.run(self._engine.save, *args, **kwargs)

    def makedirs(self, *args, **kwargs):
        return self._writes.run(self._engine.makedirs, *args, **kwargs)


@contextmanager
def deferring_write_errors(engine, writes: RankWrites):
    """While DeepSpeed's ``engine.save_checkpoint`` runs: a write that fails on this rank is recorded in ``writes``
    and the rank goes on to DeepSpeed's barriers. Its writes go through the checkpoint engine, except the
    ZeRO recovery script that rank 0 copies (a private method, wrapped on the instance where it exists)."""
    inner = engine.checkpoint_engine
    engine.checkpoint_engine = _DeferringEngine(inner, writes)
    copy_script = getattr(type(engine), "_copy_recovery_script", None)
    if copy_script is not None:
        engine._copy_recovery_script = lambda *args, **kwargs: writes.run(
            copy_script, engine, *args, **kwargs
        )
    try:
        yield
    finally:
        engine.checkpoint_engine = inner
        if copy_script is not None:
            del engine._copy_recovery_script
