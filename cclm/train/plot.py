"""``cclm plot OUTPUT_DIR``: training curves from ``metrics.jsonl`` to ``OUTPUT_DIR/curves.png``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cclm.jsonl import JsonFileError, read_jsonl
from cclm.runtime.logging import METRICS_FILE

log = logging.getLogger("cclm.plot")


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl``. A last line that cannot be read is a record a kill cut short
    (docs/reliability.md): it is skipped with a warning. Any other bad line, or a record without a ``step``,
    fails naming ``file:line``."""
    numbered, last_read = [], 0
    try:
        for last_read, record in read_jsonl(path):
            numbered.append((last_read, record))
    except JsonFileError as err:
        if not _is_last_line(path, last_read):
            raise
        log.warning("%s: skipped 1 record, the last one (cut short by a kill?)", err)
    for number, record in numbered:
        if not isinstance(record.get("step"), int):
            raise JsonFileError(f'{path}:{number}: a record without an integer "step"')
    return [record for _, record in numbered]


def _is_last_line(path: Path, after: int) -> bool:
    """Whether exactly one non-blank line follows line ``after`` (the one that failed)."""
    lines = path.read_bytes().split(b"\n")[after:]
    return sum(1 for line in lines if line.strip()) == 1


def loss_keys(records: list[dict]) -> list[str]:
    """The per-view losses, ``<view>/<name>``: the keys under a prefix that has a ``<prefix>/loss`` (the trainer
    logs every view's losses with their sum ``loss``). Counts such as the cumulative ``skipped/<reason>`` and the
    evaluations (``eval/...``) are not losses."""
    keys = {k for r in records for k in r}
    views = {k.split("/", 1)[0] for k in keys if k.count("/") == 1 and k.endswith("/loss")}
    views -= {"eval", "skipped"}
    return sorted(k for k in keys if "/" in k and k.split("/", 1)[0] in views)


def plot_curves(output_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    path = output_dir / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {output_dir} a pretraining output_dir?")
    records = read_metrics(path)
    if not records:
        raise ValueError(f"{path} holds no records yet")
    losses = loss_keys(records)
    # one curve per held-out set and language: eval/<set>/<lang>/r_mean
    evals = sorted(
        {
            k
            for r in records
            for k in r
            if k.startswith("eval/") and k.endswith("/r_mean") and k.count("/") == 3
        }
    )
    panels = [
        ("losses by view", ["loss", *losses]),
        ("learning rate", ["lr"]),
        ("throughput", ["samples_per_s"]),
    ]
    if evals:
        panels.append(("zero-shot retrieval (r_mean)", evals))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                ax.plot(
                    *zip(*points), label=key.removeprefix("eval/"), marker="o" if len(points) < 20 else None
                )
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out) if out else output_dir / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cclm plot", description=__doc__)
    parser.add_argument("output_dir")
    parser.add_argument("--out", default=None, help="PNG path (default OUTPUT_DIR/curves.png)")
    args = parser.parse_args(argv[1:])
    logging.basicConfig(level=logging.WARNING, format="cclm plot: %(levelname)s: %(message)s")
    try:
        print(plot_curves(args.output_dir, args.out))
    except (FileNotFoundError, ValueError) as err:
        print(f"cclm plot: {err}", file=sys.stderr)
        return 2
    return 0
