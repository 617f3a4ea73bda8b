"""``cclm prep SUBCOMMAND``: make shards and tokenizers. Each subcommand lives in its own module exposing
``add_parser(subparsers)`` and ``run(args) -> int``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback

from cclm.cli_args import debugging
from cclm.errors import UserError
from cclm.text_safety import printable

SUBCOMMANDS = {
    "synthetic": "data_prep.synthetic",
    "tokenizer": "data_prep.tokenizer",
    "image-caption": "data_prep.image_caption",
    "cclm-jsonl": "data_prep.image_caption",
    "rekey-wds": "data_prep.image_caption",
    "parallel-tsv": "data_prep.parallel_text",
    "parallel-moses": "data_prep.parallel_text",
    "parallel-jsonl": "data_prep.parallel_text",
    "cc3m": "data_prep.corpora.web_captions",
    "sbu": "data_prep.corpora.web_captions",
    "uc2": "data_prep.corpora.web_captions",
    "wikimatrix": "data_prep.corpora.parallel_corpora",
    "opus": "data_prep.corpora.parallel_corpora",
    "multi30k": "data_prep.corpora.multi30k",
    "coco": "data_prep.corpora.coco",
    "xtd10": "data_prep.corpora.test_sets",
    "xm3600": "data_prep.corpora.test_sets",
    "coco-regions": "data_prep.regions.coco",
    "vg-regions": "data_prep.regions.vg",
    "translate": "data_prep.translate",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cclm prep", description="Make WebDataset shards and tokenizers.")
    subparsers = parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    subparsers.required = True
    for module_name in dict.fromkeys(SUBCOMMANDS.values()):
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "prep":
        argv = argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return int(args.run(args) or 0)
    except (UserError, OSError, ValueError) as err:  # bad input, or the disk (full, unwritable): one line
        if debugging():
            traceback.print_exc()
        # one line, ``cclm <command>: <message>``, as every cclm command reports a user's error
        print(f"cclm prep {args.subcommand}: {printable(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
