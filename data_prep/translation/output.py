"""Resumable output: one output shard per unit of input (an input shard, or a chunk of a text corpus), each
written atomically, then a progress record; ``sizes.json`` and ``manifest.json`` once every unit is done.

``OUT/translate-progress/NAME.json`` records a finished shard: the run's settings, the sha256 of its input (where
the input is a local file) and of the shard written, and its counts. A rerun skips a shard whose record matches
(same settings, same input, output file unchanged) and redoes any other; a shard being written when the run was
killed is only a ``NAME.partial`` file, which the rerun removes. So a killed run loses at most the shard in
progress, and the finished folder is the same as an uninterrupted run's (tar members carry no time stamp)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from cclm.data.shards import FORMAT_VERSION, MANIFEST_NAME, PARTIAL_SUFFIX, SIZES_NAME, VIEW_PARALLEL
from cclm.data.skips import SkipCounter
from cclm.errors import UserError
from data_prep.translation.tally import Tally

log = logging.getLogger("cclm.prep.translate")
PROGRESS_DIR = "translate-progress"
Samples = list[tuple[str, dict[str, bytes]]]


@dataclass
class Unit:
    name: str  # the output shard's file name
    digest: Callable[[], str | None]  # sha256 of the input, computed when the unit's turn comes; None: remote
    make: Callable  # make(translator, tally) -> the output samples


@dataclass
class RunResult:
    tally: Tally  # every shard, including those finished by an earlier run
    done_now: int
    resumed: int
    manifest: dict


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _publish(path: Path, data: bytes | None = None) -> None:
    """Move ``path.partial`` (after writing ``data`` to it) into place, on disk first."""
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    if data is not None:
        partial.write_bytes(data)
    with open(partial, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(partial, path)


def write_shard(path: Path, samples: Samples) -> None:
    with tarfile.open(path.with_name(path.name + PARTIAL_SUFFIX), "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mode = len(data), 0o444
                tar.addfile(info, io.BytesIO(data))
    _publish(path)


class ResumableOutput:
    """``names``: the shards this run writes; a folder holding others from an earlier run (fewer input shards, a
    shorter corpus, another ``--prefix``) is refused, before any work, since readers of the folder would read them."""

    def __init__(
        self, out: Path, settings: dict, view: str, command: str, inputs: list[Path], names: list[str]
    ):
        self.out, self.settings, self.view, self.command = out, settings, view, command
        self.progress = out / PROGRESS_DIR
        if any(out.resolve() == p.resolve() for p in inputs):
            raise UserError(f"--out {out} is an input folder: write the translated shards to a new folder")
        if out.is_dir() and any(out.glob("*.tar")) and not self.progress.is_dir():
            raise UserError(
                f"--out {out} holds shards that cclm prep translate did not write; use a new folder"
            )
        self.progress.mkdir(parents=True, exist_ok=True)
        for leftover in [*out.glob(f"*{PARTIAL_SUFFIX}"), *self.progress.glob(f"*{PARTIAL_SUFFIX}")]:
            leftover.unlink()  # the shard a killed run was writing
        self._check_settings()
        self._check_names(names)

    def _record_path(self, name: str) -> Path:
        return self.progress / f"{name}.json"

    def _record(self, path: Path) -> dict:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(record, dict) and {"settings", "input_sha256", "output_sha256", "tally"} <= set(
                record
            ):
                return record
        except (UnicodeDecodeError, ValueError):
            pass  # unreadable: the same error as a record of the wrong shape, below
        raise UserError(
            f"{path} is not a progress record of cclm prep translate: delete it to redo that shard"
        )

    def _check_settings(self) -> None:
        for path in sorted(self.progress.glob("*.json")):
            recorded = self._record(path)["settings"]
            changed = sorted(
                k for k in {*recorded, *self.settings} if recorded.get(k) != self.settings.get(k)
            )
            if changed:
                raise UserError(
                    f"--out {self.out} was started with other settings ({', '.join(f'{k}={recorded.get(k)!r}' for k in changed)}"
                    f"); rerun with those, or translate into a new folder"
                )

    def _check_names(self, names: list[str]) -> None:
        if len(set(names)) != len(names):
            raise UserError(
                "two input shards have the same file name; translate each folder into its own --out"
            )
        earlier = {p.name for p in self.out.glob("*.tar")}
        earlier |= {p.name.removesuffix(".json") for p in self.progress.glob("*.json")}
        stale = sorted(earlier - set(names))
        if stale:
            listed = ", ".join(stale[:5]) + (f" and {len(stale) - 5} more" if len(stale) > 5 else "")
            raise UserError(
                f"--out {self.out} holds {len(stale)} shard(s) of an earlier run that this run would not write "
                f"({listed}): the input changed (other --shards, a shorter --text corpus or another --prefix); "
                f"rerun with the earlier input, translate into a new folder, or delete those shards and their "
                f"{PROGRESS_DIR}/NAME.json records"
            )

    def finished(self, unit: Unit, input_digest: str | None) -> Tally | None:
        """The counts of a shard an earlier run finished and nothing changed since, else None."""
        path = self._record_path(unit.name)
        if not path.exists():
            return None
        record = self._record(path)
        shard = self.out / unit.name
        if input_digest is not None and record["input_sha256"] != input_digest:
            log.warning("input shard %s changed since it was translated: translating it again", unit.name)
        elif not shard.exists() or sha256(shard) != record["output_sha256"]:
            log.warning("output shard %s is missing or changed since it was written: writing it again", shard)
        else:
            return Tally.from_dict(record["tally"])
        return None

    def run(self, units: list[Unit], translator, show_progress: bool = True) -> RunResult:
        self._check_names([u.name for u in units])
        # one warning counter for the whole run: the rate limit of skip warnings holds across shards
        warnings = SkipCounter(where="cclm prep translate")
        total, done_now, resumed, sizes, digests = Tally(), 0, 0, {}, {}
        bar = tqdm(units, desc="translate", unit="shard", disable=not show_progress)
        for unit in bar:
            input_digest = unit.digest()
            tally = self.finished(unit, input_digest)
            if tally is None:
                tally = Tally(warnings=warnings)
                write_shard(self.out / unit.name, unit.make(translator, tally))
                record = {
                    "settings": self.settings,
                    "input_sha256": input_digest,
                    "output_sha256": sha256(self.out / unit.name),
                    "tally": tally.to_dict(),
                }
                _publish(
                    self._record_path(unit.name), json.dumps(record, indent=1, ensure_ascii=False).encode()
                )
                done_now += 1
                if translator.throughput.seconds > 0:
                    bar.set_postfix(
                        sentences_per_s=f"{translator.throughput.sentences / translator.throughput.seconds:.1f}"
                    )
            else:
                resumed += 1
            total.add(tally)
            sizes[unit.name] = tally.samples
            digests[unit.name] = self._record(self._record_path(unit.name))["output_sha256"]
        manifest = self._publish_index(total, sizes, digests, translator.family)
        if capped := total.capped_outputs():
            log.warning(
                "%d translations reached their length cap (min(--max-new-tokens, 2 x source tokens + 10)) before "
                "the model ended them, and are written as they are, maybe cut mid-sentence (%s): a model that "
                "loops, or --max-new-tokens too low for the sources",
                sum(capped.values()),
                ", ".join(f"{lang}={n}" for lang, n in capped.items()),
            )
        return RunResult(total, done_now, resumed, manifest)

    def _publish_index(self, total: Tally, sizes: dict, digests: dict, family: str) -> dict:
        counts = total.to_dict()
        manifest = {
            "format_version": FORMAT_VERSION,
            "view": self.view,
            "samples": total.samples,
            "shards": len(sizes),
            "files": list(sizes),
            "languages": counts["languages"],
            **(
                {"language_pairs": total.pair_counts()}
                if self.view == VIEW_PARALLEL and total.pairs is not None
                else {}
            ),
            "skipped": counts["skipped"],
            "command": self.command,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "translation": {
                **self.settings,
                "family": family,
                "per_language": counts["per_language"],
                "sha256": digests,
            },
        }
        _publish(self.out / SIZES_NAME, json.dumps(sizes, indent=1).encode())
        _publish(self.out / MANIFEST_NAME, json.dumps(manifest, indent=1, ensure_ascii=False).encode())
        return manifest
