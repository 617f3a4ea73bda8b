"""A recipe *stage* is a number of optimizer steps of a model's ``forward(batch, stage) -> {"loss": ..., other
named losses}`` over a batch source, on the same :class:`~cclm.runtime.trainer.Trainer`, checkpoints and
logging as pretraining. Only parameters with ``requires_grad`` are optimised.

Per stage, under ``<output_dir>/<stage>/``: ``metrics.jsonl`` + TensorBoard logs, and with ``train.save_every``
> 0 checkpoints every that many steps and at the stage's end (``checkpoints/step_<8-digit step>``, as pretraining
writes them).

``resume=auto`` continues an interrupted recipe (SLURM's SIGUSR1 saves a checkpoint and exits): every stage
resumes from the newest checkpoint in its folder; a stage that had finished loads its last checkpoint and takes
no step, so the stages after it start from the very weights, RNG and data position the uninterrupted run had.
A later stage's checkpoint is only valid on top of the upstream weights it was trained from: once a stage trains
a step in this process, every later stage starts again from step 0 (:class:`StageChain`).
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
from cclm.runtime import checkpoint
from cclm.runtime.config_changes import CHANGES_FILE
from cclm.runtime.env import DistEnv, barrier, dist_info
from cclm.runtime.logging import METRICS_FILE
from cclm.runtime.output_dir import aside_path, check_output_dir, holds_run
from cclm.runtime.trainer import LoopSettings, Trainer

log = logging.getLogger("cclm.recipes")
RESULTS_FILE = "results.json"
# What write_recipe_results writes (a run's top-level outputs, moved aside with the old run by overwrite=true).
RESULT_FILES = (RESULTS_FILE, "languages.json", "languages.csv", "languages.md")


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
    """Before a recipe builds or evaluates anything: every stage folder ``<output_dir>/<stage>`` it knows (those
    it will train in, and those a run of it with other settings trains in) can be written, and a fresh run (no
    ``resume``) finds no run there unless ``overwrite`` (the message says to continue with ``resume=auto``).
    Writes nothing."""
    resume, overwrite = recipe_resume(cfg), bool(getattr(cfg, "overwrite", False))
    for stage in stages:
        check_output_dir(
            Path(cfg.output_dir) / stage, resume, overwrite, key=f"stage {stage}: output_dir/{stage}"
        )


def replaces_old_run(cfg) -> bool:
    """A fresh run (no ``resume``) with ``overwrite=true``: it moves the old run in ``output_dir`` aside."""
    return bool(getattr(cfg, "overwrite", False)) and recipe_resume(cfg) is None


def move_aside(output_dir: str | Path, names: list[str], why: str) -> Path | None:
    """Move every ``<output_dir>/<name>`` that exists (a results file, saved weights, a tokenizer folder) into one
    new folder ``<output_dir>/run.old-<time>/``; never deletes. Main rank only; returns the folder, or None when
    nothing was there."""
    out = Path(output_dir)
    present = [name for name in names if (out / name).exists() or (out / name).is_symlink()]
    if not present:
        return None
    aside = aside_path(out / "run")
    for name in present:
        target = aside / name
        target.parent.mkdir(parents=True, exist_ok=True)
        (out / name).rename(target)
    log.warning("%s: moved %s of the old run to %s", why, ", ".join(present), aside)
    return aside


def move_old_run(cfg, stages: list[str], artifacts: list[str]) -> None:
    """``overwrite=true`` on a fresh run, before anything is written: every stage folder the recipe knows
    (planned by this config or not) that holds a run goes to ``<stage>.old-<time>`` (as a stage's own trainer
    would move it), and the old run's top-level outputs to ``<output_dir>/run.old-<time>/``, so that nothing of
    the old run is left to be mixed with the new one (a later ``resume=auto`` would otherwise take an old stage
    for a finished one). Every rank calls it; the main rank moves."""
    if not replaces_old_run(cfg):
        return
    if dist_info()[0] == 0:
        out = Path(cfg.output_dir)
        for stage in stages:
            if holds_run(out / stage):
                aside = aside_path(out / stage)
                (out / stage).rename(aside)
                log.warning("overwrite=true: the old run of stage %s was moved to %s", stage, aside)
        move_aside(out, list(artifacts), "overwrite=true")
    barrier()


class StageChain:
    """The stages of a multi-stage recipe, in order, each training on the weights the stages before it left.

    A stage's checkpoint holds what it trained on top of the upstream weights of the process that wrote it, so
    with ``resume=auto`` it is valid only while every stage before it is unchanged. The rule (no fingerprint):
    once a stage trains a step in this process (it had not finished before the resume: a longer schedule, a
    stage newly added in front, a stage rerun because it wrote no checkpoint), or a stage that the old run had
    before it is not part of this run, every later stage that holds a checkpoint starts again from step 0: its
    old run is moved to ``<stage>.old-<time>`` (never deleted), with a warning naming the reason. A stage the
    old run had and this one does not is moved aside the same way when the chain passes it. An exact resume (the
    same configuration, after a kill or SIGUSR1) is unaffected: the stages after the interrupted one had no
    checkpoint yet.

    ``known``: every stage the recipe has, in order; ``planned``: those this run trains."""

    def __init__(self, cfg, known: list[str], planned: list[str]):
        unknown = [name for name in planned if name not in known]
        if unknown:
            raise ValueError(f"stages {unknown} are not among the recipe's stages {known}")
        self.output_dir = Path(cfg.output_dir)
        self.resume = recipe_resume(cfg)
        self.overwrite = bool(getattr(cfg, "overwrite", False))
        self.known, self.planned = list(known), list(planned)
        self.changed: str | None = None  # why the stages from here on cannot continue their old runs
        self.restarted: list[str] = []
        self._passed = 0  # known stages the chain has gone past

    def _pass_to(self, name: str) -> None:
        """Move aside the old runs of the known stages before ``name`` that this run does not train."""
        index = self.known.index(name)
        gone = [
            other
            for other in self.known[self._passed : index]
            if self.resume and other not in self.planned and holds_run(self.output_dir / other)
        ]
        self._passed = index + 1
        if gone and self.changed is None:
            self.changed = f"the old run had stage {gone[0]} before it, this run has not"
        barrier()  # every rank has looked before the main rank moves anything
        if dist_info()[0] == 0:
            for other in gone:
                aside = aside_path(self.output_dir / other)
                (self.output_dir / other).rename(aside)
                log.warning("stage %s is not part of this run: its old run was moved to %s", other, aside)
        barrier()

    def start(self, name: str) -> tuple[str | None, bool]:
        """(resume, overwrite) for the trainer of stage ``name``, the next stage this run trains. Every rank
        calls it."""
        self._pass_to(name)
        stale = self.resume and self.changed and checkpoint.latest_checkpoint(self.output_dir / name)
        barrier()  # every rank has looked before the main rank's trainer moves the folder aside
        if stale:
            log.warning(
                "stage %s: its checkpoints were trained on other weights of the stages before it (%s): it "
                "starts again from step 0 and its old run is moved aside",
                name,
                self.changed,
            )
            self.restarted.append(name)
            return None, True
        return self.resume, self.overwrite

    def will_train(self, name: str, steps: int) -> bool:
        """Whether stage ``name`` (its trainer started with :meth:`start`'s answer) takes a step in this process:
        the checkpoint ``resume=auto`` picks (verified, as the trainer does) is before ``steps``."""
        resume = None if name in self.restarted else self.resume
        target = checkpoint.resume_target(self.output_dir / name, resume)
        return target is None or int(checkpoint.read_record(target)["step"]) < int(steps)

    def ran(self, name: str, trained_now: bool) -> None:
        """Stage ``name`` started: ``trained_now`` when it takes a step in this process."""
        if trained_now and self.changed is None:
            self.changed = f"stage {name} trained steps in this run"


class TrainedParams:
    """The parameters a recipe's stages trained, each counted once (a tensor two stages train counts once): a
    recipe's ``trained_params``."""

    def __init__(self):
        self._params: dict[int, nn.Parameter] = {}

    def add(self, module: nn.Module) -> None:
        """The parameters ``module`` trains now (``requires_grad``: what a stage's optimizer holds)."""
        for param in module.parameters():
            if param.requires_grad:
                self._params[id(param)] = param

    @property
    def count(self) -> int:
        return sum(p.numel() for p in self._params.values())


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
    chain: StageChain | None = None,
    trained_params: TrainedParams | None = None,
) -> dict[str, float]:
    """Train ``model`` for one stage (``lr`` None = ``train.optimizer.lr``; ``optimizer_overrides`` replace other
    ``train.optimizer`` keys); returns the last logged interval scalars, each named ``<stage>/...``, plus the
    stage's wall and CPU seconds (of this process: a resumed stage counts only what it ran) and
    ``<stage>/trained_params`` (what the optimizer updated). The model keeps the trained weights (fp32). With
    ``cfg.resume=auto`` the stage continues from its newest checkpoint (:func:`recipe_resume`), unless ``chain``
    (the recipe's stages) says an earlier stage changed (:class:`StageChain`). ``trained_params`` collects
    what the stage trains."""
    if steps <= 0:
        raise ConfigError(f"{name}.steps must be positive, got {steps}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"stage {name}: the model has no trainable parameters")
    overrides = dict(optimizer_overrides or {})
    if lr is not None:
        overrides["lr"] = float(lr)
    optimizer = OmegaConf.merge(cfg.train.optimizer, overrides) if overrides else cfg.train.optimizer
    start, cpu_start = time.perf_counter(), time.process_time()
    if chain is not None:
        resume, overwrite = chain.start(name)
    else:
        resume, overwrite = recipe_resume(cfg), bool(getattr(cfg, "overwrite", False))
    if trained_params is not None:
        trained_params.add(model)
    changes_file = Path(cfg.output_dir) / name / CHANGES_FILE
    changes_before = _line_count(changes_file)
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
        resume=resume,
        overwrite=overwrite,
    )
    trained = sum(p.numel() for group in trainer.optimizer.param_groups for p in group["params"])
    finished_before = trainer.step >= steps
    if chain is not None:
        chain.ran(name, not finished_before)
    if finished_before:
        log.info("stage %s: finished before the resume; its weights are those of its last checkpoint", name)
        if _line_count(changes_file) > changes_before:
            log.warning(
                "stage %s had finished before the resume: it takes no step, so its changed settings do not "
                "apply to it (overwrite=true reruns the recipe with them)",
                name,
            )
    last = trainer.run()
    trainer.finish()
    if finished_before:
        last = last_logged(trainer.output_dir)
    stats = {key if key.startswith(f"{name}/") else f"{name}/{key}": value for key, value in last.items()}
    stats[f"{name}/trained_params"] = trained
    stats[f"{name}/seconds"] = time.perf_counter() - start
    stats[f"{name}/cpu_seconds"] = time.process_time() - cpu_start  # this process, all its threads
    return stats


def _line_count(path: Path) -> int:
    try:
        return len(path.read_text(encoding="utf-8", errors="replace").splitlines())
    except OSError:
        return 0


def write_recipe_results(
    output_dir: str | Path,
    languages: dict[str, dict[str, float]],
    trained_params: int,
    total_params: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """``<output_dir>/results.json``: ``{"languages": {lang: metrics}, "trained_params", "total_params", ...}``,
    and the per-language table ``languages.{json,csv,md}`` (the project's one results writer).
    ``trained_params``: every parameter some stage of the recipe trained, each counted once
    (:class:`TrainedParams`); each stage's own count is ``<stage>/trained_params`` in its stats."""
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
