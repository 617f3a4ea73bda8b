"""``cclm recipe english-clip CONFIG``: the English CLIP that an MLA config starts from, when no released CLIP fits
(the synthetic world: its images are 32 px shapes). The CLIP of ``clip.model_cfg`` is fitted from scratch on the
English captions of ``data.image_caption`` (``english_clip.*``: steps, lr, batch size, weight decay) with the
contrastive loss, and written to ``clip.pretrained``: the same config then runs ``cclm recipe mla``.

A released CLIP (``clip.name`` + a pretrained tag) is already English: this command refuses it.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

from cclm.config import ConfigError, MLARecipeConfig, require, to_dict
from cclm.recipes.clip import ClipContrastive, build_clip, build_clip_tokenizer, text_tower
from cclm.recipes.dual_encoder import dual_encoder_metrics, heldout_sets
from cclm.recipes.runner import apply_threads, check_stage_dirs, recipe_resume, run_stage
from cclm.runtime.env import init_distributed, seed_everything
from cclm.runtime.run_lock import held_until_exit
from cclm.runtime.sources import StageView
from cclm.runtime.stop_signal import holds_stop_signal
from cclm.weights_files import save_module

log = logging.getLogger("cclm.recipes")
STAGE = "english_clip"


def clip_target(cfg: MLARecipeConfig) -> Path:
    """Where the fitted CLIP goes: ``clip.pretrained``, a file path (refused when it exists, unless
    ``overwrite``)."""
    if not cfg.clip.model_cfg:
        raise ConfigError(
            "english-clip fits the CLIP of clip.model_cfg from scratch; this config names a released CLIP "
            f"('{cfg.clip.name}'), which is English already: run `cclm recipe mla` on it directly"
        )
    if not cfg.clip.pretrained:
        raise ConfigError("english-clip writes the fitted CLIP to clip.pretrained: set it to a file path")
    target = Path(cfg.clip.pretrained)
    if target.exists() and not cfg.overwrite:
        raise ConfigError(f"{target} exists (clip.pretrained); remove it or pass overwrite=true")
    return target


@holds_stop_signal
@held_until_exit()  # its stage folders stay locked until it has written into them, then are let go
def run_english_clip(cfg: MLARecipeConfig) -> dict[str, Any]:
    """Fit, save to ``clip.pretrained``, and score English retrieval on ``eval.retrieval``. Returns
    ``{"languages": {"en": metrics}, "trained_params", "total_params", "path", "training"}``."""
    from cclm.data.pipeline import PretrainData
    from cclm.data.tokenize import load_tokenizer

    require(cfg, "embedding.tokenizer")
    recipe_resume(cfg, warn=True)
    check_stage_dirs(cfg, [STAGE])
    target = clip_target(cfg)
    if cfg.data.image_caption is None:
        raise ConfigError("data.image_caption.shards must be set: the English captions to fit the CLIP on")
    apply_threads(int(cfg.threads))
    env = init_distributed()
    seed_everything(cfg.train.seed)
    clip_cfg = copy.deepcopy(cfg.clip)
    clip_cfg.pretrained = None
    clip = build_clip(clip_cfg).to(env.device)
    tower = text_tower(clip)
    tokenize = build_clip_tokenizer(clip_cfg, tower.context_length, tower.token_embedding.num_embeddings)
    module = ClipContrastive(clip, tokenize, ("text", "vision"), train_temperature=True)

    fit = cfg.english_clip
    data_cfg = copy.deepcopy(cfg.data)
    data_cfg.parallel_text = None
    data_cfg.image_caption.languages = [cfg.source_language]
    data_cfg.image_caption.batch_size = int(fit.batch_size)
    size = clip.visual.image_size
    data = PretrainData(
        data_cfg,
        load_tokenizer(cfg.embedding.tokenizer),
        int(cfg.embedding.max_length),
        image_size=int(size[0] if isinstance(size, (tuple, list)) else size),
        rank=env.rank,
        world_size=env.world_size,
        seed=cfg.train.seed,
    )
    source = StageView(data, STAGE, "image")
    try:
        stats = run_stage(
            module,
            cfg,
            STAGE,
            int(fit.steps),
            source,
            int(fit.batch_size),
            env,
            fit.lr,
            {"weight_decay": float(fit.weight_decay)},
        )
    finally:
        source.close()
    clip = module.freeze()
    metrics = english_retrieval(clip, tokenize, cfg, env.device)
    params = sum(p.numel() for p in clip.parameters())
    if env.rank == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        save_module(clip, target)
        summary = {"languages": metrics, "path": str(target), "training": stats, "config": to_dict(cfg)}
        (Path(cfg.output_dir) / STAGE / "results.json").write_text(json.dumps(summary, indent=2))
        log.info("English CLIP written to %s", target)
    return {
        "languages": metrics,
        "trained_params": params,
        "total_params": params,
        "path": str(target),
        "training": stats,
    }


def english_retrieval(clip, tokenize, cfg: MLARecipeConfig, device) -> dict[str, dict[str, float]]:
    """English retrieval of ``clip`` on every ``eval.retrieval`` set (``{}`` when none is configured)."""
    import torch.nn.functional as F

    from cclm.recipes.clip import normalize_images

    if not cfg.eval.retrieval:
        return {}
    sets = heldout_sets(dict(cfg.eval.retrieval), [cfg.source_language])
    size = clip.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    out: dict[str, float] = {}
    for name, by_lang in sets.items():
        metrics = dual_encoder_metrics(
            lambda images: F.normalize(clip.encode_image(normalize_images(images.to(device))), dim=-1),
            lambda texts: F.normalize(clip.encode_text(tokenize(texts).to(device)), dim=-1),
            by_lang[cfg.source_language],
            size,
            cfg.eval.batch_size,
        )
        out.update({(f"{name}/" if len(sets) > 1 else "") + k: v for k, v in metrics.items()})
    return {cfg.source_language: out}
