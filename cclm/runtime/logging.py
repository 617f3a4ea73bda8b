"""Run logging on rank 0: TensorBoard scalars, ``metrics.jsonl`` (one record per logged step) and progress: a
tqdm bar on a terminal; where stderr is a file or a pipe (a SLURM log, ``| tee``), where a bar's redraws would run
together on one line, a log line instead at most every :data:`PROGRESS_LINE_S` seconds (step, rate, time left,
the last logged loss)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
PROGRESS_LINE_S = 30.0
log = logging.getLogger("cclm.train")


def truncate_metrics(output_dir: str | Path, last_step: int) -> None:
    """Drop records written after ``last_step`` (by a run that died after its last checkpoint), so a resumed
    run's metrics.jsonl reads as one uninterrupted run."""
    path = Path(output_dir) / METRICS_FILE
    if not path.exists():
        return
    kept = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill
            log.warning("%s:%d: dropping a torn record", path, number)
            continue
        if step <= last_step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class RunLogger:
    def __init__(
        self,
        output_dir: str | Path,
        rank: int,
        max_steps: int,
        start_step: int,
        enabled_bar: bool = True,
        desc: str = "train",
        terminal: bool | None = None,
        line_interval_s: float = PROGRESS_LINE_S,
    ):
        """``terminal``: draw a bar (None: when stderr is a terminal); otherwise log progress lines every
        ``line_interval_s`` seconds. ``enabled_bar=False`` turns both off."""
        self.rank = rank
        self.writer = None
        self.file = None
        self.bar = None
        self.lines = None
        if rank != 0:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        output_dir = Path(output_dir)
        self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step + 1)
        self.file = open(output_dir / METRICS_FILE, "a", buffering=1)  # noqa: SIM115 - closed in close()
        terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar = tqdm(
            total=max_steps,
            initial=start_step,
            desc=desc,
            dynamic_ncols=True,
            disable=not (enabled_bar and terminal),
            mininterval=0.1,
        )
        if enabled_bar and not terminal:
            self.lines = ProgressLines(desc, max_steps, start_step, line_interval_s)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if self.rank != 0:
            return
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.file.write(json.dumps({"step": step, **scalars}) + "\n")
        # refresh=False: the bar redraws on its own interval (every 30 s in a log file), not at every log step
        self.bar.set_postfix(
            loss=f"{scalars.get('loss', float('nan')):.3f}",
            sps=f"{scalars.get('samples_per_s', 0):.1f}",
            refresh=False,
        )
        if self.lines is not None:
            self.lines.scalars = scalars

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)
        if self.lines is not None:
            self.lines.advance(n)

    def close(self) -> None:
        """Each part closed on its own: one that cannot flush (a full disk) is a warning, so that the error that
        ended the run is the one reported."""
        if self.rank != 0:
            return
        parts = [self.writer.close, self.file.close, self.bar.close]
        if self.lines is not None:
            parts.append(self.lines.finish)
        for close in parts:
            try:
                close()
            except OSError as err:
                log.warning("closing the run's logs: %s", err)


class ProgressLines:
    """Progress as log lines: the first step, then at most one line every ``interval_s`` seconds, and the last
    step reached."""

    def __init__(self, desc: str, total: int, start_step: int, interval_s: float):
        self.desc, self.total, self.interval_s = desc, total, interval_s
        self.start_step = self.step = self.shown_step = start_step
        self.started = self.shown_at = time.monotonic()
        self.scalars: dict[str, float] = {}

    def advance(self, n: int = 1) -> None:
        self.step += n
        now = time.monotonic()
        if self.shown_step == self.start_step or now - self.shown_at >= self.interval_s:
            self.show(now)

    def finish(self) -> None:
        if self.step != self.shown_step:
            self.show(time.monotonic())

    def show(self, now: float) -> None:
        self.shown_at, self.shown_step = now, self.step
        elapsed = now - self.started
        rate = (self.step - self.start_step) / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.step) / rate if rate > 0 else float("nan")
        parts = [f"{self.desc} step {self.step}/{self.total} ({100.0 * self.step / max(self.total, 1):.0f}%)"]
        if "loss" in self.scalars:
            parts.append(f"loss {self.scalars['loss']:.4f}")
        parts.append(f"{rate:.2f} steps/s, {_duration(elapsed)} elapsed, {_duration(left)} left")
        log.info(", ".join(parts))


def _duration(seconds: float) -> str:
    if seconds != seconds:  # nan: no rate yet
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
