"""``cclm evaluate``: ``cclm evaluate retrieval CONFIG checkpoint=DIR [languages=[de,fr]] [key=value ...]`` runs
zero-shot retrieval on one benchmark, language by language, prints a table and writes
``<output_dir>/<name>.json`` and ``.csv``. Any other first argument is a fine-tuning config, handled by
:func:`cclm.tasks.cli.evaluate_main`.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import MISSING

from cclm.config import ConfigError, EvalConfig, load_config, require
from cclm.evaluation.datasets import (
    RetrievalDataConfig,
    available_languages,
    load_retrieval_set,
    write_results,
)
from cclm.evaluation.retrieval import dist_info
from cclm.evaluation.run import evaluate_folds, mean_over_languages

logger = logging.getLogger(__name__)

USAGE = """usage: cclm evaluate retrieval CONFIG checkpoint=MODEL_DIR [languages=[de,fr]] [key=value ...]
       cclm evaluate FINETUNE_CONFIG checkpoint=... (IGLUE tasks, see `cclm finetune`)

CONFIG: a retrieval benchmark config (configs/eval/*.yaml). MODEL_DIR: a save_pretrained folder with the
tokenizer files (or set tokenizer=PATH)."""

TABLE_KEYS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")


@dataclass
class RetrievalRunConfig:
    name: str = "retrieval"  # names the results files
    checkpoint: str = MISSING  # model folder (CrossViewModel.save_pretrained)
    tokenizer: str | None = None  # default: the checkpoint folder
    languages: list[str] = field(default_factory=list)  # shortcut for data.languages
    english_name: str = "en"  # excluded from the "mean (non-English)" row
    data: RetrievalDataConfig = field(default_factory=RetrievalDataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    image_size: int = 0  # 0 = the model's training resolution
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    output_dir: str = "results/retrieval"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(name)


def init_distributed_from_env(device: torch.device) -> bool:
    """Under torchrun (WORLD_SIZE > 1) join the process group, so that every rank scores a slice of the queries.
    Returns whether this call created the group (and so should destroy it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def format_table(rows: dict[str, dict[str, float]], keys=TABLE_KEYS) -> str:
    width = max([len("language"), *(len(lang) for lang in rows)])
    lines = [" ".join([f"{'language':<{width}}", *(f"{k:>8}" for k in keys)])]
    for lang, metrics in rows.items():
        lines.append(" ".join([f"{lang:<{width}}", *(f"{metrics[k]:>8.2f}" for k in keys)]))
    return "\n".join(lines)


def evaluate_benchmark(cfg) -> dict[str, dict[str, float]]:
    """Rows {language: metrics} (plus the means) of a :class:`RetrievalRunConfig`; writes the results files."""

    require(cfg, "checkpoint", "data.format", "data.root")
    if cfg.languages:
        cfg.data.languages = list(cfg.languages)
    # Read every language's annotations first: a missing file or unknown language fails before the model loads.
    sets = {lang: load_retrieval_set(cfg.data, lang, cfg.name) for lang in available_languages(cfg.data)}
    device = resolve_device(cfg.device)
    created_group = init_distributed_from_env(device)
    try:
        return _evaluate_sets(cfg, sets, device)
    finally:
        if created_group:
            dist.destroy_process_group()


def _evaluate_sets(cfg, sets, device) -> dict[str, dict[str, float]]:
    from cclm.data.tokenize import load_tokenizer
    from cclm.model import CrossViewModel

    model = CrossViewModel.from_pretrained(cfg.checkpoint, device=device).eval()
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.checkpoint)
    image_size = cfg.image_size or int(model.cfg.vision.image_size)
    rows: dict[str, dict[str, float]] = {}
    for lang, retrieval_set in sets.items():
        logger.info(
            "%s/%s: %d images, %d captions",
            cfg.name,
            lang,
            len(retrieval_set.images),
            len(retrieval_set.texts),
        )
        rows[lang] = evaluate_folds(
            model, retrieval_set, cfg.data.folds, tokenizer, cfg.eval, image_size, device
        )
    if len(rows) > 1:
        rows["mean"] = mean_over_languages(rows)
        non_english = mean_over_languages(rows, exclude=(cfg.english_name, "mean"))
        if non_english and cfg.english_name in rows:
            rows["mean (non-English)"] = non_english
    if dist_info()[0] == 0:
        json_path, csv_path = write_results(rows, cfg.output_dir, cfg.name)
        print(format_table(rows))
        print(f"wrote {json_path} and {csv_path}")
    return rows


def _list_override(item: str) -> str:
    """Accept ``languages=de,fr`` as well as ``languages=[de,fr]``."""
    key, sep, value = item.partition("=")
    if sep and key in ("languages", "data.languages") and not value.startswith("["):
        return f"{key}=[{value}]"
    return item


def main(argv: list[str]) -> int:
    args = list(argv[1:]) if argv and argv[0] == "evaluate" else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if args[0] != "retrieval":
        from cclm.tasks.cli import evaluate_main

        return int(evaluate_main(["evaluate", *args]) or 0)
    if len(args) < 2 or "=" in args[1]:
        print(f"cclm evaluate retrieval: a config file is needed\n\n{USAGE}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(RetrievalRunConfig, Path(args[1]), [_list_override(a) for a in args[2:]])
        evaluate_benchmark(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"cclm evaluate retrieval: {err}", file=sys.stderr)
        return 2
    return 0
