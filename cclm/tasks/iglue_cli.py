"""``cclm iglue inspect --task TASK FILE...``: one JSON line per annotation file with its counts.
``cclm iglue check-images CONFIG [key=value ...]`` or ``cclm iglue check-images --task TASK --root NAME=DIR FILE...``:
list every missing or undecodable image, before any training starts (exit status 1 when there are some).
``cclm iglue report RESULTS_DIR... --out DIR``: our results beside the published baselines, one table and chart per
task and protocol (:mod:`cclm.tasks.report`)."""

from __future__ import annotations

import argparse
import sys

from cclm.tasks import TASKS, get_task
from cclm.tasks.annotations import AnnotationError
from cclm.tasks.images import ROOT_NAMES, ImageRootMissing, undecodable_images
from cclm.tasks.task_data import no_usable_example
from cclm.text_safety import printable, printable_json

INSPECTABLE = ("xvnli", "xgqa", "marvl", "xflickrco", "wit")


def inspect_file(task: str, path: str) -> dict:
    """``file``, ``task``, ``examples`` (annotation records: XVNLI/MaRVL/WIT lines, xGQA questions, xFlickr&CO
    captions), ``usable`` (what a run trains or scores on; with none, ``problem`` says why and a run refuses the
    file), ``images`` (distinct images referenced), ``languages``; also records skipped, and
    ``no_gold_class``: examples whose gold answer is no class (XVNLI's ``-``; not ``usable``), which a dev or
    test file scores as wrong and training leaves out."""
    data = get_task(task).read(path)
    counts = {
        "file": str(path),
        "task": task,
        "examples": data.records,
        "usable": data.usable,
        "images": len(data.image_refs),
        "languages": sorted(data.languages),
        "skipped": dict(data.skipped),
        "no_gold_class": dict(getattr(data, "no_gold_class", {})),
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
    """Every annotation file a fine-tuning config names (few-shot brace patterns expanded), each once; only the
    ``languages=`` ones when that is set, as a run reads them."""
    from cclm.tasks.few_shot import few_shot_files
    from cclm.tasks.protocols import select_languages

    select_languages(cfg)
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


def _report_missing(task: str, files: list[str], roots: dict[str, str], read_refs=None) -> int:
    """Every missing or undecodable image of the readable files, and every annotation file that is missing or
    unreadable (all of them, not the first): exit status 1 when anything is wrong. ``read_refs(path)``: the
    images of a file to check (default: every image it names)."""
    module = get_task(task)
    read_refs = read_refs or (lambda path: module.read(path).image_refs)
    refs, unreadable = set(), []
    for path in files:
        try:
            refs |= read_refs(path)
        except AnnotationError as err:
            unreadable.append(err)
    try:
        paths = {ref.resolve(roots) for ref in refs}
    except ImageRootMissing as err:  # a root the annotations name but no --root / data.image_roots gives
        print(f"cclm iglue check-images: {printable(err)}", file=sys.stderr)
        return 2
    missing = sorted(path for path in paths if not path.is_file())
    undecodable = undecodable_images(paths.difference(missing))
    for path in missing:
        print(printable(path))
    for path, reason in undecodable:
        print(f"{printable(path)}\tdoes not decode: {printable(reason)}")
    sys.stdout.flush()
    for err in unreadable:
        print(f"cclm iglue check-images: {printable(err)}", file=sys.stderr)
    summary = f"{len(paths) - len(missing)} of {len(paths)} images found, {len(missing)} missing"
    if undecodable:
        summary += f", {len(undecodable)} do not decode"
    if unreadable:
        summary += f"; {len(unreadable)} of {len(files)} annotation files missing or unreadable"
    print(summary, file=sys.stderr)
    return 1 if missing or undecodable or unreadable else 0


def check_config_images(args: list[str]) -> int:
    """Missing or undecodable images of the files a fine-tuning config names (``CONFIG [key=value ...]``): the
    examples a run would use (``languages=``, ``data.max_examples``)."""
    from cclm.config import ConfigError, FinetuneConfig, load_config

    try:
        cfg = load_config(FinetuneConfig, args[0], args[1:])
        files = _files_of_config(cfg)
        module = get_task(cfg.task)
        labels = module.labels(cfg.data) if module.KIND != "retrieval" else None
    except (ConfigError, AnnotationError) as err:
        print(f"cclm iglue check-images: {printable(err)}", file=sys.stderr)
        return 1

    def read_refs(path: str):
        return module.read(path, labels, cfg.data.max_examples).used_image_refs

    return _report_missing(cfg.task, files, dict(cfg.data.image_roots), read_refs)


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
