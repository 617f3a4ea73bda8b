"""``cclm`` command line: a thin dispatcher. Each command lives in the module that implements it and exposes
``main(argv: list[str]) -> int``; modules are imported only when their command runs, so ``cclm --help`` is fast.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "prep": (
        "data_prep.cli",
        "make WebDataset shards (image-caption, parallel text, synthetic world, tokenizer)",
    ),
    "pretrain": ("cclm.train.cli", "pretrain the cross-view model with DeepSpeed"),
    "export": ("cclm.train.export", "consolidate a DeepSpeed checkpoint into a save_pretrained folder"),
    "plot": ("cclm.train.plot", "render training curves of an output_dir to PNG"),
    "evaluate": ("cclm.evaluation.cli", "evaluate a model (retrieval, IGLUE tasks)"),
    "finetune": ("cclm.tasks.cli", "fine-tune on an IGLUE task or easy-vqa"),
    "iglue": ("cclm.tasks.iglue_cli", "IGLUE utilities (inspect annotation files, check images)"),
    "recipe": ("cclm.recipes.cli", "cheap language extension recipes (mla, cvil)"),
    "index": ("cclm.inference.search", "embed a folder of images into a search index"),
    "search": ("cclm.inference.search", "search an index with a text query in any language"),
    "convert-reference": ("cclm.inference.convert_reference", "convert an official CCLM checkpoint"),
}


def usage() -> str:
    lines = ["usage: cclm COMMAND [args...]", "", "commands:"]
    lines += [f"  {name:<18} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"cclm: unknown command '{command}'\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main([command, *rest]) or 0)


if __name__ == "__main__":
    sys.exit(main())
