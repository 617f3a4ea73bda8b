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
from cclm.errors import DataError, UserError
from cclm.evaluation.datasets import available_languages, load_retrieval_set, require_image_files
from cclm.evaluation.results import mean_over_languages, set_aside, write_results
from cclm.evaluation.retrieval import check_k_test
from cclm.evaluation.run import evaluate_folds
from cclm.jsonl import read_json
from cclm.model.fingerprint import weights_digest
from cclm.runtime.env import dist_info, join_launched_group, leave_group, resolve_device, resolve_precision

logger = logging.getLogger(__name__)

USAGE = """usage: cclm evaluate retrieval CONFIG checkpoint=MODEL_DIR [languages=[de,fr]] [key=value ...]

CONFIG: a retrieval benchmark config (configs/eval/*.yaml). MODEL_DIR: a save_pretrained folder with the
tokenizer files (or set tokenizer=PATH)."""

MEAN_ROWS = ("mean", "mean (non-English)")
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
    check_k_test(cfg.eval.k_test, cfg.eval.rerank)  # before anything is read or embedded
    earlier = earlier_results(cfg)  # before anything is read: results of another model are not replaced
    data = OmegaConf.merge(cfg.data, {"languages": list(cfg.languages)}) if cfg.languages else cfg.data
    # Read every language's annotations first: a missing file or unknown language fails before the model loads.
    sets = {lang: load_retrieval_set(data, lang, cfg.name) for lang in available_languages(data)}
    require_image_files(sets.values())  # every missing image in one error, before the model loads
    device = resolve_device(cfg.device)
    created_group = join_launched_group(device)
    try:
        return _evaluate_sets(cfg, sets, device, earlier)
    finally:
        if created_group:
            leave_group()


def earlier_results(cfg: RetrievalRunConfig) -> dict[str, dict]:
    """The language rows of ``<output_dir>/<name>.json`` that this run's model wrote before (kept beside the
    languages it scores now). Rows of another model are refused, or with ``overwrite=true`` moved aside when the
    new results are written."""
    path = Path(cfg.output_dir) / f"{cfg.name}.json"
    if not path.exists() or not Path(cfg.checkpoint).is_dir():  # a missing model is named when it loads
        return {}
    document = read_json(path)
    if not isinstance(document, dict) or not all(isinstance(row, dict) for row in document.values()):
        raise DataError(
            f"{path}: not a cclm results file ({{language: metrics}}); move it away to write this one"
        )
    rows = {lang: row for lang, row in document.items() if lang not in MEAN_ROWS}
    digest = weights_digest(cfg.checkpoint)
    others = sorted(
        {str(row.get("model", "?")) for row in rows.values() if row.get("model_digest") != digest}
    )
    protocol = scoring_protocol(cfg)
    scored_otherwise = {lang: row for lang, row in rows.items() if row.get("protocol") != protocol}
    if not others and not scored_otherwise:
        return rows
    if cfg.overwrite:
        return {}
    hint = f"set another output_dir or name, or overwrite=true (moves it to {cfg.name}.old-<time>.*)"
    if others:
        raise UserError(f"{path} holds results of another model ({', '.join(others)}): {hint}")
    lang, row = next(iter(scored_otherwise.items()))
    recorded = row.get("protocol")
    differs = (
        ", ".join(f"{k}={recorded.get(k)!r} (now {v!r})" for k, v in protocol.items() if recorded.get(k) != v)
        if isinstance(recorded, dict)
        else "not recorded (an older results file)"
    )
    raise UserError(
        f"{path} holds this model's results of {', '.join(sorted(scored_otherwise))} scored with other settings "
        f"({lang}: {differs}); their means would mix two protocols: {hint}"
    )


def scoring_protocol(cfg: RetrievalRunConfig) -> dict:
    """The settings besides the model that decide a row's numbers, recorded in every row: rows are merged into
    one table (and averaged) only when these are equal. Batch sizes, workers and the device's name do not change
    the numbers; the precision the device resolves ``eval.precision`` to does (bf16 autocast on a GPU), and so do
    the files that choose the images (the benchmark's split); where the data sits (``data.root``) does not."""
    data = cfg.data
    return {
        "rerank": bool(cfg.eval.rerank),
        "k_test": int(cfg.eval.k_test),
        "itc_weight_in_rerank": float(cfg.eval.itc_weight_in_rerank),
        "ties": str(cfg.eval.ties),
        "precision": resolve_precision(resolve_device(cfg.device), cfg.eval.precision).value,
        "image_size": int(cfg.image_size),  # 0: the model's
        "folds": int(data.folds),
        "max_images": int(data.max_images),
        "tokenizer": str(Path(cfg.tokenizer).resolve()) if cfg.tokenizer else None,  # None: the model's
        "format": str(data.format),
        "images_file": data.images_file,
        "split_file": data.split_file,
        "image_template": str(data.image_template),
        "loader": data.loader,
        "options": OmegaConf.to_container(data.options)
        if OmegaConf.is_config(data.options)
        else data.options,
    }


def _with_means(rows: dict[str, dict], metrics: list[str], english: str) -> dict[str, dict]:
    if len(rows) > 1:
        means = {"mean": mean_over_languages(rows, metrics)}
        non_english = mean_over_languages(rows, metrics, exclude=(english,))
        if non_english and english in rows:
            means["mean (non-English)"] = non_english
        rows = {**rows, **means}
    return rows


def _evaluate_sets(
    cfg: RetrievalRunConfig, sets, device, earlier: dict[str, dict]
) -> dict[str, dict[str, float]]:
    from cclm.data.tokenize import load_tokenizer
    from cclm.model import CrossViewModel
    from cclm.model.cross_view import check_tokenizer_fits

    model = CrossViewModel.from_pretrained(cfg.checkpoint, device=device, image_size=cfg.image_size or None)
    model.eval()
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.checkpoint)
    check_tokenizer_fits(model, tokenizer, cfg.checkpoint, cfg.tokenizer or cfg.checkpoint)
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
    metrics = list(next(iter(rows.values()), {}))
    if dist_info()[0] == 0:
        source = {
            "model": str(Path(cfg.checkpoint).resolve()),
            "model_digest": weights_digest(cfg.checkpoint),
            "protocol": scoring_protocol(cfg),
        }
        written = {**earlier, **{lang: {**values, **source} for lang, values in rows.items()}}
        if (
            not earlier and (Path(cfg.output_dir) / f"{cfg.name}.json").exists()
        ):  # another model's, or scored otherwise (overwrite)
            aside = set_aside(cfg.output_dir, cfg.name)
            logger.warning(
                "overwrite=true: results of another model or other settings were moved to %s", aside
            )
        kept = [lang for lang in earlier if lang not in rows]
        if kept:
            logger.info("%s.json keeps this model's earlier results of %s", cfg.name, ", ".join(kept))
        write_results(cfg.output_dir, cfg.name, _with_means(written, metrics, cfg.english_name), metrics)
        print(format_table(_with_means(rows, metrics, cfg.english_name)))
        print(f"wrote {Path(cfg.output_dir) / cfg.name}.json, .csv and .md")
    return _with_means(rows, metrics, cfg.english_name)


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
