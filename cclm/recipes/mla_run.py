"""``cclm recipe mla``: build the frozen CLIP + acquirers, check the data covers every new language, run the
acquisition stages (NLT on parallel text, LE on new-language captions) and, with ``finetune.data``, the paper's
downstream stages (``finetune_en``: the CLIP on English retrieval captions; ``finetune_all``: the acquirers on every
new language's captions over that CLIP), evaluate retrieval in every language after each phase, and write
``results.json`` plus the trained weights (``acquired.safetensors`` without the CLIP, and the English-fine-tuned
CLIP as ``clip_finetuned_en.safetensors`` when that stage ran).

Every stage counts the samples it trained on per language (``samples_per_language`` in results.json); NLT leaves
out the parallel pairs without a source-language side (a multi-way corpus's de-ja pairs), counted as the skip
reason ``no_source_side``."""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from cclm.config import ConfigError, DataConfig, MLARecipeConfig, StreamConfig, require, to_dict
from cclm.data.shards import expand_shards, manifest_languages
from cclm.errors import UserError
from cclm.recipes.clip import ClipContrastive
from cclm.recipes.dual_encoder import dual_encoder_metrics, heldout_sets
from cclm.recipes.mla import MLAModel
from cclm.recipes.runner import (
    RESULT_FILES,
    StageChain,
    TrainedParams,
    apply_threads,
    check_stage_dirs,
    move_aside,
    move_old_run,
    recipe_resume,
    run_stage,
    write_recipe_results,
)
from cclm.runtime.env import DistEnv, barrier, init_distributed, seed_everything
from cclm.runtime.run_lock import held_until_exit
from cclm.runtime.sources import StageView
from cclm.runtime.stop_signal import holds_stop_signal
from cclm.weights_files import save_module, save_tensors

log = logging.getLogger("cclm.recipes")
ACQUIRED_WEIGHTS = "acquired.safetensors"
FINETUNED_CLIP = "clip_finetuned_en.safetensors"
TOKENIZER_DIR = "tokenizer"
# Every stage the recipe has, in order (a config trains NLT, LE and those of the downstream ones with steps).
KNOWN_STAGES = ("nlt", "le", "finetune_en", "finetune_all")
# What a run writes next to its stage folders (overwrite=true moves them aside with the old run).
ARTIFACTS = (*RESULT_FILES, ACQUIRED_WEIGHTS, FINETUNED_CLIP, TOKENIZER_DIR, "config.json")
NO_SOURCE_SIDE = "no_source_side"  # the skip reason of a parallel pair without a source-language side
EMPTY_BATCHES = 100  # NLT batches in a row without one usable pair before the stage is refused


def check_language_data(stream_cfg, languages: list[str], key: str, what: str) -> bool:
    """Fail early, naming the language, when the shards' manifest shows no data for it. Returns whether there
    was a manifest to check (without one, the stage checks its per-language sample counts at its end)."""
    if stream_cfg is None:
        raise ConfigError(f"{key}.shards must be set: {what} for {languages}")
    counts = manifest_languages(expand_shards(stream_cfg.shards))
    if counts is None:
        log.warning(
            "%s: no manifest.json to check the languages against; the stage checks at its end that every "
            "language had samples",
            key,
        )
        return False
    missing = [lang for lang in languages if not counts.get(lang)]
    if missing:
        raise ConfigError(
            f"{key}: no {what} for language(s) {missing} (the shards have {sorted(counts)}); add data or drop "
            "them from 'languages'"
        )
    return True


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
    languages: list[str] = field(default_factory=list)  # the languages it teaches (finetune_en: the source)
    checked: bool = True  # its languages were checked against the shards' manifest before training


class LanguageCounts:
    """A stage's batches (a :class:`StageView` of ``view``) with the samples counted per language: a caption's
    language, a parallel pair's non-source side. A parallel pair without a ``source`` side (de-ja in a multi-way
    corpus) is left out of its batch and counted as the skip reason ``no_source_side``; a batch left with no pair
    is replaced by the next one (:data:`EMPTY_BATCHES` such batches in a row: the stage is refused). The counts
    are part of the data state, so a resumed stage goes on counting."""

    STATE_KEY = "mla_language_counts"

    def __init__(self, source: StageView, source_language: str):
        self.view, self.source_language = source, source_language
        self.views = source.views
        self.counts: dict[str, int] = {}
        self.left_out: dict[str, int] = {}  # "de-ja" -> pairs of those languages left out (no source side)
        self.complete = True  # False: resumed from a checkpoint written without counts

    def view_for_step(self, step: int) -> str:
        return self.view.view_for_step(step)

    def next_batch(self, view: str | None = None) -> dict[str, Any]:
        dropped = 0
        for _ in range(EMPTY_BATCHES):
            batch = self.view.next_batch(view)
            if self.view.view == "text":
                batch, langs, left_out = self._with_source_side(batch)
                dropped += left_out
                if batch is None:
                    continue
            else:
                langs = list(batch["langs"])
            for lang in langs:
                self.counts[lang] = self.counts.get(lang, 0) + 1
            return batch
        raise UserError(
            f"stage {self.view.name}: {EMPTY_BATCHES} batches in a row ({dropped} parallel pairs) held no pair "
            f"with a '{self.source_language}' side; NLT learns from {self.source_language} <-> new-language pairs: "
            "add such pairs to data.parallel_text"
        )

    def _with_source_side(self, batch: dict[str, Any]) -> tuple[dict[str, Any] | None, list[str], int]:
        """(the batch without its pairs that have no source side, or None when none is left; the target language
        of each pair kept; how many were left out)."""
        src = self.source_language
        pairs = list(zip(batch["langs"], batch["other_langs"]))
        keep = [i for i, (a, b) in enumerate(pairs) if src in (a, b)]
        langs = [b if a == src else a for a, b in (pairs[i] for i in keep)]
        left_out = len(pairs) - len(keep)
        for a, b in pairs:
            if src not in (a, b):
                kind = "-".join(sorted((str(a), str(b))))
                self.left_out[kind] = self.left_out.get(kind, 0) + 1
        if not left_out:
            return batch, langs, 0
        if not keep:
            return None, [], left_out
        return _select_rows(batch, keep, len(pairs)), langs, left_out

    @property
    def no_source_side(self) -> int:
        return sum(self.left_out.values())

    def state_dict(self) -> Any:
        state = self.view.state_dict()
        counts = {"languages": dict(self.counts), NO_SOURCE_SIDE: dict(self.left_out)}
        return {**state, self.STATE_KEY: counts} if isinstance(state, dict) else state

    def load_state_dict(self, state: Any) -> None:
        counts = None
        if isinstance(state, dict) and self.STATE_KEY in state:
            state = dict(state)
            counts = state.pop(self.STATE_KEY)
        self.view.load_state_dict(state)
        self.counts = {str(k): int(v) for k, v in (counts or {}).get("languages", {}).items()}
        self.left_out = {str(k): int(v) for k, v in (counts or {}).get(NO_SOURCE_SIDE, {}).items()}
        self.complete = counts is not None

    def skip_counts(self) -> dict[str, int]:
        skips = dict(self.view.skip_counts())
        if self.no_source_side:
            skips[NO_SOURCE_SIDE] = skips.get(NO_SOURCE_SIDE, 0) + self.no_source_side
        return skips

    def totals(self) -> tuple[dict[str, int], dict[str, int]]:
        """(samples per language, pairs left out for want of a source side per language pair "de-ja"), summed
        over the ranks."""
        mine = {"languages": dict(self.counts), NO_SOURCE_SIDE: dict(self.left_out)}
        everyone = [mine]
        if dist.is_initialized() and dist.get_world_size() > 1:
            everyone = [{}] * dist.get_world_size()
            dist.all_gather_object(everyone, mine)
        counts: dict[str, int] = {}
        left_out: dict[str, int] = {}
        for part in everyone:
            for lang, n in part["languages"].items():
                counts[lang] = counts.get(lang, 0) + int(n)
            for kind, n in part[NO_SOURCE_SIDE].items():
                left_out[kind] = left_out.get(kind, 0) + int(n)
        return dict(sorted(counts.items())), dict(sorted(left_out.items()))

    def close(self) -> None:
        self.view.close()


def _select_rows(batch: dict[str, Any], keep: list[int], rows: int) -> dict[str, Any]:
    """``batch`` with only the rows ``keep`` of every per-sample tensor and list."""
    index = torch.tensor(keep, dtype=torch.long)
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if torch.is_tensor(value) and value.ndim and value.shape[0] == rows:
            out[key] = value.index_select(0, index)
        elif isinstance(value, (list, tuple)) and len(value) == rows:
            out[key] = [value[i] for i in keep]
        else:
            out[key] = value
    return out


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
    nlt_checked = check_language_data(
        cfg.data.parallel_text, languages, "data.parallel_text", "parallel sentences (stage 1)"
    )
    le_checked = check_language_data(
        cfg.data.image_caption, languages, "data.image_caption", "captions (stage 2)"
    )
    stages = [
        Stage(
            "nlt",
            "text",
            stage_data_cfg(cfg, "text", languages),
            cfg.nlt,
            cfg.data.parallel_text.batch_size,
            languages,
            nlt_checked,
        ),
        Stage(
            "le",
            "image",
            stage_data_cfg(cfg, "image", languages),
            cfg.le,
            cfg.data.image_caption.batch_size,
            languages,
            le_checked,
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
        checked = check_language_data(tuning.data, langs, "finetune.data", "retrieval captions")
        data = stage_data_cfg(cfg, "image", langs, tuning.data)
        stages.append(Stage(name, "image", data, settings, tuning.data.batch_size, langs, checked))
    return stages


@holds_stop_signal
@held_until_exit()  # its stage folders stay locked until it has written into them, then are let go
def run_mla(cfg: MLARecipeConfig, model: MLAModel | None = None) -> dict[str, Any]:
    """Run every stage; ``model`` (default: built from ``cfg``) is trained in place (its CLIP too, by
    ``finetune_en``). ``trained_params`` of the results: every parameter some stage trained, counted once (the
    embedding and acquirers, and the CLIP towers when ``finetune_en`` ran); each stage's own count is
    ``training.<stage>/trained_params``."""
    require(cfg, "languages", "embedding.tokenizer")
    recipe_resume(cfg, warn=True)
    apply_threads(int(cfg.threads))
    stages = plan_stages(cfg)
    planned = [stage.name for stage in stages]
    check_stage_dirs(cfg, list(KNOWN_STAGES))  # every stage folder: an old run's unplanned ones too
    env = init_distributed()
    seed_everything(cfg.train.seed)
    model = model if model is not None else MLAModel.build(cfg)
    acquiring, total = model.trainable_parameter_count()
    log.info(
        "MLA: acquisition trains %d of %d parameters (%.2f%%)", acquiring, total, 100.0 * acquiring / total
    )
    eval_langs = [cfg.source_language, *cfg.languages]
    sets = heldout_sets(dict(cfg.eval.retrieval), eval_langs) if cfg.eval.retrieval else {}
    out_dir = Path(cfg.output_dir)
    move_old_run(cfg, list(KNOWN_STAGES), list(ARTIFACTS))
    if env.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if "finetune_en" not in planned:  # a CLIP fine-tuned by an older run does not go with these acquirers
            move_aside(out_dir, [FINETUNED_CLIP], "this run has no English fine-tuning (finetune_en)")
        (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    barrier()
    model.to(env.device)

    def evaluate() -> dict[str, dict]:
        return retrieval_by_language(model, sets, cfg.eval.batch_size, env.device) if sets else {}

    phases = {"before": evaluate()}
    stats: dict[str, float] = {}
    samples: dict[str, dict[str, int]] = {}
    chain, trained = StageChain(cfg, list(KNOWN_STAGES), planned), TrainedParams()
    for stage in stages:
        if stage.name == "finetune_en":  # the CLIP itself trains: a module that holds it as a sub-module
            module = ClipContrastive(model.clip, model.clip_tokenize, stage.settings.trainable)
        else:
            model.set_stage(stage.name)
            module = model
        try:
            stage_stats, samples[stage.name] = _train(module, cfg, stage, model, env, chain, trained)
            stats.update(stage_stats)
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
        "samples_per_language": samples,
        "source_language": cfg.source_language,
    }
    if env.rank == 0:
        save_tensors(model.acquired_state_dict(), out_dir / ACQUIRED_WEIGHTS)
        model.tokenizer.save_pretrained(str(out_dir / TOKENIZER_DIR))
        if "finetune_en" in phases:
            save_module(model.clip, out_dir / FINETUNED_CLIP)
        write_recipe_results(out_dir, after, trained.count, total, extra)
    return {"languages": after, "trained_params": trained.count, "total_params": total, **extra}


def _train(
    module,
    cfg: MLARecipeConfig,
    stage: Stage,
    mla: MLAModel,
    env: DistEnv,
    chain: StageChain | None = None,
    trained: TrainedParams | None = None,
) -> tuple[dict[str, float], dict[str, int]]:
    """``stage`` of ``module`` over a :class:`PretrainData` view of its data (tokenised with the MLA model's
    multilingual tokenizer, at the CLIP's image size). Returns its stats and its samples per language; a language
    of the stage without a sample is an error when no manifest vouched for its data, else a warning."""
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
    source = LanguageCounts(StageView(data, stage.name, stage.view), cfg.source_language)
    try:
        steps, batch = int(stage.settings.steps), int(stage.batch_size)
        stats = run_stage(
            module, cfg, stage.name, steps, source, batch, env, stage.settings.lr, None, chain, trained
        )
        counts, left_out = source.totals()
    finally:
        source.close()
    if left_out:
        stats[f"{stage.name}/skipped/{NO_SOURCE_SIDE}"] = sum(left_out.values())
        log.warning(
            "stage %s: %d parallel pairs without a '%s' side were left out (skip reason %s; by pair: %s): NLT "
            "learns from %s <-> new-language pairs only",
            stage.name,
            sum(left_out.values()),
            cfg.source_language,
            NO_SOURCE_SIDE,
            left_out,
            cfg.source_language,
        )
    check_language_counts(stage, counts, source.complete)
    return stats, counts


def check_language_counts(stage: Stage, counts: dict[str, int], complete: bool = True) -> None:
    """At a stage's end: every language it teaches had samples. Without a manifest (nothing vouched for the data
    before training) a language without one is an error; with one (the data exist, the stage drew none of them
    in its steps) a warning. ``complete=False`` (counts that started at a resume): no check."""
    if not complete:
        log.info("stage %s: resumed from a checkpoint without sample counts; not checking them", stage.name)
        return
    missing = [lang for lang in stage.languages if not counts.get(lang)]
    if not missing:
        return
    if not stage.checked:
        raise UserError(
            f"stage {stage.name}: no sample of language(s) {missing} in {int(stage.settings.steps)} steps "
            f"(samples per language: {counts}); its shards have no manifest.json to check them against before "
            "training: add data for them, or drop them from 'languages'"
        )
    log.warning(
        "stage %s: NO sample of language(s) %s in %d steps (samples per language: %s), though the shards' "
        "manifest lists them: train longer, or weight the data towards them",
        stage.name,
        missing,
        int(stage.settings.steps),
        counts,
    )
