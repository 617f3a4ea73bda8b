"""``cclm`` command line: a thin dispatcher. Each command lives in the module that implements it and exposes
``main(argv: list[str]) -> int`` (or the function named after a colon); modules are imported only when their
command runs, so ``cclm --help`` is fast. Every command runs under :func:`cclm.cli_args.run_command`: a user's error
is one line and exit status 2; ``cclm --debug COMMAND`` (or ``CCLM_DEBUG=1``) shows its traceback too.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from cclm.cli_args import DEBUG_VARIABLE, resolve_model_setting, run_command

COMMANDS: dict[str, tuple[str, str]] = {
    "prep": (
        "data_prep.cli",
        "make WebDataset shards (image-caption, parallel text, synthetic world, tokenizer)",
    ),
    "pretrain": ("cclm.train.cli", "pretrain the cross-view model with DeepSpeed"),
    "export": ("cclm.train.export", "consolidate a DeepSpeed checkpoint into a save_pretrained folder"),
    "plot": ("cclm.train.plot", "render training curves of an output_dir to PNG"),
    "evaluate": ("cclm.cli:evaluate", "evaluate a model (retrieval benchmarks, IGLUE tasks)"),
    "finetune": ("cclm.tasks.cli", "fine-tune on an IGLUE task or easy-vqa"),
    "iglue": ("cclm.tasks.iglue_cli", "IGLUE utilities (inspect annotation files, check images)"),
    "recipe": ("cclm.recipes.cli", "cheap language extension recipes (mla, cvil)"),
    "index": ("cclm.inference.search", "embed a folder of images into a search index"),
    "search": ("cclm.inference.search", "search an index with a text query in any language"),
    "convert-reference": ("cclm.inference.convert_reference", "convert an official CCLM checkpoint"),
    "ground": ("cclm.inference.ground", "find the box a text describes in an image (draws it as a PNG)"),
    "clip-benchmark": (
        "cclm.inference.clip_benchmark",
        "run LAION's CLIP_benchmark with cclm models registered (--model_type cclm)",
    ),
}


def usage() -> str:
    lines = ["usage: cclm [--debug] COMMAND [args...]", "", "commands:"]
    lines += [f"  {name:<18} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += ["", f"--debug (or {DEBUG_VARIABLE}=1): show the traceback of an error too"]
    return "\n".join(lines)


EVALUATE_FORMS = (
    "The first form scores zero-shot retrieval on a benchmark (docs/evaluation.md), the second a fine-tuned IGLUE or\n"
    "easy-VQA task model (docs/iglue.md)."
)


def evaluate(argv: list[str]) -> int:
    """``cclm evaluate`` is two commands: ``retrieval`` benchmarks (:mod:`cclm.evaluation.cli`) and fine-tuning
    configs (:mod:`cclm.tasks.cli`). Routing here keeps evaluation independent of the tasks."""
    args = argv[1:]
    if not args or args[0] in ("-h", "--help"):
        from cclm.evaluation.cli import USAGE as RETRIEVAL_USAGE
        from cclm.tasks.cli import USAGE_EVALUATE as TASK_USAGE

        print(f"{RETRIEVAL_USAGE}\n\n{TASK_USAGE}\n\n{EVALUATE_FORMS}")
        return 0
    if args[0] == "retrieval":
        from cclm.evaluation.cli import main

        argv = [argv[0], *(_resolved_checkpoint(arg) for arg in args)]
    else:
        from cclm.tasks.cli import evaluate_main as main
    return main(argv)


def _resolved_checkpoint(arg: str) -> str:
    """``checkpoint=NAME`` of ``cclm evaluate retrieval`` with NAME a released model's name or ``hf-hub:ORG/NAME``:
    the model folder behind it (downloaded or converted once, :func:`cclm.inference.api.resolve_model_folder`).
    Resolved here because the evaluation sits below the inference layer; folders and other arguments pass as they
    are."""
    key, sep, value = arg.partition("=")
    if key != "checkpoint" or not sep or not value or Path(value).expanduser().is_dir():
        return arg
    from cclm.inference import hub, registry

    if not (hub.is_hub_name(value) or registry.is_pretrained_name(value)):
        return arg
    return f"checkpoint={resolve_model_setting(value, 'checkpoint')}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = argv[:1] == ["--debug"]
    argv = argv[debug:]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"cclm: unknown command '{command}'\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, _, function = COMMANDS[command][0].partition(":")
    run = getattr(importlib.import_module(module_name), function or "main")
    return run_command(command, run, [command, *rest], debug=debug)


if __name__ == "__main__":
    sys.exit(main())
