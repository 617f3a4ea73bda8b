"""``cclm recipe mla``: build the frozen CLIP + acquirers, check the data covers every new language, run stage 1
(NLT, parallel text) and stage 2 (LE, new-language captions), evaluate retrieval in every language before and after,
and write ``results.json`` plus the trained weights (``acquired.safetensors``, without the CLIP)."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from cclm.config import ConfigError, DataConfig, MLARecipeConfig, require, to_dict
from cclm.data.shards import expand_shards, read_manifest
from cclm.recipes.dual_encoder import dual_encoder_metrics, heldout_sets
from cclm.recipes.mla import MLAModel
from cclm.recipes.runner import run_stage, write_recipe_results
from cclm.runtime.env import init_distributed, seed_everything
from cclm.runtime.sources import StageView

log = logging.getLogger("cclm.recipes")
ACQUIRED_WEIGHTS = "acquired.safetensors"


def manifest_languages(shards: str) -> dict[str, int] | None:
    """Per-language sample counts from the ``manifest.json`` next to local shards (None when there is none)."""
    folders = {
        str(Path(url).parent)
        for url in expand_shards(shards)
        if "://" not in url and not url.startswith("pipe:")
    }
    counts: dict[str, int] = {}
    for folder in folders:
        try:
            manifest = read_manifest(folder)
        except (FileNotFoundError, ValueError):
            return None
        for lang, n in manifest.get("languages", {}).items():
            counts[lang] = counts.get(lang, 0) + int(n)
    return counts if folders else None


def check_language_data(stream_cfg, languages: list[str], key: str, what: str) -> None:
    """Fail early, naming the language, when the shards' manifest shows no data for it."""
    if stream_cfg is None:
        raise ConfigError(f"{key}.shards must be set: {what} for {languages}")
    counts = manifest_languages(stream_cfg.shards)
    if counts is None:
        log.warning("%s: no manifest.json to check the languages against; trusting the config", key)
        return
    missing = [lang for lang in languages if not counts.get(lang)]
    if missing:
        raise ConfigError(
            f"{key}: no {what} for language(s) {missing} (the shards have {sorted(counts)}); add data or drop "
            "them from 'languages'"
        )


def stage_data_cfg(cfg: MLARecipeConfig, view: str, languages: list[str]) -> DataConfig:
    """The data config of one stage: only its stream, filtered to its languages."""
    data = copy.deepcopy(cfg.data)
    if view == "text":
        data.image_caption = None
        data.parallel_text.languages = [cfg.source_language, *languages]
        data.swap_parallel = False
    else:
        data.parallel_text = None
        data.image_caption.languages = list(languages)
    return data


def retrieval_by_language(
    model: MLAModel, sets: dict[str, dict[str, Any]], batch_size: int, device
) -> dict[str, dict]:
    """language -> metrics (one set) or ``<set>/<metric>`` keys (several sets)."""
    model.eval()
    rows: dict[str, dict[str, float]] = {}
    for name, by_lang in sets.items():
        for lang, rset in by_lang.items():
            metrics = dual_encoder_metrics(
                lambda images: model.encode_image(images.to(device)),
                lambda texts, lang=lang: model.encode_texts(texts, lang, device),
                rset,
                model.image_size,
                batch_size,
            )
            prefix = f"{name}/" if len(sets) > 1 else ""
            rows.setdefault(lang, {}).update({prefix + k: v for k, v in metrics.items()})
    return rows


def run_mla(cfg: MLARecipeConfig, model: MLAModel | None = None) -> dict[str, Any]:
    """Run both stages; ``model`` (default: built from ``cfg``) is trained in place."""
    from cclm.data.pipeline import PretrainData

    require(cfg, "languages", "embedding.tokenizer")
    languages = list(cfg.languages)
    check_language_data(
        cfg.data.parallel_text, languages, "data.parallel_text", "parallel sentences (stage 1)"
    )
    check_language_data(cfg.data.image_caption, languages, "data.image_caption", "captions (stage 2)")
    env = init_distributed()
    seed_everything(cfg.train.seed)
    model = model if model is not None else MLAModel.build(cfg)
    trained, total = model.trainable_parameter_count()
    log.info("MLA: training %d of %d parameters (%.2f%%)", trained, total, 100.0 * trained / total)
    eval_langs = [cfg.source_language, *languages]
    sets = heldout_sets(dict(cfg.eval.retrieval), eval_langs) if cfg.eval.retrieval else {}
    out_dir = Path(cfg.output_dir)
    if env.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    model.to(env.device)
    before = retrieval_by_language(model, sets, cfg.eval.batch_size, env.device) if sets else {}

    stats: dict[str, float] = {}
    for name, view, stage in (("nlt", "text", cfg.nlt), ("le", "image", cfg.le)):
        data = PretrainData(
            stage_data_cfg(cfg, view, languages),
            model.tokenizer,
            model.max_length,
            image_size=model.image_size,
            rank=env.rank,
            world_size=env.world_size,
            seed=cfg.train.seed,
        )
        stream = cfg.data.parallel_text if view == "text" else cfg.data.image_caption
        source = StageView(data, name, view)
        try:
            stats.update(
                run_stage(model, cfg, name, int(stage.steps), source, int(stream.batch_size), env, stage.lr)
            )
        finally:
            source.close()

    after = retrieval_by_language(model, sets, cfg.eval.batch_size, env.device) if sets else {}
    extra = {"before": before, "training": stats, "source_language": cfg.source_language}
    if env.rank == 0:
        save_file(model.acquired_state_dict(), str(out_dir / ACQUIRED_WEIGHTS))
        model.tokenizer.save_pretrained(str(out_dir / "tokenizer"))
        write_recipe_results(out_dir, after, trained, total, extra)
    return {"languages": after, "trained_params": trained, "total_params": total, **extra}
