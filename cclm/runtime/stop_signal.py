"""SIGUSR1 (SLURM's warning before the time limit) asks a training job to save a checkpoint and exit 0. One flag
per process, set by the handler and read by the trainer at its stop checks: a job that trains several times (a
recipe's stages, a few-shot sweep) holds the handler for the whole job, so a signal that arrives between two
trainings (an evaluation, building the next engine) is neither fatal (the default action ends the process) nor
lost (the next training saves and stops at its first check)."""

from __future__ import annotations

import contextlib
import functools
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

STOP_SIGNAL = signal.SIGUSR1

_requested: str | None = None
_depth = 0
_previous: Any = None

F = TypeVar("F", bound=Callable[..., Any])


def _request(signum, frame) -> None:
    global _requested
    _requested = signal.Signals(signum).name


def requested() -> str | None:
    """The name of the stop signal received while a :func:`catching` block was open, else None."""
    return _requested


@contextlib.contextmanager
def catching() -> Iterator[None]:
    """Hold the handler while the block runs. The outermost block clears the flag when it opens and restores the
    previous handler when it closes; nested blocks (a trainer inside a recipe) only join it. Outside the main
    thread signals cannot be handled: a no-op."""
    global _depth, _previous, _requested
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _depth == 0:
        _requested = None
        _previous = signal.signal(STOP_SIGNAL, _request)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            signal.signal(STOP_SIGNAL, _previous)
            _previous = None


def holds_stop_signal(function: F) -> F:
    """Decorate a job that trains several times (see the module doc)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with catching():
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
