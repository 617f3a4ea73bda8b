"""An output folder holds one run. A fresh run never writes into a folder that holds another run: it is refused
(nothing written) unless ``overwrite``, which moves the old run aside; ``resume`` continues the run there. A run's
own checkpoints are the ones in ``<output_dir>/checkpoints`` (so a run copied to another folder is still one run
there); resuming any other checkpoint into a folder holding a run is refused the same way, since it would mix two
runs' metrics and checkpoints (into a folder without a run, it starts a branch of that run).

A protocol whose stages train into subfolders of its output_dir (``stages``: NLVR domain pretraining's
``domain_pretrain``) claims the whole folder once, before its first stage writes: a run in a stage's subfolder is
then a run of the folder, moved aside with it."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from cclm.errors import UserError

log = logging.getLogger("cclm.train")
# What a run leaves in its output_dir; a folder with any of them holds a run.
RUN_MARKERS = ("config.json", "metrics.jsonl", "checkpoints")
INTERRUPTED = "interrupted.json"


def _can_create_in(folder: Path) -> bool:
    """Whether a file can be created in ``folder`` (tried, and removed: permission bits do not tell for root or
    for a read-only mount)."""
    try:
        handle, name = tempfile.mkstemp(prefix=".cclm-write-check-", dir=folder)
    except OSError:
        return False
    os.close(handle)
    os.unlink(name)
    return True


def holds_run(path: Path) -> bool:
    return path.is_dir() and any((path / marker).exists() for marker in RUN_MARKERS)


def is_own_checkpoint(path: Path, resume: str) -> bool:
    """Whether the checkpoint folder ``resume`` is one of the run in ``path``: it lies in ``path/checkpoints``."""
    return Path(resume).resolve().parent == (path / "checkpoints").resolve()


def replaces_run(path: Path, resume: str | None, stages: Sequence[str] = ()) -> bool:
    """Whether a run started with ``resume`` would replace the run in ``path`` (or in one of its ``stages``
    subfolders) instead of continuing it: a fresh run, or a resume from a checkpoint of another run."""
    if not (holds_run(path) or any(holds_run(path / stage) for stage in stages)):
        return False
    return not resume or (resume != "auto" and not is_own_checkpoint(path, resume))


def check_output_dir(
    path: str | Path,
    resume: str | None,
    overwrite: bool,
    key: str = "output_dir",
    stages: Sequence[str] = (),
) -> None:
    """Fail (naming the folder) when ``path`` cannot be written, or when a fresh run (no ``resume``), or one
    resumed from a checkpoint of another run, would write into a folder holding a run without ``overwrite``.
    Writes nothing."""
    path = Path(path)
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{key}={path}: {existing} is a file, not a folder")
    if not _can_create_in(existing):
        raise UserError(f"{key}={path}: {existing} is not writable")
    if overwrite and resume == "auto" and (holds_run(path) or any(holds_run(path / s) for s in stages)):
        # the paper configs say resume: auto: overwrite=true on top of it would be ignored, the old run continued
        raise UserError(
            f"overwrite=true asks to move the run in {key}={path} aside and start anew, but resume=auto (the "
            "config's or the command line's) continues it: add resume=null to start anew, or leave out "
            "overwrite=true to continue"
        )
    if not replaces_run(path, resume, stages):
        return
    if overwrite and resume and Path(resume).resolve().is_relative_to(path.resolve()):
        raise UserError(
            f"resume={resume} lies in {key}={path}, which overwrite=true would move aside: resume it into "
            f"another {key}"
        )
    if overwrite:
        return
    if not resume:
        raise UserError(
            f"{key}={path} already holds a run: continue it with resume=auto, or start anew with "
            f"overwrite=true (the old run is moved to {path}.old-<time>, not deleted)"
        )
    raise UserError(
        f"resume={resume} is not a checkpoint of the run that {key}={path} holds (its checkpoints are in "
        f"{path / 'checkpoints'}): continue that run with resume=auto, resume {resume} into another "
        f"{key}, or replace the run with overwrite=true (the old run is moved to {path}.old-<time>, not deleted)"
    )


def aside_path(path: Path) -> Path:
    """A free name beside ``path`` for moving it aside, never deleting it: ``NAME.old-<time>[-N]``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, suffix = path.with_name(f"{path.name}.old-{stamp}"), 1
    while aside.exists():
        aside, suffix = path.with_name(f"{path.name}.old-{stamp}-{suffix}"), suffix + 1
    return aside


def claim_output_dir(
    path: str | Path, resume: str | None, overwrite: bool, stages: Sequence[str] = ()
) -> Path:
    """:func:`check_output_dir`, then move an old run aside when a fresh run (or one resumed from another run's
    checkpoint) overwrites it, and create the folder. Called by the main rank only."""
    path = Path(path)
    check_output_dir(path, resume, overwrite, stages=stages)
    if overwrite and replaces_run(path, resume, stages):
        aside = aside_path(path)
        path.rename(aside)
        log.warning("overwrite=true: the previous run in %s was moved to %s", path, aside)
    path.mkdir(parents=True, exist_ok=True)
    (path / INTERRUPTED).unlink(missing_ok=True)
    return path
