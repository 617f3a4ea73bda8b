"""``cclm iglue inspect --task TASK FILE...``: one JSON line per annotation file with its counts.
``cclm iglue check-images CONFIG [key=value ...]`` or ``cclm iglue check-images --task TASK --root NAME=DIR FILE...``:
list every missing or undecodable image, before any training starts.
``cclm iglue report RESULTS_DIR... --out DIR``: our results beside the published baselines, one table and chart per
task and protocol (:mod:`cclm.tasks.report`).

Exit status: 0 when all is well; 1 for what a command that ran found: check-images, images missing or
undecodable; inspect, a file read that holds no usable example. 2 for an error, printed as one line
``cclm <command>: <message>`` as every ``cclm`` command prints its errors: a bad config, key or value, an
annotation file missing or unreadable, an image folder not given (check-images of a config: also a file with no
usable example, which its run would refuse)."""

from __future__ import annotations

import argparse
import sys
import traceback

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
        except AnnotationError as err:  # missing or unreadable: an error (2), the other files still inspected
            print(f"cclm iglue inspect: {printable(err)}", file=sys.stderr)
            status = 2
            continue
        print(printable_json(counts))
        if not counts["usable"]:  # read, and found to hold nothing a run could use (a run would refuse it)
            print(f"cclm iglue inspect: {printable(path)}: {counts['problem']}", file=sys.stderr)
            status = max(status, 1)
    return status


# How a run reads an annotation file (cclm.tasks.protocols.TaskSuite.read): a training file leaves out its
# examples without a gold class; a dev file (model selection) keeps and scores them, its first
# data.dev_max_examples examples (retrieval: images) only; a test file keeps and scores them all.
TRAIN, DEV, TEST = "train", "dev", "test"
CHECK_COMMAND = "iglue check-images"


def config_reads(cfg, command: str = "finetune") -> list[tuple[str, str]]:
    """The annotation files that ``cclm <command> CONFIG`` reads (``finetune`` or ``evaluate``), each with how
    it reads them (:data:`TRAIN`, :data:`DEV`, :data:`TEST`), as its ``protocol`` does: only the ``languages=``
    given. Zero-shot fine-tuning: ``data.train``, ``data.dev``, ``data.test`` and ``data.translate_test``;
    few-shot: per language of ``data.few_shot_train`` its files (brace patterns expanded), its test file, and its
    selection file (``data.few_shot_dev.<lang>``, else ``data.dev``; its test file with ``train.select_on=test``);
    evaluation: ``data.test`` (``protocol=translate_test``: ``data.translate_test``). A config its run would refuse
    for what it names is refused the same way (:class:`ConfigError`)."""
    from cclm.config import ConfigError, Protocol, SelectOn
    from cclm.tasks.cli import NO_TRANSLATE_TEST_FINETUNING
    from cclm.tasks.few_shot import few_shot_runs
    from cclm.tasks.protocols import select_languages

    select_languages(cfg)
    data, protocol = cfg.data, Protocol(str(cfg.protocol))
    if command == "evaluate":  # cclm.tasks.protocols.evaluate_checkpoint
        if protocol == Protocol.few_shot:
            raise ConfigError(
                "few-shot models are per language: `cclm finetune ... protocol=few_shot` writes that table"
            )
        key = "test" if protocol == Protocol.zero_shot else "translate_test"
        files = getattr(data, key)
        if not files:
            raise ConfigError(f"config key 'data.{key}' lists no files to evaluate")
        reads = [(path, TEST) for path in files.values()]
    elif protocol == Protocol.zero_shot:  # cclm.tasks.protocols.run_zero_shot
        reads = [
            *((path, TRAIN) for path in data.train),
            *((path, DEV) for path in data.dev),
            *((path, TEST) for path in [*data.test.values(), *data.translate_test.values()]),
        ]
    elif protocol == Protocol.few_shot:  # cclm.tasks.few_shot.run_few_shot
        on_test = SelectOn(str(cfg.train.select_on)) == SelectOn.test
        reads = []
        for run in few_shot_runs(data):
            if run.language not in data.test:
                raise ConfigError(f"few-shot language '{run.language}' has no test file in data.test")
            reads += [(run.train_path, TRAIN), (data.test[run.language], TEST)]
            if on_test:  # selected on the test file itself
                continue
            if run.language in data.few_shot_dev:
                reads.append((data.few_shot_dev[run.language], DEV))
            else:
                reads += [(path, DEV) for path in data.dev]
    else:  # `cclm finetune` refuses it
        raise ConfigError(NO_TRANSLATE_TEST_FINETUNING)
    return list(dict.fromkeys((str(path), how) for path, how in reads))


def _files_of_config(cfg, command: str = "finetune") -> list[str]:
    """The annotation files ``cclm <command> CONFIG`` reads (:func:`config_reads`), each once."""
    return list(dict.fromkeys(path for path, _ in config_reads(cfg, command)))


def _report_missing(
    task: str, files: list[str], roots: dict[str, str], read_refs=None, command: str = CHECK_COMMAND
) -> int:
    """Every missing or undecodable image of the readable files, and every annotation file that is missing or
    unreadable (all of them, not the first). Exit status 2 when an annotation file could not be checked (missing,
    unreadable, no usable example) or an image folder is not given, else 1 when images are missing or do not
    decode, else 0. ``read_refs(path)``: the images of a file to check (default: every image it names);
    ``command``: the ``cclm`` command named in the error lines."""
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
        print(f"cclm {command}: {printable(err)}", file=sys.stderr)
        return 2
    missing = sorted(path for path in paths if not path.is_file())
    undecodable = undecodable_images(paths.difference(missing))
    for path in missing:
        print(printable(path))
    for path, reason in undecodable:
        print(f"{printable(path)}\tdoes not decode: {printable(reason)}")
    sys.stdout.flush()
    for err in unreadable:
        print(f"cclm {command}: {printable(err)}", file=sys.stderr)
    summary = f"{len(paths) - len(missing)} of {len(paths)} images found, {len(missing)} missing"
    if undecodable:
        summary += f", {len(undecodable)} do not decode"
    if unreadable:
        summary += f"; {len(unreadable)} of {len(files)} annotation files missing or unreadable"
    print(summary, file=sys.stderr)
    if unreadable:
        return 2
    return 1 if missing or undecodable else 0


def check_config_images(args: list[str], command: str = CHECK_COMMAND) -> int:
    """Missing or undecodable images of the files a fine-tuning config's run reads (``CONFIG [key=value ...]``):
    the examples it uses (:func:`config_reads`, ``data.max_examples``, ``data.dev_max_examples``). ``command``:
    ``finetune`` or ``evaluate`` (``--check-images``: what that run reads), or ``iglue check-images`` (what
    ``cclm finetune`` reads; ``protocol=translate_test``: what ``cclm evaluate`` reads), named in the error line
    of a bad config (exit status 2)."""
    import torch

    from cclm.cli_args import USER_ERRORS, debugging, describe
    from cclm.config import FinetuneConfig, Protocol, load_config, require
    from cclm.runtime.env import DistEnv
    from cclm.tasks.protocols import TaskSuite

    if not args or args[0].startswith("-") or "=" in args[0]:
        flag = "" if command == CHECK_COMMAND else " --check-images"
        print(f"usage: cclm {command} CONFIG{flag} [key=value ...]", file=sys.stderr)
        return 2
    try:
        cfg = load_config(FinetuneConfig, args[0], args[1:])
        require(cfg, "task")
        run = command if command in ("finetune", "evaluate") else "finetune"
        if command == CHECK_COMMAND and str(cfg.protocol) == Protocol.translate_test.value:
            run = "evaluate"
        reads = config_reads(cfg, run)
        # reads as the run does, on no device (nothing is scored)
        suite = TaskSuite(cfg.task, cfg.data, env=DistEnv(0, 1, 0, torch.device("cpu")))
        suite.label_names()
    except USER_ERRORS as err:
        if debugging():
            traceback.print_exc()
        print(f"cclm {command}: {printable(describe(err))}", file=sys.stderr)
        return 2
    ways = {}
    for path, how in reads:
        ways.setdefault(path, []).append(how)

    def read_refs(path: str):
        refs = set()
        for how in ways[path]:
            data = suite.read(path, scored=how != TRAIN)
            if how == DEV:
                data = data.truncated(cfg.data.dev_max_examples)
            refs |= data.used_image_refs
        return refs

    return _report_missing(cfg.task, list(ways), dict(cfg.data.image_roots), read_refs, command)


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
