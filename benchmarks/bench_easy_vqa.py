"""easy-VQA fine-tuning benchmark (``make bench-easy-vqa``): ``cclm finetune configs/finetune/easy_vqa.yaml`` on
CPU with a wall-clock budget (default 10 minutes of training, dev evaluations included), then accuracy on the
full easy-VQA test split (9,673 questions). Starts from ``--pretrained`` (a cclm model folder, e.g. the demo's
pretrained tiny model) or, without one, from a randomly initialised tiny model with a tokenizer trained on the
training questions -- the JSON and RESULTS.md line say which.

``--head iglue`` (default) fine-tunes the xGQA-style answer classifier, ``--head cclm`` the CCLM reference's
generative answer decoder (ranking the 13 answers); ``--head iglue cclm`` runs both, one after the other, from the
same start and with the same settings.

Reference: a basic CNN + LSTM model (the easy-VQA author's baseline) reaches 87.6% test accuracy.

Writes benchmarks/results/easy_vqa.json (``--head cclm``: easy_vqa_cclm.json; ``--result-name`` to choose) and
appends a line per run to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BASELINE = 87.6  # basic CNN + LSTM, easy-VQA test accuracy


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pretrained", default=None, help="cclm model folder to start from (default: random init)"
    )
    parser.add_argument(
        "--minutes",
        type=float,
        default=10.0,
        help="training wall-clock budget (0: none, e.g. with train.max_steps)",
    )
    parser.add_argument("--output-dir", default="/tmp/cclm_bench_easy_vqa")
    parser.add_argument(
        "--head",
        nargs="+",
        choices=["iglue", "cclm"],
        default=["iglue"],
        help="task head style(s): iglue = answer classifier, cclm = answer decoder (several: one run each)",
    )
    parser.add_argument(
        "--result-name", default=None, help="results JSON name (default easy_vqa; other heads add _<head>)"
    )
    parser.add_argument("--no-record", action="store_true", help="do not write results / RESULTS.md")
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    stem = args.result_name or "easy_vqa"
    for head in args.head:
        output_dir = Path(args.output_dir) / head if len(args.head) > 1 else Path(args.output_dir)
        exact = args.result_name and len(args.head) == 1  # the name as given
        run(args, head, output_dir, stem if exact or head == "iglue" else f"{stem}_{head}")
    return 0


def run(args, head: str, output_dir: Path, result_name: str) -> None:
    import torch

    from cclm.config import FinetuneConfig, load_config
    from cclm.tasks import protocols

    overrides = [
        f"output_dir={output_dir}",
        "train.device=cpu",
        f"train.time_limit_minutes={args.minutes}",
        f"head={head}",
        *([f"pretrained={args.pretrained}"] if args.pretrained else []),
        *args.overrides,
    ]
    cfg = load_config(FinetuneConfig, REPO / "configs" / "finetune" / "easy_vqa.yaml", overrides)
    start_wall, start_cpu = time.monotonic(), time.process_time()
    tables = protocols.run_zero_shot(cfg)
    wall, cpu = time.monotonic() - start_wall, time.process_time() - start_cpu
    history = json.loads((output_dir / "train_history.json").read_text())
    task_info = json.loads((output_dir / "model" / "task.json").read_text())
    if task_info.get("head", "iglue") != head:
        raise RuntimeError(f"asked for head {head}, the saved task model has {task_info.get('head')}")
    selection = task_info["selection"]
    (row,) = tables["zero_shot"]["rows"]
    result = {
        "benchmark": "easy_vqa_finetune",
        "head": head
        + (" (answer classifier)" if head == "iglue" else " (answer decoder, ranks all 13 answers)"),
        "start": "pretrained " + args.pretrained if args.pretrained else "random init (no pretrained model)",
        "test_accuracy": row["accuracy"],
        "test_questions": row["examples"],
        "best_dev_accuracy": selection["dev"],
        "best_step": selection["step"],
        "steps": selection["steps"],
        "batch_size": cfg.train.batch_size,
        "image_size": json.loads((output_dir / "model" / "config.json").read_text())["model"]["vision"][
            "image_size"
        ],
        "training_budget_minutes": args.minutes,
        "wall_seconds_total": round(wall, 1),
        "cpu_seconds_total": round(cpu, 1),
        "history": history,
        "baseline_cnn_lstm": BASELINE,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg()[0],
        "machine": platform.platform(),
        "overrides": overrides,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2))
    if not args.no_record:
        out = REPO / "benchmarks" / "results" / f"{result_name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        budget = f"{args.minutes:g} min budget" if args.minutes > 0 else "no time limit"
        line = (
            f"- easy-VQA fine-tune, head {head} ({result['start']}, CPU, {budget}, "
            f"{result['steps']} steps x {cfg.train.batch_size}): test accuracy {row['accuracy']:.2f}% "
            f"on {row['examples']} questions (CNN+LSTM baseline {BASELINE}%, target >= 95%); "
            f"`python benchmarks/bench_easy_vqa.py --head {head}`\n"
        )
        with (REPO / "benchmarks" / "RESULTS.md").open("a", encoding="utf-8") as handle:
            handle.write(line)


if __name__ == "__main__":
    sys.exit(main())
