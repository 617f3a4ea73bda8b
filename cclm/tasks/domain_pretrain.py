"""The CCLM reference's NLVR domain pretraining as a step of the fine-tuning protocol (``domain_pretrain`` in a
MaRVL / NLVR2 config with ``head: cclm``): before fine-tuning, the pair model's backbone and doubled fusion layers
learn text assignment (:class:`~cclm.tasks.nlvr_fusion.TextAssignment`) on image-caption shards read by the
pretraining pipeline, on the same trainer as every other workflow. The stage runs at the pretrained model's image
size; the task's classifier is not trained by it.

The trained task model is saved to ``<output_dir>/domain_pretrain/model``; a rerun of the same output folder
(``resume=auto``) loads it instead of training again.
"""

from __future__ import annotations

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


def domain_pretrain(model: TaskModel, tokenizer, cfg: FinetuneConfig, env: DistEnv) -> TaskModel:
    """``model`` after the stage (its weights updated), or the stage's saved model when it already ran."""
    folder = Path(cfg.output_dir) / STAGE
    saved = folder / "model"
    if cfg.resume and (saved / "task.json").is_file():
        log.info("NLVR domain pretraining: loading the finished stage from %s", saved)
        return TaskModel.load(saved, env.device)
    from cclm.data.pipeline import PretrainData

    stage = cfg.domain_pretrain
    backbone = model.backbone
    data = PretrainData(
        stage.data,
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
        overwrite=cfg.overwrite,
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
