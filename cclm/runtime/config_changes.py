"""What a resumed run changed in its configuration. A resume is exact only with the configuration the checkpoint
was written under; a run resumed with other values (a longer schedule, another batch size) goes on with them,
and this module names every changed key in a warning and in ``<output_dir>/config_changes.jsonl``
(``{"step": N, "changes": {key: [before, after]}}``, one record per resume that changed something), so that the
run's history can be read back from its folder."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

CHANGES_FILE = "config_changes.jsonl"
# How and where the run is started, not what it trains (a run copied to another folder resumes there).
NOT_COMPARED = ("resume", "overwrite", "output_dir")
SHOWN = 8  # changed keys named in the warning (the file has them all)

log = logging.getLogger("cclm.train")


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value for every leaf (a list is one value)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def config_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, list[Any]]:
    """Dotted key -> ``[before, after]`` for every key whose value differs, was added (before None) or removed
    (after None), except :data:`NOT_COMPARED`. ``after`` is compared as it is written to JSON."""
    old = flatten(before)
    new = flatten(json.loads(json.dumps(after, default=str)))
    changes = {}
    for key in sorted(old.keys() | new.keys()):
        if key.split(".")[0] in NOT_COMPARED:
            continue
        if old.get(key) != new.get(key) or (key in old) != (key in new):
            changes[key] = [old.get(key), new.get(key)]
    return changes


def named(changes: Mapping[str, list[Any]]) -> str:
    """The first :data:`SHOWN` changes as ``key: before -> after``, and how many more there are."""
    shown = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in list(changes.items())[:SHOWN])
    return shown + (f" and {len(changes) - SHOWN} more" if len(changes) > SHOWN else "")


def report_changes(output_dir: str | Path, step: int, changes: Mapping[str, list[Any]]) -> None:
    """Warn, naming the changed keys, and append the record to ``config_changes.jsonl``. Main rank only."""
    if not changes:
        return
    path = Path(output_dir) / CHANGES_FILE
    log.warning(
        "resumed at step %d with a configuration that differs from the checkpoint's in %d key(s): %s. The run "
        "goes on with the new values; where they change what or how it trains, it no longer repeats the "
        "uninterrupted run (every change: %s)",
        step,
        len(changes),
        named(changes),
        path,
    )
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"step": step, "changes": dict(changes)}, default=str) + "\n")
