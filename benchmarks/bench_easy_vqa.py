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

``--cvil`` runs the cViL proof instead (:func:`cvil_easy_vqa`, also part of ``make bench-recipes``): an English
teacher fine-tuned with object tags, distilled into a Japanese + Hindi student on the grammar's parallel questions
(``configs/recipes/cvil_easy_vqa.yaml``); it updates the ``cvil_easy_vqa`` key of benchmarks/results/recipes.json.
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

from benchmarks.results_md import append_to_section  # noqa: E402

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
    parser.add_argument(
        "--cvil",
        action="store_true",
        help="the cViL proof (Japanese + Hindi students) instead of fine-tuning",
    )
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.cvil:
        return record_cvil(args)

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
        append_result_line(REPO / "benchmarks" / "RESULTS.md", line)


SECTION = "## easy-VQA fine-tuning (`make bench-easy-vqa`, `benchmarks/bench_easy_vqa.py`)"


def append_result_line(path: Path, text: str) -> None:
    """Add ``text`` at the end of this benchmark's section of RESULTS.md (not the later "easy-VQA: answer
    classifier vs ..." section; made at the file's end if missing)."""
    append_to_section(path, SECTION, text, match="## easy-VQA fine-tuning")


CVIL_LANGUAGES = ("ja", "hi")
# cViL is a language-extension recipe: its lines go where bench_recipes puts them (bench_recipes.SECTION)
CVIL_SECTION = "## Language extension recipes (`make bench-recipes`)"


def cvil_easy_vqa(output_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The cViL proof on easy-VQA with ``configs/recipes/cvil_easy_vqa.yaml`` (+ ``overrides``), one CPU thread:
    the ``cvil_easy_vqa`` entry of recipes.json (accuracies in percent, CPU seconds of the whole run)."""
    import torch

    from cclm.config import CViLVQARecipeConfig, load_config
    from cclm.recipes.cvil_vqa import run_cvil_vqa

    cfg = load_config(
        CViLVQARecipeConfig,
        REPO / "configs" / "recipes" / "cvil_easy_vqa.yaml",
        [f"output_dir={output_dir}", "overwrite=true", *overrides],
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    start_wall, start_cpu = time.monotonic(), time.process_time()
    try:
        results = run_cvil_vqa(cfg)
    finally:
        torch.set_num_threads(threads)
    rows = results["languages"]
    per_lang = {
        key: {lang: rows[lang][column] for lang in CVIL_LANGUAGES}
        for key, column in (
            ("student_acc", "accuracy"),
            ("translate_test_acc", "translate_test_accuracy"),
            ("untrained_student_acc", "untrained_student_accuracy"),
            ("student_relative_to_teacher_en", "relative_to_teacher_en"),
        )
    }
    return {
        "teacher_en_acc": rows["en"]["teacher_accuracy"],
        **per_lang,
        "object_tags": results["object_tags"],
        "test_questions_per_language": rows["en"]["examples"],
        "train_questions": cfg.data.train_examples,
        "teacher_steps": cfg.teacher_finetune.steps,
        "distill_steps": cfg.distill.steps,
        "distill_trained_params": results["stages"]["distill"]["trained_params"],
        "student_params": results["total_params"],
        "cpu_s": round(time.process_time() - start_cpu, 1),
        "wall_s": round(time.monotonic() - start_wall, 1),
        "overrides": list(overrides),
    }


def cvil_results_line(entry: dict) -> str:
    student = ", ".join(
        f"{lang} {entry['student_acc'][lang]:.2f} (translate-test {entry['translate_test_acc'][lang]:.2f}, "
        f"untrained {entry['untrained_student_acc'][lang]:.2f})"
        for lang in CVIL_LANGUAGES
    )
    tags = "with" if entry["object_tags"] else "without"
    return (
        f"- cViL on easy-VQA ({time.strftime('%Y-%m-%d')}, CPU, 1 thread, {tags} object tags; "
        f"{entry['train_questions']} training questions, {entry['test_questions_per_language']} test questions "
        f"per language): English teacher {entry['teacher_en_acc']:.2f}%, students {student}; "
        f"{entry['cpu_s'] / 60:.1f} CPU-min; `python benchmarks/bench_easy_vqa.py --cvil`\n"
    )


def record_cvil(args) -> int:
    entry = cvil_easy_vqa(Path(args.output_dir) / "cvil", args.overrides)
    print(json.dumps(entry, indent=2))
    if not args.no_record:
        out = REPO / "benchmarks" / "results" / "recipes.json"
        results = json.loads(out.read_text()) if out.exists() else {}
        results["cvil_easy_vqa"] = entry
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        append_to_section(REPO / "benchmarks" / "RESULTS.md", CVIL_SECTION, cvil_results_line(entry))
    return 0


if __name__ == "__main__":
    sys.exit(main())
