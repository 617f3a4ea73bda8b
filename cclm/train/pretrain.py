"""Pretraining, as a thin definition on the runtime's :class:`~cclm.runtime.trainer.Trainer`: the cross-view model,
the two-view data pipeline (image-caption and parallel text, drawn by weight or interleaved as the reference),
the CCLM objectives (the model's forward), and periodic zero-shot retrieval on held-out sets. The run's length is
``train.max_steps``, or ``train.epochs`` over the image-caption shards as the reference counts it. Everything is
validated before anything is written."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from cclm.config import (
    ConfigError,
    ModelConfig,
    PretrainConfig,
    check_pretrain_values,
    from_dict,
    require_complete,
    to_dict,
)
from cclm.errors import UserError
from cclm.model.text import token_limit
from cclm.runtime.checkpoint import resume_hint
from cclm.runtime.engine import configured_precision
from cclm.runtime.env import init_distributed, local_main_first, resolve_precision, seed_everything
from cclm.runtime.optim import multipliers
from cclm.runtime.output_dir import check_output_dir
from cclm.runtime.rank_writes import RankWrites
from cclm.runtime.schedule import views_per_iteration, warn_if_warmup_covers_run
from cclm.runtime.trainer import LoopSettings, Trainer
from cclm.train.flops import train_flops_per_sample
from cclm.train.run_length import train_max_steps

log = logging.getLogger("cclm.train")


def load_run_tokenizer(text_cfg) -> Any:
    """The tokenizer of ``model.text``: ``tokenizer``, else the encoder's own (``name_or_path``)."""
    from cclm.data.tokenize import load_tokenizer

    name = text_cfg.tokenizer or text_cfg.name_or_path
    if not name:
        raise ConfigError(
            "model.text.tokenizer must be set when model.text.name_or_path is null (random init)"
        )
    if not Path(name).exists() and "/" in name and name.startswith((".", "/")):
        raise ConfigError(f"model.text.tokenizer: folder {name} does not exist")
    return load_tokenizer(name)


def model_config_for(model_cfg, tokenizer) -> Any:
    """A copy of ``model_cfg`` whose vocabulary fits ``tokenizer`` (a random init takes the tokenizer's size)."""
    resolved = from_dict(ModelConfig, to_dict(model_cfg))
    encoder = resolved.text.encoder
    if not resolved.text.name_or_path:
        encoder["vocab_size"] = len(tokenizer)
    elif "vocab_size" in encoder and len(tokenizer) > encoder["vocab_size"]:
        raise ConfigError(f"tokenizer has {len(tokenizer)} tokens, more than model.text.encoder.vocab_size")
    return resolved


def check_text_positions(cfg: PretrainConfig, encoder_config) -> None:
    """Every token cap of the run against the text encoder's position table (``encoder_config``: its
    ``XLMRobertaConfig``). XLM-R numbers positions from ``pad_token_id + 1``, so a table of P rows holds
    P - pad_token_id - 1 tokens (514 -> 512); a longer text would index past the table at the first forward."""
    positions, limit = int(encoder_config.max_position_embeddings), token_limit(encoder_config)
    streams = {
        "data.image_caption": cfg.data.image_caption,
        "data.parallel_text": cfg.data.parallel_text,
        "data.regions": cfg.data.regions,
    }
    lengths = {"model.text.max_length": cfg.model.text.max_length}
    lengths |= {f"{k}.max_length": s.max_length for k, s in streams.items() if s is not None and s.max_length}
    for key, length in lengths.items():
        if int(length) > limit:
            raise ConfigError(
                f"{key}={length}: the text encoder has {positions} positions (at most {limit} tokens)"
            )


def check_periodic_evaluation(cfg: PretrainConfig) -> None:
    """``train.eval_every`` and ``eval.datasets`` work together: either alone is said (a warning), and a set that is
    not there is refused before anything is built (with ``eval_every=0`` too: the path is still a mistake)."""
    every, sets = int(cfg.train.eval_every), dict(cfg.eval.datasets)
    if every < 0:
        raise ConfigError(f"train.eval_every must be >= 0 (0: no periodic evaluation), got {every}")
    if every and not sets:  # the paper configs evaluate every 10,000 steps once the user names the sets
        log.warning(
            "train.eval_every=%d but eval.datasets names no held-out set: no periodic evaluation (set "
            "eval.datasets.NAME=FOLDER)",
            every,
        )
    if sets and not every:
        log.warning(
            "eval.datasets names %s but train.eval_every=0: no periodic evaluation (set train.eval_every=N)",
            ", ".join(sorted(sets)),
        )
    for name, folder in sets.items():
        if not Path(folder).expanduser().is_dir():
            raise ConfigError(f"eval.datasets.{name}: folder {folder} does not exist")


def check_run_config(cfg: PretrainConfig) -> None:
    """Every value the run can check before anything is built or written: a value that would only fail once the
    run has started (a batch size of 0, a negative number of loader workers) must not leave a run folder behind."""
    require_complete(cfg)
    train = cfg.train
    if train.max_steps <= 0 or train.save_every <= 0 or train.log_every <= 0:
        raise ConfigError("train.max_steps, train.save_every and train.log_every must be positive")
    if cfg.model.objectives.xlc_weight < 0:
        raise ConfigError(f"model.objectives.xlc_weight must be >= 0, got {cfg.model.objectives.xlc_weight}")
    check_pretrain_values(cfg)
    check_periodic_evaluation(cfg)


# A write error of the tokenizers library (Rust) arrives as a plain Exception: "... (os error 28)".
RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def save_tokenizer(tokenizer, folder: Path) -> None:
    """``tokenizer.save_pretrained`` into a temporary folder beside ``folder``, its files moved in only once all
    are written: a failed save (a full disk) leaves no truncated file in ``folder``. A write error is an OSError
    (the tokenizers library's own is turned into one)."""
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        try:
            tokenizer.save_pretrained(str(staging))
        except Exception as err:
            match = RUST_OS_ERROR.search(str(err))
            if isinstance(err, OSError) or match is None:
                raise
            code = int(match[1])
            raise OSError(code, os.strerror(code), str(staging)) from err
        folder.mkdir(exist_ok=True)
        for file in sorted(staging.iterdir()):
            os.replace(file, folder / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class Pretraining:
    """Builds the pretraining run from a :class:`cclm.config.PretrainConfig`; :meth:`run` trains it."""

    def __init__(self, cfg: PretrainConfig):
        check_run_config(cfg)
        train = cfg.train
        self.cfg = cfg
        check_output_dir(cfg.output_dir, cfg.resume, cfg.overwrite)  # before anything is built or written
        self.env = init_distributed(timeout_s=train.collective_timeout_s)
        with local_main_first():  # a Hub tokenizer is downloaded once per node
            self.tokenizer = load_run_tokenizer(cfg.model.text)
        model_cfg = model_config_for(cfg.model, self.tokenizer)
        if not model_cfg.text.name_or_path:  # a random init: its config alone gives the position table
            from transformers import XLMRobertaConfig

            check_text_positions(cfg, XLMRobertaConfig(**model_cfg.text.encoder))
        seed_everything(train.seed)  # identical initial weights on every rank

        from cclm.data.normalize import normalizer_for
        from cclm.data.pipeline import PretrainData
        from cclm.model import CrossViewModel
        from cclm.model.cross_view import initialise_from

        self.data = PretrainData(
            cfg.data,
            self.tokenizer,
            model_cfg.text.max_length,
            rank=self.env.rank,
            world_size=self.env.world_size,
            seed=train.seed,
            image_size=model_cfg.vision.image_size,
            normalizer=normalizer_for(model_cfg.text),
            view_schedule=train.view_schedule,
            parallel_with_regions=model_cfg.objectives.xlc_weight > 0,
        )
        per_iteration = views_per_iteration(train.view_schedule, self.data.views)
        max_steps = train_max_steps(train, cfg.data, self.env.world_size, self.data.views)
        if max_steps != train.max_steps:
            log.info("train.epochs=%s: %d optimizer updates", train.epochs, max_steps)
            train.max_steps = max_steps  # the run config records the length the run trains for
        warn_if_warmup_covers_run(train.scheduler, max_steps, per_iteration)
        # the run config records the precision the run trains in (auto and a config file's made concrete)
        cfg.deepspeed.precision = resolve_precision(self.env.device, configured_precision(cfg.deepspeed))
        self.eval_sets = {}
        if train.eval_every:
            from cclm.evaluation.run import load_periodic_sets

            self.eval_sets = load_periodic_sets(cfg.eval)
        model = CrossViewModel(model_cfg)
        # a pretrained encoder's table is known once it is loaded
        check_text_positions(cfg, model.text.config)
        if cfg.init_from:
            fresh = initialise_from(model, cfg.init_from)
            log.info(
                "init_from %s: weights loaded; %d tensors start fresh%s",
                cfg.init_from,
                len(fresh),
                f" ({', '.join(fresh[:6])}{', ...' if len(fresh) > 6 else ''})" if fresh else "",
            )
        regions = cfg.data.regions
        # with data.regions.prob = 1 every image step is a region batch: the image view never runs
        counted = [
            v for v in self.data.views if not (v == "image" and regions is not None and regions.prob >= 1)
        ]
        if regions is not None:
            counted.append("region")
            if not model_cfg.objectives.bbox:
                log.warning(
                    "data.regions without model.objectives.bbox: region batches train ITC/ITM/MLM but no box head"
                )
        flops = {
            view: train_flops_per_sample(
                model, view, self.data.max_lengths[view], model_cfg.vision.image_size
            )
            for view in counted
        }
        self.trainer = Trainer(
            model,
            self.data,
            LoopSettings.from_train_config(train, desc="pretrain"),
            env=self.env,
            optimizer_cfg=train.optimizer,
            scheduler_cfg=train.scheduler,
            deepspeed_cfg=cfg.deepspeed,
            micro_batch=self._stream_batch_size(self.data.views[0]),
            output_dir=cfg.output_dir,
            lr_mults=multipliers(model.new_parameter_names(), train.optimizer.new_param_lr_mult),
            run_config={
                **to_dict(cfg),
                "model": to_dict(model.cfg),
            },  # the resolved model: export rebuilds it
            evaluate=self.periodic_eval if self.eval_sets else None,
            flops_per_sample=flops,
            resume=cfg.resume,
            overwrite=cfg.overwrite,
        )
        self.model = self.trainer.model
        self._save_tokenizer(Path(cfg.output_dir) / "tokenizer")
        if self.trainer.step == 0:
            seed_everything(train.seed + 1000 * (self.env.rank + 1))  # distinct sampling streams per rank

    def _save_tokenizer(self, folder: Path) -> None:
        """Rank 0 saves the tokenizer; a write that fails stops every rank with one line naming the folder and
        the cause (:class:`RankWrites`: the other ranks would otherwise wait for it in the first step)."""
        writes = RankWrites()
        if self.env.is_main:
            writes.run(save_tokenizer, self.tokenizer, folder)
        failure = writes.failure()  # a collective
        if failure is not None:
            self.trainer.close()
            raise UserError(
                f"tokenizer folder {folder} could not be written ({failure}); {resume_hint(folder.parent)}"
            ) from writes.error

    def _stream(self, view: str) -> Any:
        return self.cfg.data.image_caption if view == "image" else self.cfg.data.parallel_text

    def _stream_batch_size(self, view: str) -> int:
        return int(self._stream(view).batch_size)

    def periodic_eval(self, model) -> dict[str, float]:
        """Zero-shot retrieval on the held-out sets of ``eval.datasets`` (every rank scores a slice; ITC-only
        unless ``eval.periodic_rerank``); returns ``eval/<set>/<lang>/<metric>`` scalars."""
        from cclm.evaluation.run import evaluate_during_training

        return evaluate_during_training(
            model,
            self.eval_sets,
            self.tokenizer,
            self.cfg.eval,
            int(model.cfg.vision.image_size),
            self.env.device,
        )

    def run(self) -> dict[str, float]:
        try:
            return self.trainer.run()
        finally:
            self.trainer.close()


def pretrain(cfg: PretrainConfig) -> dict[str, float]:
    return Pretraining(cfg).run()
