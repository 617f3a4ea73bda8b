"""easy-VQA fine-tuning benchmark (``make bench-easy-vqa``): ``cclm finetune configs/finetune/easy_vqa.yaml`` on
CPU with a wall-clock budget (default 10 minutes of training, dev evaluations included), then accuracy on the
full easy-VQA test split (9,673 questions). Starts from ``--pretrained`` (a cclm model folder, e.g. the demo's
pretrained tiny model) or, without one, from a randomly initialised tiny model with a tokenizer trained on the
training questions -- the JSON and RESULTS.md line say which.

Reference: a basic CNN + LSTM model (the easy-VQA author's baseline) reaches 87.6% test accuracy.

Writes benchmarks/results/easy_vqa.json and appends a line to benchmarks/RESULTS.md.
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
    parser.add_argument("--minutes", type=float, default=10.0, help="training wall-clock budget")
    parser.add_argument("--output-dir", default="/tmp/cclm_bench_easy_vqa")
    parser.add_argument("--no-record", action="store_true", help="do not write results / RESULTS.md")
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    from cclm.config import FinetuneConfig, load_config
    from cclm.tasks import protocols

    overrides = [
        f"output_dir={args.output_dir}",
        "train.device=cpu",
        f"train.time_limit_minutes={args.minutes}",
        *([f"pretrained={args.pretrained}"] if args.pretrained else []),
        *args.overrides,
    ]
    cfg = load_config(FinetuneConfig, REPO / "configs" / "finetune" / "easy_vqa.yaml", overrides)
    start_wall, start_cpu = time.monotonic(), time.process_time()
    tables = protocols.run_zero_shot(cfg)
    wall, cpu = time.monotonic() - start_wall, time.process_time() - start_cpu
    history = json.loads((Path(args.output_dir) / "train_history.json").read_text())
    selection = json.loads((Path(args.output_dir) / "model" / "task.json").read_text())["selection"]
    (row,) = tables["zero_shot"]["rows"]
    result = {
        "benchmark": "easy_vqa_finetune",
        "start": "pretrained " + args.pretrained if args.pretrained else "random init (no pretrained model)",
        "test_accuracy": row["accuracy"],
        "test_questions": row["examples"],
        "best_dev_accuracy": selection["dev"],
        "best_step": selection["step"],
        "steps": selection["steps"],
        "batch_size": cfg.train.batch_size,
        "image_size": json.loads((Path(args.output_dir) / "model" / "config.json").read_text())["model"][
            "vision"
        ]["image_size"],
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
        out = REPO / "benchmarks" / "results" / "easy_vqa.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        line = (
            f"- easy-VQA fine-tune ({result['start']}, CPU, {args.minutes:g} min budget, "
            f"{result['steps']} steps x {cfg.train.batch_size}): test accuracy {row['accuracy']:.2f}% "
            f"on {row['examples']} questions (CNN+LSTM baseline {BASELINE}%, target >= 95%); "
            f"`python benchmarks/bench_easy_vqa.py`\n"
        )
        with (REPO / "benchmarks" / "RESULTS.md").open("a", encoding="utf-8") as handle:
            handle.write(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
