"""A recipe *stage* is a number of optimizer steps of a model's ``forward(batch, stage) -> {"loss": ..., other
named losses}`` over a batch source, on the same :class:`~cclm.runtime.trainer.Trainer`, checkpoints and
logging as pretraining. Only parameters with ``requires_grad`` are optimised.

Per stage, under ``<output_dir>/<stage>/``: ``metrics.jsonl`` + TensorBoard logs, and with ``train.save_every``
> 0 checkpoints every that many steps and at the stage's end (``checkpoints/step_<8-digit step>``, as pretraining
writes them).

``resume=auto`` continues an interrupted recipe (SLURM's SIGUSR1 saves a checkpoint and exits): every stage
resumes from the newest checkpoint in its folder; a stage that had finished loads its last checkpoint and takes
no step, so the stages after it start from the very weights, RNG and data position the uninterrupted run had.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from cclm.config import ConfigError, to_dict
from cclm.evaluation.results import write_results
from cclm.runtime.env import DistEnv
from cclm.runtime.logging import METRICS_FILE
from cclm.runtime.output_dir import check_output_dir
from cclm.runtime.trainer import LoopSettings, Trainer

log = logging.getLogger("cclm.recipes")
RESULTS_FILE = "results.json"


def apply_threads(threads: int) -> int:
    """``torch.set_num_threads``: ``threads`` > 0 as given; 0 = ``OMP_NUM_THREADS`` when set, else half the
    cores, at most 8 (torch's default, every core, crawls when other jobs share the machine: MLA on a busy 2-core
    box took 163-233 s with it and 12-14 s with one thread). Returns the count set."""
    if threads < 0:
        raise ConfigError(f"threads must be >= 0 (0 = automatic), got {threads}")
    if threads == 0:
        env = os.environ.get("OMP_NUM_THREADS", "")
        threads = int(env) if env.isdigit() and int(env) > 0 else max(1, min(8, (os.cpu_count() or 2) // 2))
    torch.set_num_threads(threads)
    log.info("torch CPU threads: %d", threads)
    return threads


def recipe_resume(cfg, warn: bool = False) -> str | None:
    """The recipe's ``resume``: None or ``"auto"`` (a checkpoint folder belongs to one stage, so a recipe cannot
    name one). ``warn``: say so when ``"auto"`` meets ``train.save_every=0`` (no stage has a checkpoint, every
    stage reruns); the recipes call it so before they start."""
    resume = getattr(cfg, "resume", None)
    if resume in (None, ""):
        return None
    if resume != "auto":
        raise ConfigError(
            f"resume={resume}: a recipe continues with resume=auto (each stage from the newest checkpoint in "
            "<output_dir>/<stage>/checkpoints); a checkpoint folder belongs to one stage and cannot be given"
        )
    if warn and int(cfg.train.save_every) <= 0:
        log.warning(
            "resume=auto with train.save_every=0: finished stages wrote no checkpoint and run again from their "
            "start (a stage stopped by SIGUSR1 continues from the checkpoint it saved); set train.save_every=N to "
            "make every stage resumable"
        )
    return resume


def check_stage_dirs(cfg, stages: list[str]) -> None:
    """Before a recipe builds or evaluates anything: every stage folder ``<output_dir>/<stage>`` it will train in
    can be written, and a fresh run (no ``resume``) finds no run there unless ``overwrite`` (the message says to
    continue with ``resume=auto``). Writes nothing."""
    resume, overwrite = recipe_resume(cfg), bool(getattr(cfg, "overwrite", False))
    for stage in stages:
        check_output_dir(
            Path(cfg.output_dir) / stage, resume, overwrite, key=f"stage {stage}: output_dir/{stage}"
        )


def last_logged(stage_dir: str | Path) -> dict[str, float]:
    """The last record of a stage's ``metrics.jsonl`` without its step ({} when there is none): the scalars a
    stage that finished before a resume ended with."""
    path = Path(stage_dir) / METRICS_FILE
    if not path.exists():
        return {}
    for line in reversed(path.read_text(encoding="utf-8", errors="replace").splitlines()):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            record.pop("step", None)
            return record
    return {}


def run_stage(
    model: nn.Module,
    cfg,
    name: str,
    steps: int,
    source,
    micro_batch: int,
    env: DistEnv,
    lr: float | None = None,
    optimizer_overrides: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Train ``model`` for one stage (``lr`` None = ``train.optimizer.lr``; ``optimizer_overrides`` replace other
    ``train.optimizer`` keys); returns the last logged interval scalars, each named ``<stage>/...``, plus the
    stage's wall and CPU seconds (of this process: a resumed stage counts only what it ran) and
    ``<stage>/trained_params`` (what the optimizer updated). The model keeps the trained weights (fp32). With
    ``cfg.resume=auto`` the stage continues from its newest checkpoint (:func:`recipe_resume`)."""
    if steps <= 0:
        raise ConfigError(f"{name}.steps must be positive, got {steps}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"stage {name}: the model has no trainable parameters")
    overrides = dict(optimizer_overrides or {})
    if lr is not None:
        overrides["lr"] = float(lr)
    optimizer = OmegaConf.merge(cfg.train.optimizer, overrides) if overrides else cfg.train.optimizer
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer = Trainer(
        model,
        source,
        LoopSettings.from_train_config(cfg.train, max_steps=steps, desc=name),
        env=env,
        optimizer_cfg=optimizer,
        scheduler_cfg=cfg.train.scheduler,
        deepspeed_cfg=cfg.deepspeed,
        micro_batch=micro_batch,
        output_dir=Path(cfg.output_dir) / name,
        run_config=to_dict(cfg),
        resume=recipe_resume(cfg),
        overwrite=bool(getattr(cfg, "overwrite", False)),
    )
    trained = sum(p.numel() for group in trainer.optimizer.param_groups for p in group["params"])
    finished_before = trainer.step >= steps
    if finished_before:
        log.info("stage %s: finished before the resume; its weights are those of its last checkpoint", name)
    last = trainer.run()
    trainer.finish()
    if finished_before:
        last = last_logged(trainer.output_dir)
    stats = {key if key.startswith(f"{name}/") else f"{name}/{key}": value for key, value in last.items()}
    stats[f"{name}/trained_params"] = trained
    stats[f"{name}/seconds"] = time.perf_counter() - start
    stats[f"{name}/cpu_seconds"] = time.process_time() - cpu_start  # this process, all its threads
    return stats


def write_recipe_results(
    output_dir: str | Path,
    languages: dict[str, dict[str, float]],
    trained_params: int,
    total_params: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """``<output_dir>/results.json``: ``{"languages": {lang: metrics}, "trained_params", "total_params", ...}``,
    and the per-language table ``languages.{json,csv,md}`` (the project's one results writer)."""
    path = Path(output_dir) / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    results = {
        "languages": languages,
        "trained_params": int(trained_params),
        "total_params": int(total_params),
        **(extra or {}),
    }
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False))
    columns = list(dict.fromkeys(key for metrics in languages.values() for key in metrics))
    if languages:
        write_results(output_dir, "languages", languages, columns)
    return path
