"""The pretraining loop: build everything (validating before anything is written), resume, train, log, save."""

from __future__ import annotations

import json
import logging
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from cclm.config import ConfigError, require_complete, to_dict
from cclm.train import checkpoint
from cclm.train.engine import build_engine, deepspeed_config, init_distributed
from cclm.train.flops import peak_flops, train_flops_per_sample
from cclm.train.logging import RunLogger, truncate_metrics

log = logging.getLogger("cclm.train")
VIEW_SCHEDULES = ("alternate", "sum")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_tokenizer(cfg) -> Any:
    from cclm.data.tokenize import load_tokenizer

    name = cfg.model.text.tokenizer or cfg.model.text.name_or_path
    if not name:
        raise ConfigError(
            "model.text.tokenizer must be set when model.text.name_or_path is null (random init)"
        )
    if not Path(name).exists() and "/" in name and name.startswith((".", "/")):
        raise ConfigError(f"model.text.tokenizer: folder {name} does not exist")
    tokenizer = load_tokenizer(name)
    encoder = cfg.model.text.encoder
    if not cfg.model.text.name_or_path:
        encoder["vocab_size"] = len(tokenizer)  # random init: the vocabulary is the tokenizer's
    elif "vocab_size" in encoder and len(tokenizer) > encoder["vocab_size"]:
        raise ConfigError(f"tokenizer has {len(tokenizer)} tokens, more than model.text.encoder.vocab_size")
    return tokenizer


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _accumulate(stats: dict[str, float], key: str, value: float) -> None:
    stats["sum:" + key] += value
    stats["count:" + key] += 1


def _batch_counts(batch: dict[str, Any]) -> tuple[int, int]:
    tokens = int(batch["text_mask"].sum()) + (int(batch["other_mask"].sum()) if "other_mask" in batch else 0)
    return batch["text_ids"].shape[0], tokens


class Trainer:
    def __init__(self, cfg):
        require_complete(cfg)
        self.cfg = cfg
        train = cfg.train
        if train.view_schedule not in VIEW_SCHEDULES:
            raise ConfigError(f"train.view_schedule: '{train.view_schedule}' is not one of {VIEW_SCHEDULES}")
        if train.max_steps <= 0 or train.save_every <= 0 or train.log_every <= 0:
            raise ConfigError("train.max_steps, train.save_every and train.log_every must be positive")
        self.dist = init_distributed()
        rank, world = self.dist.rank, self.dist.world_size
        self.tokenizer = resolve_tokenizer(cfg)
        seed_everything(train.seed)  # identical initial weights on every rank

        from cclm.data.pipeline import PretrainData
        from cclm.model import CrossViewModel

        self.data = PretrainData(
            cfg.data,
            self.tokenizer,
            cfg.model.text.max_length,
            rank=rank,
            world_size=world,
            seed=train.seed,
            image_size=cfg.model.vision.image_size,
        )
        self.micro_batch = self._stream_batch_size(self.data.views[0])
        self.eval_sets = {}
        if train.eval_every:
            if (cfg.deepspeed.zero_stage or 0) == 3:
                raise ConfigError(
                    "train.eval_every needs deepspeed.zero_stage <= 2 (ZeRO-3 shards the weights)"
                )
            from cclm.evaluation.run import load_periodic_sets

            self.eval_sets = load_periodic_sets(cfg.eval)
        deepspeed_config(cfg, self.micro_batch, world)  # fails here, before any write, on a bad combination
        model = CrossViewModel(cfg.model)
        self.flops_per_sample = {
            view: train_flops_per_sample(model, view, cfg.model.text.max_length, cfg.model.vision.image_size)
            for view in self.data.views
        }
        self.engine, self.optimizer, self.scheduler = build_engine(model, cfg, self.micro_batch, world)
        self.model = self.engine.module
        self.output_dir = Path(cfg.output_dir)
        self.step = 0
        self._resume_or_start()

    def _stream_batch_size(self, view: str) -> int:
        stream = self.cfg.data.image_caption if view == "image" else self.cfg.data.parallel_text
        return int(stream.batch_size)

    def _resume_or_start(self) -> None:
        cfg, rank = self.cfg, self.dist.rank
        target = None
        if cfg.resume == "auto":
            target = checkpoint.latest_checkpoint(self.output_dir)
        elif cfg.resume:
            target = Path(cfg.resume)
            if not (target / checkpoint.COMPLETE).exists():
                raise ConfigError(f"resume: {target} is not a complete checkpoint")
        if rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
            self.tokenizer.save_pretrained(str(self.output_dir / "tokenizer"))
        if target is not None:
            self.step, data_state = checkpoint.load(self.engine, target, rank)
            self.data.load_state_dict(data_state)
            if rank == 0:
                truncate_metrics(self.output_dir, self.step)
                log.info("resumed from %s at step %d", target, self.step)
        else:
            seed_everything(cfg.train.seed + 1000 * (rank + 1))  # distinct sampling streams per rank
            if rank == 0:
                truncate_metrics(self.output_dir, 0)
        if dist.is_initialized():
            dist.barrier()

    # ----------------------------------------------------------------------------------------------- the loop
    def views_for_step(self, step: int) -> list[str]:
        if self.cfg.train.view_schedule == "sum":
            return list(self.data.views)
        return [self.data.view_for_step(step)]

    def train_step(self, stats: dict[str, float]) -> None:
        """One optimizer step: ``grad_accum`` micro-steps over the step's view(s)."""
        for _ in range(self.cfg.train.grad_accum):
            total = 0.0
            for view in self.views_for_step(self.step):
                t0 = time.perf_counter()
                batch = self.data.next_batch(view)
                stats["data_time"] += time.perf_counter() - t0
                samples, tokens = _batch_counts(batch)
                stats["samples"] += samples
                stats["tokens"] += tokens
                stats["flops"] += samples * self.flops_per_sample[view]
                out = self.engine(_to_device(batch, self.dist.device), view)
                for name, value in out.items():
                    _accumulate(stats, f"{view}/{name}", value.detach().float().item())
                total = total + out["loss"]
            _accumulate(stats, "loss", total.detach().float().item() / self.cfg.train.grad_accum)
            self.engine.backward(total)
            self.engine.step()
        self.step += 1

    def _scalars(self, stats: dict[str, float], elapsed: float) -> dict[str, float]:
        """Interval means, averaged over ranks. Every rank holds the same keys: views follow the step number."""
        world = self.dist.world_size
        keys = sorted(k[len("sum:") :] for k in stats if k.startswith("sum:"))
        values = torch.tensor([stats["sum:" + k] / stats["count:" + k] for k in keys], dtype=torch.float64)
        totals = torch.tensor(
            [stats["samples"], stats["tokens"], stats["flops"], stats["data_time"]], dtype=torch.float64
        )
        if dist.is_initialized() and world > 1:
            dist.all_reduce(values)
            values /= world
            dist.all_reduce(totals)
        out = {k: float(v) for k, v in zip(keys, values)}
        out["lr"] = float(self.scheduler.get_last_lr()[0])
        out["temp"] = float(self.model.clamped_temp().detach())
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            out["grad_norm"] = float(norm)
        out["samples_per_s"] = float(totals[0]) / elapsed
        out["tokens_per_s"] = float(totals[1]) / elapsed
        out["data_wait_frac"] = float(totals[3]) / world / elapsed
        peak = peak_flops(self.dist.device)
        if peak:
            out["mfu"] = float(totals[2]) / elapsed / (peak * world)
        skipped = self.data.skip_counts()
        out["skipped_samples"] = float(sum(skipped.values()))
        return out

    def run(self) -> dict[str, float]:
        cfg = self.cfg.train
        logger = RunLogger(self.output_dir, self.dist.rank, cfg.max_steps, self.step)
        stats: dict[str, float] = defaultdict(float)
        last: dict[str, float] = {}
        t_start = time.perf_counter()
        try:
            while self.step < cfg.max_steps:
                self.train_step(stats)
                logger.advance()
                evaluate = bool(cfg.eval_every) and self.step % cfg.eval_every == 0
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps or evaluate:
                    last = self._scalars(stats, time.perf_counter() - t_start)
                    if evaluate:
                        last.update(self.periodic_eval())
                    logger.log(self.step, last)
                    stats.clear()
                    t_start = time.perf_counter()
                if self.step % cfg.save_every == 0 or self.step == cfg.max_steps:
                    self.save()
        finally:
            logger.close()
            self.data.close()
        return last

    def save(self) -> Path:
        return checkpoint.save(
            self.engine,
            self.output_dir,
            self.step,
            self.dist.rank,
            to_dict(self.cfg),
            self.data.state_dict(),
            self.cfg.train.keep_last,
        )

    def periodic_eval(self) -> dict[str, float]:
        """Zero-shot retrieval on the held-out sets of ``eval.datasets`` (every rank scores a slice; ITC-only
        unless ``eval.periodic_rerank``); returns ``eval/<set>/<lang>/<metric>`` scalars."""
        from cclm.evaluation.run import evaluate_during_training

        return evaluate_during_training(
            self.model,
            self.eval_sets,
            self.tokenizer,
            self.cfg.eval,
            self.cfg.model.vision.image_size,
            self.dist.device,
        )


def pretrain(cfg) -> dict[str, float]:
    trainer = Trainer(cfg)
    return trainer.run()
