"""The CCLM reference's NLVR domain pretraining as a step of the fine-tuning protocol (``domain_pretrain`` in a
MaRVL / NLVR2 config with ``head: cclm``): before fine-tuning, the pair model's backbone and doubled fusion layers
learn text assignment (:class:`~cclm.tasks.nlvr_fusion.TextAssignment`) on image-caption shards read by the
pretraining pipeline, on the same trainer as every other workflow. The stage runs at the pretrained model's image
size; the task's classifier is not trained by it.

The trained task model is saved to ``<output_dir>/domain_pretrain/model``; a rerun of the same output folder
(``resume=auto``) loads it instead of training again, provided the settings that shape the stage
(:func:`stage_changes`) are those it was trained with; changed ones are refused, naming them.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from cclm.config import (
    ConfigError,
    FinetuneConfig,
    OptimizerConfig,
    ScheduleName,
    SchedulerConfig,
    to_dict,
)
from cclm.data.normalize import normalizer_for
from cclm.jsonl import read_json
from cclm.runtime.config_changes import config_changes, named
from cclm.runtime.env import DistEnv, barrier
from cclm.runtime.optim import multipliers
from cclm.runtime.trainer import LoopSettings, Trainer
from cclm.tasks.nlvr_fusion import TextAssignment
from cclm.tasks.task_model import TaskModel

log = logging.getLogger(__name__)
STAGE = "domain_pretrain"


def enabled(cfg: FinetuneConfig) -> bool:
    return int(cfg.domain_pretrain.steps) > 0


def check(cfg: FinetuneConfig, kind: str) -> None:
    """Fail before anything runs when the stage is asked for but cannot run."""
    if not enabled(cfg):
        return
    if kind != "pair" or str(cfg.head) != "cclm":
        raise ConfigError(
            f"domain_pretrain.steps={cfg.domain_pretrain.steps}: NLVR domain pretraining trains the doubled "
            f"fusion layers of a pair task with head: cclm (MaRVL, NLVR2); task {cfg.task} has head {cfg.head}"
        )
    if cfg.domain_pretrain.data.image_caption is None:
        raise ConfigError("domain_pretrain.steps > 0 needs domain_pretrain.data.image_caption.shards")
    if reuses_stage(cfg):
        check_reuse(cfg)


def reuses_stage(cfg: FinetuneConfig) -> bool:
    """Whether this run loads the finished stage of its output folder (a rerun with ``resume``)."""
    return bool(cfg.resume) and (Path(cfg.output_dir) / STAGE / "model" / "task.json").is_file()


# The configuration keys (dotted prefixes) whose values shape the stage's trained weights; a finished stage is
# reused only when they are unchanged. Logging, workers and the fine-tuning schedule are not among them.
STAGE_KEYS = (
    "task",
    "pretrained",
    "model",
    "model_overrides",
    "tokenizer",
    "head",
    "head_init",
    "domain_pretrain",
    "train.seed",
    "train.decay_rule",
    "train.weight_decay",
    "train.betas",
    "train.grad_clip",
    "data.hflip_careful",
)
NOT_STAGE_KEYS = ("domain_pretrain.log_every", "domain_pretrain.data.num_workers")


def _is_stage_key(key: str) -> bool:
    def under(prefixes):
        return any(key == p or key.startswith(p + ".") for p in prefixes)

    return under(STAGE_KEYS) and not under(NOT_STAGE_KEYS)


def stage_changes(saved_config: dict, cfg: FinetuneConfig) -> dict[str, list]:
    """The stage-shaping keys whose value in ``cfg`` differs from the stage's saved configuration."""
    changes = config_changes(saved_config, to_dict(cfg))
    return {key: change for key, change in changes.items() if _is_stage_key(key)}


def check_reuse(cfg: FinetuneConfig) -> None:
    """Refuse to reuse the finished stage when ``cfg`` changed a key that shapes it."""
    folder = Path(cfg.output_dir) / STAGE
    config_file = folder / "config.json"
    if config_file.is_file():
        changes = stage_changes(read_json(config_file), cfg)
        if changes:
            raise ConfigError(
                f"resume: the finished NLVR domain-pretraining stage in {folder} was trained with other settings "
                f"({named(changes)}); put back its values, or start anew without resume: overwrite=true moves the "
                "old run aside, or set another output_dir"
            )
    else:
        log.warning("%s is missing: the finished stage in %s is reused unchecked", config_file, folder)


def stage_data(cfg: FinetuneConfig):
    """The stage's data section: ``domain_pretrain.data``, its flips careful only when ``data.hflip_careful`` is
    too. The reference's ``NLVR_pretrain.py`` reads its shards with its pretraining transform, which flips every
    pair: ``data.hflip_careful=false``, the switch for the reference's flips, covers this stage as well."""
    data = cfg.domain_pretrain.data
    if cfg.data.hflip_careful or not data.hflip_careful:
        return data
    data = copy.copy(data)
    data.hflip_careful = False
    return data


def domain_pretrain(
    model: TaskModel, tokenizer, cfg: FinetuneConfig, env: DistEnv, overwrite: bool | None = None
) -> TaskModel:
    """``model`` after the stage (its weights updated), or the stage's saved model when it already ran.
    ``overwrite`` (default ``cfg.overwrite``): whether the stage's trainer may move an old stage aside; the
    zero-shot protocol claims the whole output folder first and passes False."""
    folder = Path(cfg.output_dir) / STAGE
    saved = folder / "model"
    if reuses_stage(cfg):
        check_reuse(cfg)
        log.info("NLVR domain pretraining: loading the finished stage from %s", saved)
        return TaskModel.load(saved, env.device)
    from cclm.data.pipeline import PretrainData

    stage = cfg.domain_pretrain
    backbone = model.backbone
    data = PretrainData(
        stage_data(cfg),
        tokenizer,
        max_length=int(backbone.cfg.text.max_length),
        image_size=int(backbone.cfg.vision.image_size),
        rank=env.rank,
        world_size=env.world_size,
        seed=cfg.train.seed,
        normalizer=normalizer_for(backbone.cfg.text),
    )
    objective = TextAssignment(model, seed=cfg.train.seed + env.rank, head_init=cfg.head_init)
    trainer = Trainer(
        objective,
        data,
        LoopSettings(
            max_steps=int(stage.steps),
            log_every=int(stage.log_every),
            grad_clip=cfg.train.grad_clip,
            save_every=int(cfg.train.save_every),
            keep_last=int(cfg.train.keep_last),
            desc=STAGE,
            seed=cfg.train.seed,
            collective_timeout_s=cfg.train.collective_timeout_s,
            stall_factor=cfg.train.stall_factor,
        ),
        env=env,
        optimizer_cfg=OptimizerConfig(
            lr=float(stage.lr),
            weight_decay=cfg.train.weight_decay,
            betas=[float(b) for b in cfg.train.betas],
            decay_rule=cfg.train.decay_rule,
        ),
        scheduler_cfg=SchedulerConfig(name=ScheduleName.linear, warmup_ratio=float(stage.warmup_ratio)),
        deepspeed_cfg=cfg.deepspeed,
        micro_batch=int(stage.data.image_caption.batch_size),
        output_dir=folder,
        lr_mults=multipliers(objective.head_parameter_names(), float(stage.head_lr_mult)),
        run_config=to_dict(cfg),
        resume=cfg.resume,
        overwrite=cfg.overwrite if overwrite is None else overwrite,
    )
    try:
        last = trainer.run()
    finally:
        trainer.close()
    into = TextAssignment(model.rebuilt().to(env.device)) if trainer.zero_stage == 3 else None
    trained = trainer.finish(into=into).task_model
    log.info("NLVR domain pretraining: %d steps, last text-assignment loss %s", stage.steps, last.get("ta"))
    if env.is_main:
        trained.save(saved, tokenizer, extra={STAGE: {"steps": int(stage.steps), **last}})
    barrier()
    return trained
