"""The one training loop, under pretraining, fine-tuning and the recipes' stages.

A workflow hands the :class:`Trainer`
* a module whose ``forward(batch, view) -> {"loss": ..., other named losses}``,
* a :class:`BatchSource` (``views``, ``view_for_step``, ``next_batch``, and ``state_dict`` / ``load_state_dict``
  so that a resumed run continues exactly where the stream was),
* the loop, optimizer, schedule and DeepSpeed settings, and optionally an evaluation hook (``evaluate(module)
  -> scalars``) with the name of the metric that selects the weights to keep.

The trainer builds the optimizer (:mod:`cclm.runtime.optim`), the schedule and the DeepSpeed engine, resumes from
the newest complete checkpoint when asked, and runs: ``grad_accum`` micro-steps per optimizer step over the step's
view(s), logging (TensorBoard, ``metrics.jsonl``, a progress bar) with interval means of every loss, lr,
grad norm, samples/s, tokens/s, the data-wait fraction and MFU on GPUs, periodic evaluation, and checkpoints.

Trust (docs/reliability.md): a fresh run never writes into a folder holding another run; resuming is exact (the
data source cannot touch the training RNG, and hard negatives come from a generator the checkpoints keep); a
``SIGUSR1`` saves a checkpoint at the next step and ends the run with status 0; a watchdog ends every rank when
one stalls longer than the collective timeout.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from cclm.config import (
    ConfigError,
    DeepSpeedConfig,
    OptimizerConfig,
    SchedulerConfig,
    TrainConfig,
    ViewSchedule,
)
from cclm.errors import CheckpointError, RunInterrupted, UserError
from cclm.runtime import checkpoint, stop_signal
from cclm.runtime.config_changes import config_changes, named, report_changes
from cclm.runtime.engine import (
    build_engine,
    engine_keeps_grad_norm,
    full_parameters,
    global_grad_norm,
    zero_stage,
)
from cclm.runtime.env import DistEnv, barrier, to_device
from cclm.runtime.flops import peak_flops
from cclm.runtime.logging import METRICS_FILE, RunLogger, truncate_metrics
from cclm.runtime.optim import bounded_parameters, clamp_bounded
from cclm.runtime.output_dir import INTERRUPTED, check_output_dir, claim_output_dir
from cclm.runtime.rank_writes import RankWrites, write_error_cause
from cclm.runtime.run_lock import OutputDirLock, hold_output_dir
from cclm.runtime.schedule import views_per_iteration
from cclm.runtime.stop_checks import STOP_CHECK_S, StopCheckSchedule
from cclm.runtime.watchdog import Watchdog
from cclm.weights_files import save_tensors

log = logging.getLogger("cclm.train")
BEST_DIR = "best"
BEST_WEIGHTS = "model_fp32.safetensors"
BEST_INFO = "best.json"
CHECKPOINT_BEST = "best_fp32.safetensors"
EVAL_SCALARS_SHOWN = 6  # evaluation results named in the log line (all go to metrics.jsonl)


class BatchSource(Protocol):
    views: Sequence[str]

    def view_for_step(self, step: int) -> str: ...

    def next_batch(self, view: str) -> dict[str, Any]: ...

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...

    def close(self) -> None: ...


@dataclass
class LoopSettings:
    """How long and how the loop runs; every workflow fills one from its own config section."""

    max_steps: int
    log_every: int = 10
    save_every: int = 0  # 0: no checkpoints (the run cannot be resumed)
    eval_every: int = 0  # with an evaluation hook: also at the last step
    keep_last: int = 3
    grad_accum: int = 1
    grad_clip: float = 1.0
    view_schedule: ViewSchedule = ViewSchedule.alternate
    time_limit_s: float = 0.0  # > 0: stop after this much training time; the schedule anneals by time too
    activation_checkpointing: bool = False
    select_metric: str | None = (
        None  # evaluation scalar whose maximum selects the weights :meth:`finish` keeps
    )
    desc: str = "train"  # progress-bar label
    progress_bar: bool = True
    seed: int = 0  # of the hard-negative sampling generator (offset by rank)
    collective_timeout_s: float = 1800.0  # the watchdog ends every rank after this long without progress
    stall_factor: float = 20.0  # a step this many times the median logs which rank is behind
    # signals and the time limit are checked at least this often, and at log steps
    stop_check_s: float = STOP_CHECK_S

    @classmethod
    def from_train_config(
        cls, train_cfg: TrainConfig, max_steps: int | None = None, desc: str = "train"
    ) -> LoopSettings:
        """From a :class:`cclm.config.TrainConfig` (pretraining, the recipes' stages)."""
        return cls(
            max_steps=int(max_steps if max_steps is not None else train_cfg.max_steps),
            log_every=int(train_cfg.log_every),
            save_every=int(train_cfg.save_every),
            eval_every=int(train_cfg.eval_every),
            keep_last=int(train_cfg.keep_last),
            grad_accum=int(train_cfg.grad_accum),
            grad_clip=float(train_cfg.grad_clip),
            view_schedule=train_cfg.view_schedule,
            activation_checkpointing=bool(train_cfg.activation_checkpointing),
            desc=desc,
            seed=int(train_cfg.seed),
            collective_timeout_s=float(train_cfg.collective_timeout_s),
            stall_factor=float(train_cfg.stall_factor),
            stop_check_s=float(train_cfg.stop_check_s),
        )

    def validate(self) -> None:
        if self.max_steps <= 0 or self.log_every <= 0:
            raise ConfigError(f"steps ({self.max_steps}) and log_every ({self.log_every}) must be positive")
        if self.save_every < 0 or self.eval_every < 0 or self.grad_accum <= 0:
            raise ConfigError("save_every and eval_every must be >= 0, grad_accum > 0")
        if self.collective_timeout_s <= 0 or self.stall_factor <= 1:
            raise ConfigError("collective_timeout_s must be > 0 and stall_factor > 1")
        if self.stop_check_s <= 0:
            raise ConfigError(f"stop_check_s must be > 0, got {self.stop_check_s}")


@dataclass
class Selection:
    """The evaluation that selected the kept weights, and every evaluation of the run."""

    best_score: float = float("-inf")
    best_step: int = 0
    steps: int = 0
    history: list[dict] | None = None

    def state(self) -> dict:
        return {"best_score": self.best_score, "best_step": self.best_step, "history": self.history or []}


def _batch_counts(batch: Mapping[str, Any]) -> tuple[int, int]:
    """(samples, text tokens): the region-text pairs of a region batch (rows of ``idx_to_group_img``, the image
    of each text: its ``images`` are fewer, each shared by several texts), else rows of the first tensor; and the
    ones of every 2-D ``*_mask``."""
    pairs = batch.get("idx_to_group_img")
    tensors = [v for v in batch.values() if torch.is_tensor(v)]
    if torch.is_tensor(pairs):
        samples = int(pairs.shape[0])
    else:
        samples = int(tensors[0].shape[0]) if tensors else 0
    tokens = sum(
        int(v.sum()) for k, v in batch.items() if k.endswith("_mask") and torch.is_tensor(v) and v.ndim == 2
    )
    return samples, tokens


def _batch_flops(flops: float | None, batch: Mapping[str, Any], samples: int) -> float:
    """Training FLOPs of ``batch``: at its own shapes where the figure knows them
    (:class:`cclm.train.flops.StepFlops`: the padded text length, a region batch's images and texts), else
    ``samples`` x the per-sample figure."""
    if not flops:
        return 0.0
    per_batch = getattr(flops, "batch_flops", None)
    return float(per_batch(batch)) if per_batch is not None else samples * float(flops)


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        source: BatchSource,
        loop: LoopSettings,
        *,
        env: DistEnv,
        optimizer_cfg: OptimizerConfig,
        scheduler_cfg: SchedulerConfig,
        deepspeed_cfg: DeepSpeedConfig,
        micro_batch: int,
        output_dir: str | Path,
        lr_mults: Mapping[str, float] | None = None,
        run_config: dict | None = None,
        evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
        flops_per_sample: Mapping[str, float] | None = None,
        resume: str | None = None,
        overwrite: bool = False,
    ):
        """``optimizer_cfg``: ``lr``, ``weight_decay``, ``betas``, ``eps`` (an :class:`OptimizerConfig`);
        ``scheduler_cfg``: a :class:`SchedulerConfig`; ``deepspeed_cfg``: a :class:`DeepSpeedConfig`.
        ``resume``: None, ``"auto"`` (the newest complete checkpoint in ``output_dir``, if any) or a checkpoint
        folder. ``overwrite``: a fresh run may replace a run in ``output_dir`` (moved aside, not deleted).
        ``flops_per_sample``: view -> training FLOPs per sample, for MFU; a
        :class:`cclm.train.flops.StepFlops` charges each batch at its own shapes instead.
        Nothing is written before the configuration has been checked."""
        loop.validate()
        if loop.select_metric and evaluate is None:
            raise ConfigError("selecting weights by an evaluation metric needs an evaluation hook")
        self.loop, self.env, self.source = loop, env, source
        self.evaluate_fn, self.flops_per_sample = evaluate, dict(flops_per_sample or {})
        self.output_dir = Path(output_dir)
        self.run_config = run_config or {}
        self.resume, self.overwrite = resume, overwrite
        check_output_dir(self.output_dir, resume, overwrite)
        self._lock: OutputDirLock | None = None
        self._checkpoints_seen = {p.name for p in checkpoint.complete_checkpoints(self.output_dir)}
        target = checkpoint.resume_target(self.output_dir, resume)  # checked before anything is built
        if target is not None:
            self._check_steps_left(target)
        if loop.activation_checkpointing:
            if not hasattr(model, "set_grad_checkpointing"):
                raise ConfigError(f"activation checkpointing: {type(model).__name__} does not support it")
            model.set_grad_checkpointing(True)
        self._start_time = time.monotonic()
        self._time_before = 0.0  # training seconds of the run before a resume (time-limited runs)
        self._ended_by_time_limit: float | None = None  # the time limit that ended the run, once it has
        self.engine, self.optimizer, self.scheduler, ds_config = build_engine(
            model,
            env=env,
            optimizer_cfg=optimizer_cfg,
            scheduler_cfg=scheduler_cfg,
            deepspeed_cfg=deepspeed_cfg,
            micro_batch=micro_batch,
            max_steps=loop.max_steps,
            grad_accum=loop.grad_accum,
            grad_clip=loop.grad_clip,
            lr_mults=lr_mults,
            effective_step=self._schedule_step,
            views_per_iteration=views_per_iteration(loop.view_schedule, source.views),
        )
        self.model = self.engine.module
        self.zero_stage = zero_stage(ds_config)
        if target is not None:
            checkpoint.check_zero_stage(target, self.zero_stage)
        self._engine_grad_norm = engine_keeps_grad_norm(self.engine)
        self._grad_norm: torch.Tensor | None = None  # the last update's, where the engine keeps none
        self.sampling_generator = torch.Generator(device=env.device)
        self.sampling_generator.manual_seed(loop.seed * 1000 + 7919 * (env.rank + 1))
        for module in self.model.modules():
            if hasattr(module, "sampling_generator"):
                module.sampling_generator = self.sampling_generator
        self._bounds = bounded_parameters(self.model)
        self._step_lr = self._base_lr()  # the lr the last optimizer update used (logged as "lr")
        self.step = 0
        self.selection = Selection(history=[])
        # the open log interval's loss sums; a checkpoint keeps them (a stop between log steps)
        self.interval = IntervalStats()
        self._start(target)

    # ------------------------------------------------------------------------------------------------ start
    def _check_steps_left(self, target: Path) -> None:
        """A checkpoint past ``max_steps`` is refused (resuming it would train nothing while the folder's config
        claimed fewer steps); one at ``max_steps`` (a finished run) trains nothing, with a warning."""
        step, max_steps = int(checkpoint.read_record(target)["step"]), self.loop.max_steps
        if step > max_steps:
            raise UserError(
                f"resume: {target} is at step {step}, past max_steps={max_steps}: nothing would be trained; "
                f"raise max_steps to train further, or resume an earlier checkpoint to go back"
            )
        if step == max_steps and self.env.is_main:
            log.warning(
                "resume: %s is at step %d = max_steps: the run has already finished and trains nothing more "
                "(raise max_steps to train further)",
                target,
                step,
            )

    def _changed_since(self, target: Path) -> str:
        """For a checkpoint that would not load: the keys this resume changed from its configuration. A changed
        ``optimizer.decay_rule``, lr multiplier or set of trained parameters regroups the optimizer, whose saved
        state then no longer fits."""
        try:
            changes = config_changes(checkpoint.read_json(target / checkpoint.CONFIG), self.run_config)
        except CheckpointError:
            return ""
        if not changes:
            return ""
        return (
            f". This resume changes {len(changes)} key(s) from the checkpoint's configuration ({named(changes)}); "
            "one that regroups the optimizer (its decay rule, lr multipliers, what is trained) leaves the saved "
            "optimizer state unusable: resume with the checkpoint's values for those keys"
        )

    def _claim(self, target: Path | None) -> None:
        """On the main rank, under the folder's lock: refuse when another job wrote a checkpoint since this run
        chose where to resume, then claim the folder (move an old run aside where ``overwrite`` says so)."""
        if self.resume == "auto":
            new = [p.name for p in checkpoint.complete_checkpoints(self.output_dir)]
            new = [name for name in new if name not in self._checkpoints_seen]
            if new:
                raise UserError(
                    f"output_dir={self.output_dir}: another job wrote {new[-1]} while this run was starting "
                    f"(from {target.name if target else 'nothing'}); start it again to continue from there"
                )
        claim_output_dir(self.output_dir, self.resume, self.overwrite)

    def _start(self, target: Path | None) -> None:
        self._lock = hold_output_dir(self.output_dir, self.env.is_main, lambda: self._claim(target))
        barrier()
        if target is not None:
            try:
                self.step, data_state, state = checkpoint.load(self.engine, target, self.env.rank)
            except CheckpointError as err:
                raise CheckpointError(f"{err}{self._changed_since(target)}") from err
            self.source.load_state_dict(data_state)
            self._time_before = float(state.get("train_seconds", 0.0))
            self._ended_by_time_limit = state.get("ended_by_time_limit")
            if "sampling_rng" in state:
                saved = torch.frombuffer(
                    bytearray(base64.b64decode(state["sampling_rng"])), dtype=torch.uint8
                )
                self.sampling_generator.set_state(saved)
            self.interval = IntervalStats.from_state(state.get("interval"), self.env.device)
            if "selection" in state:
                sel = state["selection"]
                self.selection = Selection(sel["best_score"], sel["best_step"], 0, list(sel["history"]))
            if self.env.is_main:
                checkpoint.set_aside_newer(self.output_dir, self.step)
                truncate_metrics(self.output_dir, self.step)
                self._restore_best(target)
                log.info("resumed from %s at step %d", target, self.step)
                saved = checkpoint.read_json(target / checkpoint.CONFIG)
                report_changes(self.output_dir, self.step, config_changes(saved, self.run_config))
        else:
            if self.env.is_main:
                truncate_metrics(self.output_dir, 0)
                best = self.output_dir / BEST_DIR
                for name in (BEST_WEIGHTS, BEST_INFO):
                    (best / name).unlink(missing_ok=True)
        if (
            self.env.is_main
        ):  # only once the checkpoint took: a refused resume leaves the folder's record as it was
            self._write_run_config()
        barrier()
        self._start_time = time.monotonic()

    def _write_run_config(self) -> None:
        path = self.output_dir / "config.json"
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(self.run_config, indent=2, default=str))
        os.replace(partial, path)

    def _restore_best(self, target: Path) -> None:
        """The best weights as they were at the checkpoint (a later, lost evaluation must not leak in)."""
        best = self.output_dir / BEST_DIR
        saved = target / CHECKPOINT_BEST
        if saved.exists():
            best.mkdir(parents=True, exist_ok=True)
            _atomic_copy(saved, best / BEST_WEIGHTS)
            (best / BEST_INFO).write_text(json.dumps(self.selection.state()))
        else:
            for name in (BEST_WEIGHTS, BEST_INFO):
                (best / name).unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------------- time
    def train_seconds(self) -> float:
        return self._time_before + time.monotonic() - self._start_time

    def _schedule_step(self, step: int) -> float:
        """The optimizer update the schedule is at: ``step``, or further along when a time limit will end the
        run first (in updates whatever the schedule counts: one counting iterations divides by the views)."""
        limit = self.loop.time_limit_s
        if limit <= 0:
            return step
        return max(step, min(1.0, self.train_seconds() / limit) * self.loop.max_steps)

    # ------------------------------------------------------------------------------------------------ steps
    def views_for_step(self, step: int) -> list[str]:
        if self.loop.view_schedule == ViewSchedule.sum:
            # a source may swap a view for another on some steps (PretrainData: region batches for image ones)
            views_for_step = getattr(self.source, "views_for_step", None)
            return list(views_for_step(step)) if views_for_step else list(self.source.views)
        return [self.source.view_for_step(step)]

    def train_step(self, stats: IntervalStats) -> None:
        """One optimizer step: ``grad_accum`` micro-steps over the step's view(s). Nothing here waits for the
        device: the losses are summed where they are computed and read at log steps (:meth:`_scalars`)."""
        self._step_lr = self._base_lr()  # a host float: the schedule set it after the previous update
        for _ in range(self.loop.grad_accum):
            total = 0.0
            for view in self.views_for_step(self.step):
                t0 = time.perf_counter()
                self._phase("loading data")
                # A data source (a DataLoader drawing its workers' base seed, say) must not advance the training
                # RNG: a resumed run creates its iterators at other steps than the uninterrupted one did.
                with torch.random.fork_rng(devices=[]):
                    batch = self.source.next_batch(view)
                self._phase("computing")
                stats.add("data_time", time.perf_counter() - t0)
                samples, tokens = _batch_counts(batch)
                stats.add("samples", samples)
                stats.add("tokens", tokens)
                stats.add("flops", _batch_flops(self.flops_per_sample.get(view), batch, samples))
                out = self.engine(to_device(batch, self.env.device), view)
                for name, value in out.items():
                    stats.add_loss(f"{view}/{name}", value)
                total = total + out["loss"]
            # the micro-step's loss: the interval mean over micro-steps is the mean step loss (the division by
            # grad_accum belongs to the gradients only, which the engine scales itself)
            stats.add_loss("loss", total.detach().double())
            self.engine.backward(total)
            if not self._engine_grad_norm and self.engine.is_gradient_accumulation_boundary():
                self._grad_norm = global_grad_norm(self.model)  # before the engine clips and zeroes them
            self.engine.step()
        clamp_bounded(self._bounds, self.engine.optimizer)
        self.step += 1

    def _scalars(self, stats: IntervalStats, elapsed: float) -> dict[str, float]:
        """Interval means, averaged over ranks. Every rank holds the same keys: views follow the step number.
        The one read of the device per log interval."""
        world = self.env.world_size
        device = self.env.device  # NCCL reduces only GPU tensors
        keys, values = stats.loss_means(device)
        totals = torch.tensor(
            [stats.counters[k] for k in ("samples", "tokens", "flops", "data_time")],
            dtype=torch.float64,
            device=device,
        )
        if dist.is_initialized() and world > 1:
            dist.all_reduce(values)
            values /= world
            dist.all_reduce(totals)
        values, totals = values.tolist(), totals.tolist()
        out = {k: float(v) for k, v in zip(keys, values)}
        out["lr"] = self._step_lr
        if hasattr(self.model, "logged_scalars"):
            out.update(self.model.logged_scalars())
        norm = self.engine.get_global_grad_norm() if self._engine_grad_norm else self._grad_norm
        if norm is not None:
            out["grad_norm"] = float(norm)
        elapsed = max(elapsed, 1e-9)
        out["samples_per_s"] = float(totals[0]) / elapsed
        out["tokens_per_s"] = float(totals[1]) / elapsed
        out["data_wait_frac"] = float(totals[3]) / world / elapsed
        peak = peak_flops(self.env.device)
        if peak and self.flops_per_sample:
            out["mfu"] = float(totals[2]) / elapsed / (peak * world)
        if hasattr(self.source, "skip_counts"):
            skips = self._skips_over_ranks(self.source.skip_counts())
            out["skipped_samples"] = float(sum(skips.values()))
            out.update({f"skipped/{reason}": float(n) for reason, n in skips.items()})
        return out

    def _skips_over_ranks(self, mine: Mapping[str, int]) -> dict[str, int]:
        """Skipped samples by reason, summed over every rank (each rank reads its own shards)."""
        if not (dist.is_initialized() and self.env.world_size > 1):
            return dict(mine)
        everyone: list[Mapping[str, int]] = [{}] * self.env.world_size
        dist.all_gather_object(everyone, dict(mine))
        total: dict[str, int] = {}
        for counts in everyone:
            for reason, n in counts.items():
                total[reason] = total.get(reason, 0) + int(n)
        return dict(sorted(total.items()))

    def _base_lr(self) -> float:
        """The learning rate of the groups without a multiplier (the first group's when all have one), as the
        next optimizer update will use it."""
        groups = self.optimizer.param_groups
        plain = [g for g in groups if g.get("lr_mult", 1.0) == 1.0]
        return float((plain or groups)[0]["lr"])

    # -------------------------------------------------------------------------------------------------- run
    def run(self) -> dict[str, float]:
        """Train to ``max_steps`` (or the time limit); returns the last logged scalars."""
        loop = self.loop
        logger = RunLogger(
            self.output_dir, self.env.rank, loop.max_steps, self.step, loop.progress_bar, desc=loop.desc
        )
        self.engine.train()
        self._watchdog = Watchdog(
            self.output_dir / "heartbeats",
            self.env.rank,
            self.env.world_size,
            loop.collective_timeout_s,
            loop.stall_factor,
        ).start()
        with stop_signal.catching():  # SIGUSR1 asks for a checkpoint and a clean exit
            try:
                last = self._train(logger)
            finally:
                logger.close()
                self._watchdog.stop()
        self.selection.steps = self.step
        return last

    def _finished_on_time(self) -> bool:
        """Whether the checkpoint this run resumed was saved as its time limit ended it, and the limit is not
        larger now: the run has finished, and another step would train past it."""
        ended, limit = self._ended_by_time_limit, self.loop.time_limit_s
        return ended is not None and 0 < limit <= float(ended)

    def _train(self, logger: RunLogger) -> dict[str, float]:
        loop, stats = self.loop, self.interval
        last: dict[str, float] = {}
        if self._finished_on_time():
            if self.env.is_main:
                log.warning(
                    "resume: the run ended at step %d on its time limit (%.0f s of training) and trains nothing "
                    "more (raise the time limit to train further)",
                    self.step,
                    loop.time_limit_s,
                )
            return last
        t_start = time.perf_counter()
        checks = StopCheckSchedule(loop.log_every, self.step, loop.stop_check_s)
        while self.step < loop.max_steps:
            self.train_step(stats)
            self._watchdog.step_done(self.step)
            logger.advance()
            # One small all-reduce (a host sync) at log steps and every ~30 s, not every step
            # (:mod:`cclm.runtime.stop_checks`).
            out_of_time, signalled = self._stop_requests(checks) if checks.due(self.step) else (False, False)
            done = self.step >= loop.max_steps or out_of_time
            evaluate = self.evaluate_fn is not None and (
                done or (loop.eval_every > 0 and self.step % loop.eval_every == 0)
            )
            # A stop between log steps logs nothing: the checkpoint keeps the interval's sums, and the resumed
            # run logs the next log step as the uninterrupted run does.
            if self.step % loop.log_every == 0 or done or evaluate:
                last = self._scalars(stats, time.perf_counter() - t_start)
                if evaluate:
                    last.update(self.evaluate(last.get("loss")))
                self._log(logger, last)
                stats.clear()
                t_start = time.perf_counter()
            if (
                signalled and not done
            ):  # a stop asked for during the last step: the run ends as it would anyway
                self._stop_on_signal()
            if out_of_time:
                self._ended_by_time_limit = loop.time_limit_s
            if loop.save_every > 0 and (self.step % loop.save_every == 0 or done):
                self.save()
            if done:
                break
        return last

    def _log(self, logger: RunLogger, scalars: dict[str, float]) -> None:
        """``metrics.jsonl`` and TensorBoard; a write that fails (a full disk) ends the run in one line naming the
        file and the checkpoint to resume from."""
        try:
            logger.log(self.step, scalars)
        except OSError as err:
            raise UserError(
                f"{self.output_dir / METRICS_FILE} could not be written at step {self.step} "
                f"({write_error_cause(err)}); {checkpoint.resume_hint(self.output_dir)}"
            ) from err

    def _phase(self, phase: str) -> None:
        watchdog = getattr(self, "_watchdog", None)
        if watchdog is not None:
            watchdog.set_phase(phase)

    # ------------------------------------------------------------------------------------------- stopping
    def _stop_requests(self, checks: StopCheckSchedule) -> tuple[bool, bool]:
        """(out of time, a stop signal arrived), agreed by every rank so that all stop at the same step; the same
        all-reduce gives ``checks`` the slowest rank's time since the previous check."""
        out_of_time = self.loop.time_limit_s > 0 and self.train_seconds() > self.loop.time_limit_s
        flags = [float(out_of_time), float(stop_signal.requested() is not None), checks.seconds_since_last()]
        if dist.is_initialized() and self.env.world_size > 1:
            agreed = torch.tensor(flags, dtype=torch.float64, device=self.env.device)  # NCCL: GPU tensors
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
            flags = agreed.tolist()
        checks.checked(self.step, flags[2])
        return bool(flags[0]), bool(flags[1])

    def _stop_on_signal(self) -> None:
        self._phase("saving")
        path = self.save()
        why = "SIGUSR1"  # the one stop signal; the rank that got it may be another
        if self.env.is_main:
            record = {"step": self.step, "signal": why, "checkpoint": str(path)}
            marker = self.output_dir / INTERRUPTED
            try:
                checkpoint.atomic_write(marker, json.dumps(record))
            except (
                OSError
            ) as err:  # a full disk, say: the checkpoint is safe, the requeue marker is not there
                raise UserError(
                    f"stopped at step {self.step} on {why} with checkpoint {path} saved, but {marker} could not be "
                    f"written ({write_error_cause(err)}): launch/slurm.sbatch will not requeue the job; resume=auto "
                    "continues from the checkpoint"
                ) from err
        message = f"stopped at step {self.step} on {why}: checkpoint {path} saved; resume=auto continues"
        log.warning(message)
        raise RunInterrupted(message)

    def evaluate(self, train_loss: float | None = None) -> dict[str, float]:
        """Run the evaluation hook on whole weights (gathered under ZeRO-3); with ``select_metric``, keep the
        weights of the best evaluation so far in ``<output_dir>/best/``."""
        self._phase("evaluating")
        if self.env.is_main:  # an evaluation can take minutes without a bar of its own
            log.info("%s: evaluating at step %d", self.loop.desc, self.step)
        started = time.perf_counter()
        self.model.eval()
        try:
            with full_parameters(self.engine), torch.no_grad():
                result = {k: float(v) for k, v in self.evaluate_fn(self.model).items()}
        finally:
            self.model.train()
        if self.env.is_main:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in list(result.items())[:EVAL_SCALARS_SHOWN])
            more = (
                f" (+{len(result) - EVAL_SCALARS_SHOWN} more in metrics.jsonl)"
                if len(result) > EVAL_SCALARS_SHOWN
                else ""
            )
            log.info(
                "%s: evaluated in %.0f s: %s%s", self.loop.desc, time.perf_counter() - started, shown, more
            )
        record = {"step": self.step, **result, "loss": train_loss if train_loss is not None else float("nan")}
        if hasattr(self.source, "epochs_done"):
            record["epoch"] = self.source.epochs_done
        self.selection.history.append(record)
        metric = self.loop.select_metric
        if metric:
            if metric not in result:
                raise KeyError(
                    f"the evaluation returned {sorted(result)}, not the selection metric '{metric}'"
                )
            if result[metric] > self.selection.best_score:
                self.selection.best_score, self.selection.best_step = result[metric], self.step
                self._write_best()
        return result

    def _write_best(self) -> None:
        """The selected weights into ``<output_dir>/best/`` (main rank); a write that fails stops every rank with
        one error naming the file, the cause and the checkpoint to resume from."""
        weights = checkpoint.gather_fp32_state_dict(self.engine)  # a collective under ZeRO-3
        writes, best = RankWrites(), self.output_dir / BEST_DIR
        if self.env.is_main:
            tmp = best / (BEST_WEIGHTS + ".tmp")
            writes.run(best.mkdir, parents=True, exist_ok=True)
            writes.run(save_tensors, {k: v.contiguous() for k, v in weights.items()}, str(tmp))
            writes.run(os.replace, tmp, best / BEST_WEIGHTS)
            writes.run((best / BEST_INFO).write_text, json.dumps(self.selection.state()))
            if writes.error is not None:
                tmp.unlink(missing_ok=True)
        failure = writes.failure()  # a collective
        if failure is not None:
            raise CheckpointError(
                f"the best weights so far (step {self.step}) could not be written to {best} ({failure}); "
                f"{checkpoint.resume_hint(self.output_dir)}"
            ) from writes.error
        barrier()

    def save(self) -> Path:
        best = self.output_dir / BEST_DIR / BEST_WEIGHTS
        self._phase("saving")
        state = {
            "train_seconds": self.train_seconds(),
            "ended_by_time_limit": self._ended_by_time_limit,
            "sampling_rng": base64.b64encode(self.sampling_generator.get_state().numpy().tobytes()).decode(),
        }
        if self.loop.select_metric:
            state["selection"] = self.selection.state()
        state["interval"] = self.interval.state()  # a read of the device: at checkpoints only
        return checkpoint.save(
            self.engine,
            self.output_dir,
            self.step,
            self.env.rank,
            self.run_config,
            self.source.state_dict(),
            self.loop.keep_last,
            trainer_state=state,
            extra_files={CHECKPOINT_BEST: best} if self.loop.select_metric and best.exists() else None,
        )

    # ------------------------------------------------------------------------------------------------ finish
    def final_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 weights: the selected ones when the run selects by an evaluation metric, else the last.
        A collective under ZeRO-3 (every rank calls it)."""
        best = self.output_dir / BEST_DIR / BEST_WEIGHTS
        if self.loop.select_metric:
            barrier()
            if not best.exists():
                raise FileNotFoundError(f"{best} is missing: the run never evaluated")
            return load_file(str(best))
        return checkpoint.gather_fp32_state_dict(self.engine)

    def finish(self, into: nn.Module | None = None) -> nn.Module:
        """The trained module in fp32 holding :meth:`final_state_dict`, ready for evaluation or saving.
        Under ZeRO-3 the engine's module is partitioned: pass a freshly built module of the same kind (``into``)."""
        state = self.final_state_dict()
        if into is None:
            if self.zero_stage == 3:
                raise ConfigError("under ZeRO-3 the trained module must be rebuilt: pass `into`")
            into = self.model
        into.float()
        missing, unexpected = into.load_state_dict(state, strict=False)
        if unexpected or set(missing) - checkpoint.tied_aliases(into):
            raise RuntimeError(
                f"final weights do not match the module: missing={missing} unexpected={unexpected}"
            )
        return into.eval()

    def close(self) -> None:
        self.source.close()
        if self._lock is not None:
            self._lock.release()


class IntervalStats:
    """What one log interval adds up: host counters (samples, tokens, FLOPs, seconds waiting for data) and every
    named loss, summed on the loss's device so that no micro-step waits for the accelerator.

    Sums are float64 from the first value on: the same arithmetic as adding the losses' Python floats, so the
    logged means are what reading every loss with ``.item()`` would give."""

    def __init__(self):
        self.counters: dict[str, float] = defaultdict(float)
        self.loss_sums: dict[str, torch.Tensor] = {}
        self.loss_counts: dict[str, int] = defaultdict(int)

    def add(self, key: str, value: float) -> None:
        self.counters[key] += value

    def add_loss(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().double()
        previous = self.loss_sums.get(key)
        self.loss_sums[key] = value if previous is None else previous + value
        self.loss_counts[key] += 1

    def loss_means(self, device: torch.device) -> tuple[list[str], torch.Tensor]:
        """(sorted keys, their interval means as one float64 tensor on ``device``), still on the device."""
        keys = sorted(self.loss_sums)
        if not keys:
            return [], torch.zeros(0, dtype=torch.float64, device=device)
        means = [(self.loss_sums[k] / self.loss_counts[k]).reshape(()).to(device) for k in keys]
        return keys, torch.stack(means)

    def clear(self) -> None:
        self.counters.clear()
        self.loss_sums.clear()
        self.loss_counts.clear()

    def state(self) -> dict[str, Any]:
        """The loss sums and counts (exact: float64 sums as Python floats); the counters are rates' numerators,
        which a resumed run measures afresh."""
        return {
            "loss_sums": {k: float(v) for k, v in self.loss_sums.items()},
            "loss_counts": dict(self.loss_counts),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any] | None, device: torch.device) -> IntervalStats:
        stats = cls()
        for key, value in (state or {}).get("loss_sums", {}).items():
            stats.loss_sums[key] = torch.tensor(float(value), dtype=torch.float64, device=device)
            stats.loss_counts[key] = int(state["loss_counts"][key])
        return stats


def _atomic_copy(source: Path, target: Path) -> None:
    tmp = target.with_name(target.name + ".tmp")
    shutil.copy2(source, tmp)
    os.replace(tmp, target)
