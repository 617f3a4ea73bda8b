"""Run logging on rank 0: TensorBoard scalars, ``metrics.jsonl`` (one record per logged step) and a tqdm bar."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
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
    ):
        self.rank = rank
        self.writer = None
        self.file = None
        self.bar = None
        if rank != 0:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        output_dir = Path(output_dir)
        self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step + 1)
        self.file = open(output_dir / METRICS_FILE, "a", buffering=1)  # noqa: SIM115 - closed in close()
        # In a log file (not a terminal) a redraw per step floods it; redraw every 30 s there instead.
        self.bar = tqdm(
            total=max_steps,
            initial=start_step,
            desc=desc,
            dynamic_ncols=True,
            disable=not enabled_bar,
            mininterval=0.1 if sys.stderr.isatty() else 30.0,
        )

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

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.rank == 0:
            self.writer.close()
            self.file.close()
            self.bar.close()
