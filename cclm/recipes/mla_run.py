"""``cclm recipe mla``: build the frozen CLIP + acquirers, check the data covers every new language, run the
acquisition stages (NLT on parallel text, LE on new-language captions) and, with ``finetune.data``, the paper's
downstream stages (``finetune_en``: the CLIP on English retrieval captions; ``finetune_all``: the acquirers on every
new language's captions over that CLIP), evaluate retrieval in every language after each phase, and write
``results.json`` plus the trained weights (``acquired.safetensors`` without the CLIP, and the English-fine-tuned
CLIP as ``clip_finetuned_en.safetensors`` when that stage ran)."""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from safetensors.torch import save_file, save_model

from cclm.config import ConfigError, DataConfig, MLARecipeConfig, StreamConfig, require, to_dict
from cclm.data.shards import expand_shards, manifest_languages
from cclm.recipes.clip import ClipContrastive
from cclm.recipes.dual_encoder import dual_encoder_metrics, heldout_sets
from cclm.recipes.mla import MLAModel
from cclm.recipes.runner import (
    apply_threads,
    check_stage_dirs,
    recipe_resume,
    run_stage,
    write_recipe_results,
)
from cclm.runtime.env import DistEnv, init_distributed, seed_everything
from cclm.runtime.sources import StageView
from cclm.runtime.stop_signal import holds_stop_signal

log = logging.getLogger("cclm.recipes")
ACQUIRED_WEIGHTS = "acquired.safetensors"
FINETUNED_CLIP = "clip_finetuned_en.safetensors"


def check_language_data(stream_cfg, languages: list[str], key: str, what: str) -> None:
    """Fail early, naming the language, when the shards' manifest shows no data for it."""
    if stream_cfg is None:
        raise ConfigError(f"{key}.shards must be set: {what} for {languages}")
    counts = manifest_languages(expand_shards(stream_cfg.shards))
    if counts is None:
        log.warning("%s: no manifest.json to check the languages against; trusting the config", key)
        return
    missing = [lang for lang in languages if not counts.get(lang)]
    if missing:
        raise ConfigError(
            f"{key}: no {what} for language(s) {missing} (the shards have {sorted(counts)}); add data or drop "
            "them from 'languages'"
        )


def stage_data_cfg(
    cfg: MLARecipeConfig, view: str, languages: list[str], captions: StreamConfig | None = None
) -> DataConfig:
    """The data config of one stage: only its stream (image view: ``captions``, default
    ``data.image_caption``), filtered to its languages."""
    data = copy.deepcopy(cfg.data)
    if view == "text":
        data.image_caption = None
        data.parallel_text.languages = [cfg.source_language, *languages]
        data.swap_parallel = False
    else:
        data.parallel_text = None
        data.image_caption = copy.deepcopy(captions if captions is not None else cfg.data.image_caption)
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
            log.info("MLA: retrieval on %s/%s (%d images)", name, lang, len(rset.images))
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


@dataclass
class Stage:
    name: str  # nlt | le | finetune_en | finetune_all (also the folder of its logs and checkpoints)
    view: str  # the PretrainData view it draws: "text" (parallel) or "image" (captions)
    data: DataConfig  # only its stream, filtered to its languages
    settings: Any  # its steps / lr config (MLANltConfig, ...)
    batch_size: int


# The evaluation after a stage: its name in results.json "phases" (NLT is scored together with LE).
PHASE_AFTER = {"le": "acquired", "finetune_en": "finetune_en", "finetune_all": "finetune_all"}


def plan_stages(cfg: MLARecipeConfig) -> list[Stage]:
    """The stages that run, in order: NLT and LE always; the downstream ``finetune_en`` / ``finetune_all`` when
    they have steps, on ``finetune.data`` (steps without data is an error; data without steps, a warning). Every
    language a stage needs is checked against its shards' manifest first."""
    languages, source = list(cfg.languages), cfg.source_language
    for key in ("data.parallel_text", "data.image_caption", "finetune.data"):
        if OmegaConf.select(cfg, key) is not None:
            require(cfg, f"{key}.shards")
    check_language_data(
        cfg.data.parallel_text, languages, "data.parallel_text", "parallel sentences (stage 1)"
    )
    check_language_data(cfg.data.image_caption, languages, "data.image_caption", "captions (stage 2)")
    stages = [
        Stage(
            "nlt", "text", stage_data_cfg(cfg, "text", languages), cfg.nlt, cfg.data.parallel_text.batch_size
        ),
        Stage(
            "le", "image", stage_data_cfg(cfg, "image", languages), cfg.le, cfg.data.image_caption.batch_size
        ),
    ]
    tuning = cfg.finetune
    wanted = [
        (name, s) for name, s in (("finetune_en", tuning.en), ("finetune_all", tuning.all)) if s.steps > 0
    ]
    if tuning.data is None:
        if wanted:
            names = [name for name, _ in wanted]
            raise ConfigError(f"{names} have steps but finetune.data (retrieval captions) is not set")
        log.info("MLA: downstream fine-tuning off (finetune.data not set)")
    elif not wanted:
        log.warning("MLA: finetune.data is set but finetune.en.steps and finetune.all.steps are 0")
    for name, settings in wanted:
        langs = [source] if name == "finetune_en" else languages
        check_language_data(tuning.data, langs, "finetune.data", "retrieval captions")
        data = stage_data_cfg(cfg, "image", langs, tuning.data)
        stages.append(Stage(name, "image", data, settings, tuning.data.batch_size))
    return stages


@holds_stop_signal
def run_mla(cfg: MLARecipeConfig, model: MLAModel | None = None) -> dict[str, Any]:
    """Run every stage; ``model`` (default: built from ``cfg``) is trained in place (its CLIP too, by
    ``finetune_en``)."""
    require(cfg, "languages", "embedding.tokenizer")
    recipe_resume(cfg, warn=True)
    apply_threads(int(cfg.threads))
    stages = plan_stages(cfg)
    check_stage_dirs(cfg, [stage.name for stage in stages])
    env = init_distributed()
    seed_everything(cfg.train.seed)
    model = model if model is not None else MLAModel.build(cfg)
    trained, total = model.trainable_parameter_count()
    log.info("MLA: training %d of %d parameters (%.2f%%)", trained, total, 100.0 * trained / total)
    eval_langs = [cfg.source_language, *cfg.languages]
    sets = heldout_sets(dict(cfg.eval.retrieval), eval_langs) if cfg.eval.retrieval else {}
    out_dir = Path(cfg.output_dir)
    if env.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    model.to(env.device)

    def evaluate() -> dict[str, dict]:
        return retrieval_by_language(model, sets, cfg.eval.batch_size, env.device) if sets else {}

    phases = {"before": evaluate()}
    stats: dict[str, float] = {}
    for stage in stages:
        if stage.name == "finetune_en":  # the CLIP itself trains: a module that holds it as a sub-module
            module = ClipContrastive(model.clip, model.clip_tokenize, stage.settings.trainable)
        else:
            model.set_stage(stage.name)
            module = model
        try:
            stats.update(_train(module, cfg, stage, model, env))
        finally:
            if isinstance(module, ClipContrastive):
                module.freeze()
        if stage.name in PHASE_AFTER:
            phases[PHASE_AFTER[stage.name]] = evaluate()

    after = phases[list(phases)[-1]]
    extra = {
        "before": phases["before"],
        "phases": phases,
        "training": stats,
        "source_language": cfg.source_language,
    }
    if env.rank == 0:
        save_file(model.acquired_state_dict(), str(out_dir / ACQUIRED_WEIGHTS))
        model.tokenizer.save_pretrained(str(out_dir / "tokenizer"))
        if "finetune_en" in phases:
            save_model(model.clip, str(out_dir / FINETUNED_CLIP))
        write_recipe_results(out_dir, after, trained, total, extra)
    return {"languages": after, "trained_params": trained, "total_params": total, **extra}


def _train(module, cfg: MLARecipeConfig, stage: Stage, mla: MLAModel, env: DistEnv) -> dict[str, float]:
    """``stage`` of ``module`` over a :class:`PretrainData` view of its data (tokenised with the MLA model's
    multilingual tokenizer, at the CLIP's image size)."""
    from cclm.data.pipeline import PretrainData

    data = PretrainData(
        stage.data,
        mla.tokenizer,
        mla.max_length,
        image_size=mla.image_size,
        rank=env.rank,
        world_size=env.world_size,
        seed=cfg.train.seed,
    )
    source = StageView(data, stage.name, stage.view)
    try:
        steps, batch = int(stage.settings.steps), int(stage.batch_size)
        return run_stage(module, cfg, stage.name, steps, source, batch, env, stage.settings.lr)
    finally:
        source.close()
