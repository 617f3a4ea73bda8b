"""Fine-tuning a task model on the runtime's :class:`~cclm.runtime.trainer.Trainer` (DeepSpeed ZeRO, bf16,
several GPUs, exact resume, TensorBoard), with model selection on a dev score: the weights of the best dev
evaluation are kept (selection never looks at a test set). Predictions for scoring run on the trained module.

An answer decoder (``head: cclm`` VQA tasks) needs its answers' token ids: when the model does not hold them yet,
:func:`finetune` and :func:`predict` tokenise the answer list with the batches' own collator (its tokenizer and the
model's text normaliser)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from cclm.config import (
    DecayRule,
    DeepSpeedConfig,
    OptimizerConfig,
    ScheduleName,
    SchedulerConfig,
    check_finetune_train_config,
)
from cclm.runtime.env import DistEnv, autocast, to_device
from cclm.runtime.optim import multipliers
from cclm.runtime.sources import EpochBatches
from cclm.runtime.trainer import LoopSettings, Selection, Trainer
from cclm.tasks.answer_decoder import K_TEST
from cclm.tasks.task_model import TaskModel

DEV = "dev"


@dataclass
class FinetuneSettings:
    """One fine-tuning run: the loop and optimisation settings of ``cclm finetune`` for one learning rate."""

    lr: float
    epochs: int = 10
    max_steps: int = 0  # > 0 stops earlier than `epochs`
    weight_decay: float = 0.01
    decay_rule: DecayRule = DecayRule.shape  # which parameters decay (cclm.runtime.optim.decays)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's (the fine-tuning config's train.betas)
    head_lr_mult: float = 1.0
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 0  # 0: at the end of every epoch
    log_every: int = 10
    save_every: int = 0  # > 0: checkpoints for resume
    keep_last: int = 2
    time_limit_s: float = 0.0
    seed: int = 42  # hard-negative sampling (retrieval tasks)
    collective_timeout_s: float = 1800.0
    stall_factor: float = 20.0

    @classmethod
    def from_train_config(cls, train, lr: float) -> FinetuneSettings:
        """The settings of a fine-tuning config's ``train`` section (:class:`~cclm.config.FinetuneTrainConfig`)
        at learning rate ``lr`` (the zero-shot ``train.lr`` or one of the few-shot ``train.lr_sweep``); a value
        out of range fails naming its key (``cclm finetune`` checks them before anything else)."""
        check_finetune_train_config(train, "train")
        return cls(
            lr=float(lr),
            epochs=train.epochs,
            max_steps=train.max_steps,
            weight_decay=train.weight_decay,
            decay_rule=DecayRule(train.decay_rule),
            betas=tuple(float(b) for b in train.betas),
            head_lr_mult=train.head_lr_mult,
            warmup_ratio=train.warmup_ratio,
            grad_clip=train.grad_clip,
            eval_every=train.eval_every,
            log_every=train.log_every,
            save_every=train.save_every,
            keep_last=train.keep_last,
            time_limit_s=60.0 * train.time_limit_minutes,
            seed=train.seed,
            collective_timeout_s=train.collective_timeout_s,
            stall_factor=train.stall_factor,
        )


def finetune(
    model: TaskModel,
    source: EpochBatches,
    dev_score: Callable[[TaskModel], float],
    settings: FinetuneSettings,
    *,
    env: DistEnv,
    output_dir: str | Path,
    deepspeed_cfg=None,
    run_config: dict | None = None,
    resume: str | None = None,
    overwrite: bool = False,
) -> tuple[TaskModel, Selection]:
    """Train ``model`` on ``source``; evaluate ``dev_score`` every ``eval_every`` steps (each epoch by default)
    and at the end; return the module holding the weights of its best dev evaluation (fp32, eval mode)."""
    prepare_answers(model, getattr(source, "collate_fn", None))
    steps = settings.max_steps if settings.max_steps > 0 else settings.epochs * len(source)
    loop = LoopSettings(
        max_steps=steps,
        log_every=settings.log_every,
        save_every=settings.save_every,
        eval_every=settings.eval_every if settings.eval_every > 0 else len(source),
        keep_last=settings.keep_last,
        grad_clip=settings.grad_clip,
        time_limit_s=settings.time_limit_s,
        select_metric=DEV,
        desc=model.task,
        seed=settings.seed,
        collective_timeout_s=settings.collective_timeout_s,
        stall_factor=settings.stall_factor,
    )
    trainer = Trainer(
        model,
        source,
        loop,
        env=env,
        optimizer_cfg=OptimizerConfig(
            lr=settings.lr,
            weight_decay=settings.weight_decay,
            betas=[float(b) for b in settings.betas],
            decay_rule=settings.decay_rule,
        ),
        scheduler_cfg=SchedulerConfig(name=ScheduleName.linear, warmup_ratio=settings.warmup_ratio),
        deepspeed_cfg=deepspeed_cfg if deepspeed_cfg is not None else DeepSpeedConfig(),
        micro_batch=source.batch_size,
        output_dir=output_dir,
        lr_mults=multipliers(model.head_parameter_names(), settings.head_lr_mult),
        run_config=run_config,
        evaluate=lambda module: {DEV: float(dev_score(module))},
        resume=resume,
        overwrite=overwrite,
    )
    try:
        trainer.run()
    finally:
        trainer.close()
    trained = trainer.finish(into=model.rebuilt().to(env.device) if trainer.zero_stage == 3 else None)
    return trained, trainer.selection


def prepare_answers(model: TaskModel, collate_fn) -> None:
    """Give an answer decoder that has none its answers' token ids, tokenised by the batches' collator."""
    if model.needs_answer_tokens():
        tokenize = getattr(collate_fn, "tokenize", None)
        if tokenize is None:
            raise ValueError(
                "the answer decoder has no answer tokens and the batches' collator cannot tokenise them: "
                "call model.set_answer_tokens(TaskCollator.for_model(model.backbone, tokenizer).tokenize)"
            )
        model.set_answer_tokens(tokenize)


@torch.no_grad()
def predict(
    model: TaskModel,
    batches: Iterable[dict],
    device: torch.device,
    precision="auto",
    k: int = K_TEST,
    first_token_twice: bool = False,
):
    """(predicted class ids, gold labels) over ``batches``; an answer decoder scores the ``k`` answers with the
    most probable first token in full (the reference's ``k_test``), counting that token twice with
    ``first_token_twice`` (as the reference)."""
    prepare_answers(model, getattr(batches, "collate_fn", None))
    was_training = model.training
    model.eval()
    predictions, labels = [], []
    for batch in batches:
        with autocast(device, precision):
            predicted = model.predict_labels(to_device(batch, device), k, first_token_twice)
        predictions.append(predicted.cpu())
        labels.append(batch["labels"])
    model.train(was_training)
    return torch.cat(predictions), torch.cat(labels)
