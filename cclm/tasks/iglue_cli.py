"""``cclm iglue inspect --task TASK FILE...``: one JSON line per annotation file with its counts.
``cclm iglue check-images CONFIG [key=value ...]`` or ``cclm iglue check-images --task TASK --root NAME=DIR FILE...``:
list every missing image, before any training starts (exit status 1 when some are missing).
``cclm iglue report RESULTS_DIR... --out DIR``: our results beside the published baselines, one table and chart per
task and protocol (:mod:`cclm.tasks.report`)."""

from __future__ import annotations

import argparse
import sys

from cclm.tasks import TASKS, get_task
from cclm.tasks.annotations import AnnotationError
from cclm.tasks.images import ROOT_NAMES, missing_images
from cclm.tasks.task_data import no_usable_example
from cclm.text_safety import printable, printable_json

INSPECTABLE = ("xvnli", "xgqa", "marvl", "xflickrco", "wit")


def inspect_file(task: str, path: str) -> dict:
    """``file``, ``task``, ``examples`` (annotation records: XVNLI/MaRVL/WIT lines, xGQA questions, xFlickr&CO
    captions), ``usable`` (what a run trains or scores on; with none, ``problem`` says why and a run refuses the
    file), ``images`` (distinct images referenced), ``languages``; also records skipped for training."""
    data = get_task(task).read(path)
    counts = {
        "file": str(path),
        "task": task,
        "examples": data.records,
        "usable": data.usable,
        "images": len(data.image_refs),
        "languages": sorted(data.languages),
        "skipped": dict(data.skipped),
    }
    if not data.usable:
        counts["problem"] = no_usable_example(data)
    return counts


def _inspect(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cclm iglue inspect")
    parser.add_argument("--task", required=True, choices=INSPECTABLE)
    parser.add_argument("files", nargs="+")
    opts = parser.parse_args(args)
    status = 0
    for path in opts.files:
        try:
            counts = inspect_file(opts.task, path)
        except AnnotationError as err:
            print(f"cclm iglue inspect: {printable(err)}", file=sys.stderr)
            status = 1
            continue
        print(printable_json(counts))
        if not counts["usable"]:  # a run would refuse it
            print(f"cclm iglue inspect: {printable(path)}: {counts['problem']}", file=sys.stderr)
            status = 1
    return status


def _files_of_config(cfg) -> list[str]:
    """Every annotation file a fine-tuning config names (few-shot brace patterns expanded), each once."""
    from cclm.tasks.protocols import few_shot_files

    data = cfg.data
    files = [
        *data.train,
        *data.dev,
        *data.test.values(),
        *data.translate_test.values(),
        *few_shot_files(data),
        *data.few_shot_dev.values(),
    ]
    return list(dict.fromkeys(str(f) for f in files))


def _report_missing(task: str, files: list[str], roots: dict[str, str]) -> int:
    """Every missing image of the readable files, and every annotation file that is missing or unreadable (all of
    them, not the first): exit status 1 when anything is missing."""
    module = get_task(task)
    refs, unreadable = set(), []
    for path in files:
        try:
            refs |= module.read(path).image_refs
        except AnnotationError as err:
            unreadable.append(err)
    try:
        missing = missing_images(refs, roots)
    except KeyError as err:  # a root the annotations name but no --root / data.image_roots gives
        print(f"cclm iglue check-images: {printable(err.args[0] if err.args else err)}", file=sys.stderr)
        return 2
    for path in missing:
        print(printable(path))
    sys.stdout.flush()
    for err in unreadable:
        print(f"cclm iglue check-images: {printable(err)}", file=sys.stderr)
    summary = f"{len(refs) - len(missing)} of {len(refs)} images found, {len(missing)} missing"
    if unreadable:
        summary += f"; {len(unreadable)} of {len(files)} annotation files missing or unreadable"
    print(summary, file=sys.stderr)
    return 1 if missing or unreadable else 0


def check_config_images(args: list[str]) -> int:
    """Missing images of every file a fine-tuning config names (``CONFIG [key=value ...]``)."""
    from cclm.config import ConfigError, FinetuneConfig, load_config

    try:
        cfg = load_config(FinetuneConfig, args[0], args[1:])
    except ConfigError as err:
        print(f"cclm iglue check-images: {printable(err)}", file=sys.stderr)
        return 1
    return _report_missing(cfg.task, _files_of_config(cfg), dict(cfg.data.image_roots))


def _check_images(args: list[str]) -> int:
    if args and not args[0].startswith("-"):
        return check_config_images(args)
    parser = argparse.ArgumentParser(prog="cclm iglue check-images")
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument(
        "--root",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help=f"image folder by name ({', '.join(ROOT_NAMES)}); repeatable",
    )
    parser.add_argument("files", nargs="+")
    opts = parser.parse_args(args)
    bad = [r for r in opts.root if "=" not in r]
    if bad:
        parser.error(f"--root must look like NAME=DIR, got {bad}")
    unknown = sorted({r.split("=", 1)[0] for r in opts.root} - set(ROOT_NAMES))
    if unknown:
        parser.error(
            f"--root: unknown image folder name(s) {', '.join(unknown)} (known: {', '.join(ROOT_NAMES)})"
        )
    return _report_missing(opts.task, opts.files, dict(r.split("=", 1) for r in opts.root))


def main(argv: list[str]) -> int:
    args = argv[1:] if argv and argv[0] == "iglue" else argv
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    sub, rest = args[0], args[1:]
    if sub == "inspect":
        return _inspect(rest)
    if sub == "check-images":
        return _check_images(rest)
    if sub == "report":
        from cclm.tasks.report import main as report_main

        return report_main(rest)
    print(
        f"cclm iglue: unknown subcommand '{printable(sub)}' (inspect, check-images, report)", file=sys.stderr
    )
    return 2
