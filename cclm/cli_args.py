"""Arguments of the config-driven training commands (``cclm pretrain``, ``cclm recipe``): a YAML config,
``key=value`` overrides, and the ``--local_rank`` that the DeepSpeed launcher appends to every process's
arguments (the rank is also in ``LOCAL_RANK``, which is what the runtime reads)."""

from __future__ import annotations

import argparse
import logging


def add_config_arguments(parser: argparse.ArgumentParser, configs: str, example: str) -> None:
    """``configs``: where the user finds configs (e.g. ``configs/pretrain/``); ``example``: one override."""
    parser.add_argument("config", help=f"YAML config (see {configs})")
    parser.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example}")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)


def start_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
