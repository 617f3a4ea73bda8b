"""``cclm evaluate retrieval CONFIG checkpoint=DIR [languages=[de,fr]] [key=value ...]`` runs zero-shot retrieval
on one benchmark, language by language, prints a table and writes ``<output_dir>/<name>.json`` and ``.csv``. Under
torchrun every rank scores a slice of the queries. (``cclm evaluate`` of a fine-tuning config is routed to the
tasks by :mod:`cclm.cli`.)
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from omegaconf import OmegaConf

from cclm.config import RetrievalRunConfig, load_config, require
from cclm.evaluation.datasets import available_languages, load_retrieval_set, require_image_files
from cclm.evaluation.results import mean_over_languages, write_results
from cclm.evaluation.run import evaluate_folds
from cclm.runtime.env import dist_info, join_launched_group, leave_group, resolve_device

logger = logging.getLogger(__name__)

USAGE = """usage: cclm evaluate retrieval CONFIG checkpoint=MODEL_DIR [languages=[de,fr]] [key=value ...]

CONFIG: a retrieval benchmark config (configs/eval/*.yaml). MODEL_DIR: a save_pretrained folder with the
tokenizer files (or set tokenizer=PATH)."""

TABLE_KEYS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")


def format_table(rows: dict[str, dict[str, float]], keys=TABLE_KEYS) -> str:
    width = max([len("language"), *(len(lang) for lang in rows)])
    lines = [" ".join([f"{'language':<{width}}", *(f"{k:>8}" for k in keys)])]
    for lang, metrics in rows.items():
        lines.append(" ".join([f"{lang:<{width}}", *(f"{metrics[k]:>8.2f}" for k in keys)]))
    return "\n".join(lines)


def evaluate_benchmark(cfg: RetrievalRunConfig) -> dict[str, dict[str, float]]:
    """Rows {language: metrics} (plus the means) of a :class:`RetrievalRunConfig`; writes the results files."""

    require(cfg, "checkpoint", "data.format", "data.root")
    data = OmegaConf.merge(cfg.data, {"languages": list(cfg.languages)}) if cfg.languages else cfg.data
    # Read every language's annotations first: a missing file or unknown language fails before the model loads.
    sets = {lang: load_retrieval_set(data, lang, cfg.name) for lang in available_languages(data)}
    require_image_files(sets.values())  # every missing image in one error, before the model loads
    device = resolve_device(cfg.device)
    created_group = join_launched_group(device)
    try:
        return _evaluate_sets(cfg, sets, device)
    finally:
        if created_group:
            leave_group()


def _evaluate_sets(cfg: RetrievalRunConfig, sets, device) -> dict[str, dict[str, float]]:
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
        write_results(cfg.output_dir, cfg.name, rows)
        print(format_table(rows))
        print(f"wrote {Path(cfg.output_dir) / cfg.name}.json, .csv and .md")
    return rows


def main(argv: list[str]) -> int:
    """``argv``: ``["evaluate", "retrieval", CONFIG, key=value, ...]`` as routed by :mod:`cclm.cli`."""
    args = list(argv[1:]) if argv and argv[0] == "evaluate" else list(argv)
    if args[:1] == ["retrieval"]:
        args = args[1:]
    if args[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    if not args or "=" in args[0]:
        print(f"cclm evaluate retrieval: a config file is needed\n\n{USAGE}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(RetrievalRunConfig, Path(args[0]), args[1:])
    evaluate_benchmark(cfg)
    return 0
