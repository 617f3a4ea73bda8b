"""A recipe *stage* is a number of optimizer steps of a model's ``forward(batch, stage) -> {"loss": ..., other
named losses}`` over a batch source, on the same :class:`~cclm.runtime.trainer.Trainer`, checkpoints and
logging as pretraining. Only parameters with ``requires_grad`` are optimised.

Per stage, under ``<output_dir>/<stage>/``: ``metrics.jsonl`` + TensorBoard logs, and checkpoints every
``train.save_every`` steps and at the end (``checkpoints/step_<8-digit step>``, as pretraining writes them).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from torch import nn

from cclm.config import ConfigError, to_dict
from cclm.evaluation.results import write_results
from cclm.runtime.env import DistEnv
from cclm.runtime.trainer import LoopSettings, Trainer

log = logging.getLogger("cclm.recipes")
RESULTS_FILE = "results.json"


def run_stage(
    model: nn.Module,
    cfg,
    name: str,
    steps: int,
    source,
    micro_batch: int,
    env: DistEnv,
    lr: float | None = None,
) -> dict[str, float]:
    """Train ``model`` for one stage (``lr`` None = ``train.optimizer.lr``); returns the last logged interval
    scalars, each named ``<stage>/...``, plus the stage's wall and CPU seconds. The model keeps the trained
    weights (fp32)."""
    if steps <= 0:
        raise ConfigError(f"{name}.steps must be positive, got {steps}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"stage {name}: the model has no trainable parameters")
    optimizer = cfg.train.optimizer if lr is None else OmegaConf.merge(cfg.train.optimizer, {"lr": float(lr)})
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
        overwrite=bool(getattr(cfg, "overwrite", False)),
    )
    last = trainer.run()
    trainer.finish()
    stats = {key if key.startswith(f"{name}/") else f"{name}/{key}": value for key, value in last.items()}
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
