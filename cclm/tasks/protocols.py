"""IGLUE's protocols on top of the shared loop.

- zero-shot: fine-tune on English (``data.train``), select on the English dev set (``data.dev``), save the task
  model to ``<output_dir>/model`` and evaluate it on every ``data.test`` language (and, when configured, on the
  machine-translated ``data.translate_test`` files: the translate-test protocol needs no other training);
- few-shot: for each language of ``data.few_shot_train`` and each of its files (a value may be a brace pattern,
  ``.../train_{1,5,10,20,25,48}.jsonl``: one run per shot count), continue from ``checkpoint`` (the English
  fine-tuned model) once per learning rate of ``train.lr_sweep``; the run with the best selection score is
  evaluated on that language's test file. Selection (``train.select_on``) is on the dev set by default
  (``data.few_shot_dev.<lang>``, else the English ``data.dev``, as IGLUE); ``test`` selects on the language's test
  file, as the CCLM reference's few-shot configs do: such tables are named ``..._selected_on_test`` and labelled
  in their header, title and rows. A few-shot training image that is also in the test file is an error (xGQA's
  few-shot images come from testdev: its runs test on the few-shot split's ``test.json``, as IGLUE's all do).
  Each run folder's ``sweep.json`` (:class:`SweepRecord`) records the finished learning rates and the scored row:
  a requeued sweep (``resume=auto``) skips them, with or without checkpoints;
- translate-test / zero-shot evaluation of an existing task model: :func:`evaluate_checkpoint`.

Retrieval files are grouped into image entries as ``data.duplicate_images`` says
(:func:`cclm.tasks.iglue_retrieval.with_duplicate_images`) when they are read.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import braceexpand
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from cclm.config import (
    CONFIG_ROOT,
    ConfigError,
    DuplicateImages,
    FinetuneConfig,
    ModelConfig,
    Precision,
    Protocol,
    SelectOn,
    load_config,
    to_dict,
)
from cclm.data.normalize import normalizer_for
from cclm.data.tokenize import load_tokenizer, train_tokenizer
from cclm.errors import UserError
from cclm.jsonl import read_json
from cclm.model.cross_view import CrossViewModel, check_tokenizer_fits
from cclm.runtime.checkpoint import latest_checkpoint, tied_aliases
from cclm.runtime.config_changes import config_changes, named
from cclm.runtime.env import (
    DistEnv,
    barrier,
    init_distributed,
    local_main_first,
    resolve_precision,
    seed_everything,
)
from cclm.runtime.output_dir import check_output_dir, claim_output_dir, holds_run
from cclm.runtime.run_lock import hold_output_dir
from cclm.runtime.sources import EpochBatches
from cclm.runtime.stop_signal import holds_stop_signal
from cclm.runtime.trainer import BEST_DIR, BEST_WEIGHTS, Selection
from cclm.tasks import domain_pretrain, get_task, iglue_retrieval
from cclm.tasks.annotations import AnnotationError
from cclm.tasks.batching import ClassificationDataset, TaskBatches, TaskCollator, training_dataset
from cclm.tasks.finetune import FinetuneSettings, finetune, predict, prepare_answers
from cclm.tasks.images import TaskAugment, require_images
from cclm.tasks.metrics import accuracy
from cclm.tasks.results import (
    merged_rows,
    other_models,
    other_scoring,
    read_task_table,
    set_aside_table,
    table_path,
    write_task_results,
)
from cclm.tasks.task_data import ClassificationData, RetrievalData, no_usable_example
from cclm.tasks.task_model import TaskModel

log = logging.getLogger(__name__)
TaskData = ClassificationData | RetrievalData
# the fine-tuning switches a task model was trained with, in its task.json and in each result row
SWITCHES = "fine_tuning"
# in a zero-shot run's config.json: the head_init its head was initialised under
APPLIED_HEAD_INIT = "head_init_applied"


class TaskSuite:
    """A task's files and scores: reading annotations, the label vocabulary, the images, and a model's metrics.

    ``data_cfg`` needs ``image_roots``, ``label_vocab`` and ``max_examples`` (a fine-tuning or cViL data
    section)."""

    def __init__(
        self,
        task: str,
        data_cfg,
        *,
        env: DistEnv,
        precision: Precision | str = Precision.auto,
        eval_batch_size: int = 64,
        k_test: int = 128,
        num_workers: int = 0,
        first_token_twice: bool = False,
    ):
        self.task_name = str(task)
        self.task = get_task(self.task_name)
        self.kind = self.task.KIND
        self.data_cfg = data_cfg
        self.env, self.device, self.precision = env, env.device, precision
        self.eval_batch_size, self.k_test, self.num_workers = (
            int(eval_batch_size),
            int(k_test),
            int(num_workers),
        )
        self.first_token_twice = bool(
            first_token_twice
        )  # the answer decoder's ranking (eval.first_token_twice)
        self.roots = dict(data_cfg.image_roots)
        # retrieval: what lines sharing an image are (a cViL data section has no such key: IGLUE's)
        self.duplicates = DuplicateImages(str(getattr(data_cfg, "duplicate_images", DuplicateImages.iglue)))
        self._labels: list[str] | None = None

    # ------------------------------------------------------------------------------------------------ data
    def label_names(self) -> list[str]:
        if self.kind == "retrieval":
            return []
        if self._labels is None:
            self._labels = self.task.labels(self.data_cfg)
        return self._labels

    def read(self, path: str) -> TaskData:
        """The examples of ``path``; retrieval lines grouped into image entries (``data.duplicate_images``)."""
        data = self.task.read(path, self.label_names() or None, self.data_cfg.max_examples)
        for reason, count in data.skipped.items():
            log.warning("%s: skipped %d record(s): %s", path, count, reason)
        if not data.usable:  # found now, not as a crash after training
            raise AnnotationError(f"{path}: {no_usable_example(data)}")
        if isinstance(data, RetrievalData):
            lines = len(data.images)
            data = iglue_retrieval.with_duplicate_images(self.task, data, self.duplicates)
            if len(data.images) < lines:
                log.info(
                    "%s: %d image entries of %d read, grouped as data.duplicate_images=%s says",
                    path,
                    len(data.images),
                    lines,
                    self.duplicates,
                )
        return data

    def read_all(self, paths: Sequence[str]) -> list[TaskData]:
        return [self.read(path) for path in paths]

    def check_images(self, datas: Sequence[TaskData]) -> None:
        require_images((ref for data in datas for ref in data.used_image_refs), self.roots)

    # -------------------------------------------------------------------------------------------- scoring
    def collator(self, model: TaskModel, tokenizer) -> TaskCollator:
        """Batches for ``model``: its text normaliser (``model.backbone.cfg.text.normalize``) and max length, or
        the task's shorter ``data.max_length``."""
        max_length = int(getattr(self.data_cfg, "max_length", 0) or 0)
        return TaskCollator.for_model(model.backbone, tokenizer, max_length)

    def image_size(self, model: TaskModel) -> int:
        return int(model.backbone.cfg.vision.image_size)

    def score(self, model: TaskModel, tokenizer, data: TaskData) -> dict:
        model.to(self.device)
        size, collator, batch_size = (
            self.image_size(model),
            self.collator(model, tokenizer),
            self.eval_batch_size,
        )
        if self.kind == "retrieval":
            metrics = iglue_retrieval.score_retrieval(
                model,
                data,
                self.roots,
                tokenizer,
                size,
                k_test=self.k_test,
                batch_size=batch_size,
                precision=self.precision,
                device=self.device,
                num_workers=self.num_workers,
            )
            return {**metrics, "images": len(data.images), "captions": len(data.texts)}
        loader = DataLoader(
            ClassificationDataset(data.examples, self.roots, size),
            batch_size=batch_size,
            collate_fn=collator,
            num_workers=self.num_workers,
        )
        predictions, labels = predict(
            model, loader, self.device, self.precision, self.k_test, self.first_token_twice
        )
        return {
            "accuracy": accuracy(predictions, labels),
            "examples": len(labels),
            "skipped": sum(data.skipped.values()),
        }

    def scoring_settings(self) -> dict:
        """The settings besides the model that decide a row's numbers, recorded in each row (``scoring``): rows
        are kept in one table (and averaged) only when these are equal. Batch sizes and workers do not change
        the numbers; the precision the device resolves to does."""
        settings = {
            "max_examples": int(self.data_cfg.max_examples),
            "max_length": int(getattr(self.data_cfg, "max_length", 0) or 0),
            "precision": resolve_precision(self.device, self.precision).value,
            "k_test": self.k_test,
        }
        if self.kind == "retrieval":
            settings["duplicate_images"] = str(self.duplicates)
        else:
            settings["first_token_twice"] = self.first_token_twice
        return settings

    def main_score(self, metrics: dict) -> float:
        """What selection maximises: accuracy, the task's ``MAIN_METRIC`` (Multi30K/MSCOCO: ``r_mean``, as the
        CCLM paper reports them), else the mean of IGLUE's two R@1."""
        if self.kind != "retrieval":
            return metrics["accuracy"]
        main = getattr(self.task, "MAIN_METRIC", None)
        if main:
            return metrics[main]
        return (metrics[iglue_retrieval.IR_R1] + metrics[iglue_retrieval.TR_R1]) / 2

    def columns(self) -> tuple[list[str], list[str]]:
        if self.kind == "retrieval":
            columns = getattr(self.task, "COLUMNS", (iglue_retrieval.IR_R1, iglue_retrieval.TR_R1))
            return list(columns), ["images", "captions"]
        return ["accuracy"], ["examples", "skipped"]


class TaskRunner(TaskSuite):
    """A fine-tuning config on top of its task: starting or loading models, training, result tables."""

    def __init__(self, cfg: FinetuneConfig):
        select_languages(cfg)
        env = init_distributed(cfg.train.device)
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        super().__init__(
            cfg.task,
            cfg.data,
            env=env,
            precision=cfg.deepspeed.precision or Precision.auto,
            eval_batch_size=cfg.eval.batch_size,
            k_test=cfg.eval.k_test,
            num_workers=cfg.train.num_workers,
            first_token_twice=cfg.eval.first_token_twice,
        )
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        # whether this run's trainers may move an old run aside; False once the protocol claimed the folder
        self.overwrite = bool(cfg.overwrite)

    # ---------------------------------------------------------------------------------------------- models
    def start_model(self, train_datas: Sequence[TaskData]) -> tuple[TaskModel, object]:
        """The zero-shot starting point: a pretrained cclm folder, or a random init from ``model`` (a yaml)."""
        cfg = self.cfg
        if cfg.pretrained:
            backbone = CrossViewModel.from_pretrained(cfg.pretrained)
            with local_main_first():  # a Hub tokenizer is downloaded once per node
                tokenizer = load_tokenizer(cfg.tokenizer or cfg.pretrained)
            check_tokenizer_fits(backbone, tokenizer, cfg.pretrained, cfg.tokenizer or cfg.pretrained)
        else:
            if not cfg.model:
                raise ValueError(
                    "set 'pretrained' (a cclm model folder) or 'model' (a model yaml for random init)"
                )
            model_cfg = load_config(ModelConfig, _model_yaml(cfg.model), list(cfg.model_overrides))
            if cfg.tokenizer:
                with local_main_first():
                    tokenizer = load_tokenizer(cfg.tokenizer)
            else:  # random init: a tokenizer trained on the training texts, saved with the model
                folder = self.output_dir / "tokenizer"
                if self.env.is_main:  # one rank trains and writes it; the others read what it wrote
                    # on the texts as the model will read them (model.text.normalize)
                    normalize = normalizer_for(model_cfg.text)
                    texts = [normalize(t) for data in train_datas for t in _texts(data)]
                    vocab = int(model_cfg.text.encoder.get("vocab_size", 1000))
                    train_tokenizer(texts, folder, vocab_size=vocab)
                barrier()
                tokenizer = load_tokenizer(str(folder))
            model_cfg.text.encoder["vocab_size"] = len(tokenizer)
            log.warning("no pretrained model: fine-tuning a randomly initialised %s", cfg.model)
            if cfg.image_size > 0:
                log.warning(
                    "image_size=%d applies to a pretrained model; a random init takes its size from the model "
                    "config (model_overrides: vision.image_size=..., vision.tower.image_size=...)",
                    cfg.image_size,
                )
            backbone = CrossViewModel(model_cfg)
        model = TaskModel(
            backbone,
            self.cfg.task,
            self.kind,
            self.label_names(),
            head=str(cfg.head),
            head_init=cfg.head_init,
        )
        if domain_pretrain.enabled(cfg):  # at the pretrained size, as the reference (224 px, then 384)
            model = domain_pretrain.domain_pretrain(model, tokenizer, cfg, self.env, overwrite=self.overwrite)
        if cfg.pretrained and cfg.image_size > 0:
            # fine-tune at another resolution (the reference: 384 px, Swin window 12)
            from cclm.model.resize import resize_vision

            resize_vision(model.backbone, cfg.image_size, cfg.window_size or None)
        return model, tokenizer

    def load_checkpoint(self, directory: str) -> tuple[TaskModel, object]:
        model = TaskModel.load(directory)
        if model.task != self.cfg.task and get_task(model.task) is not self.task:
            raise ValueError(f"{directory} was fine-tuned for '{model.task}', not '{self.cfg.task}'")
        if self.kind != "retrieval" and model.label_names != self.label_names():
            raise ValueError(f"{directory}: its labels differ from this task's label vocabulary")
        tokenizer = load_tokenizer(directory)
        check_tokenizer_fits(model.backbone, tokenizer, directory, directory)
        return model, tokenizer

    # ------------------------------------------------------------------------------------------- training
    def train_batches(self, datas: Sequence[TaskData], model: TaskModel, tokenizer) -> EpochBatches:
        """Training batches of ``datas``, their images augmented as ``data.augment`` says (dev and test never)."""
        size, t = self.image_size(model), self.cfg.train
        side_words = getattr(self.task, "REFERENCE_SIDE_WORDS", ())
        augment = TaskAugment.from_config(self.cfg.data, size, t.seed, self.label_names(), side_words)
        dataset = training_dataset(self.kind, datas, self.roots, size, augment)
        return TaskBatches(
            dataset,
            t.batch_size,
            self.collator(model, tokenizer),
            seed=t.seed,
            rank=self.env.rank,
            world_size=self.env.world_size,
            # contrastive batches need their full size (a last batch of 1 has no negative)
            drop_last=self.kind == "retrieval" and len(dataset) > t.batch_size,
            num_workers=t.num_workers,
        )

    def settings(self, lr: float) -> FinetuneSettings:
        return FinetuneSettings.from_train_config(self.cfg.train, lr)

    def train(
        self,
        model: TaskModel,
        tokenizer,
        train_datas,
        dev_datas,
        lr: float,
        output_dir: Path,
        run_info: Mapping | None = None,
    ) -> tuple[TaskModel, Selection]:
        """Fine-tune ``model`` at ``lr`` into ``output_dir`` (metrics, checkpoints); returns the model selected on
        ``dev_datas`` (the dev files; few-shot with ``train.select_on=test``: the test file) and the selection.
        ``run_info`` joins the configuration saved with the run (``config.json``)."""
        if not dev_datas:
            raise ValueError("model selection needs a dev set: set data.dev (never a test file)")
        return finetune(
            model,
            self.train_batches(train_datas, model, tokenizer),
            lambda m: sum(self.main_score(self.score(m, tokenizer, d)) for d in dev_datas) / len(dev_datas),
            self.settings(lr),
            env=self.env,
            output_dir=output_dir,
            deepspeed_cfg=self.cfg.deepspeed,
            run_config={**to_dict(self.cfg), **dict(run_info or {})},
            resume=self.cfg.resume,
            overwrite=self.overwrite,
        )

    def claim_output_dir(self):
        """Claim ``output_dir`` for the whole run (every rank calls it), before its first stage writes: an old run
        there (a finished domain-pretraining stage too) is moved aside once, with ``overwrite``, and the run's
        trainers then move nothing. Returns the main rank's lock on the folder, held until released."""
        cfg, stages = self.cfg, (domain_pretrain.STAGE,)
        lock = hold_output_dir(
            self.output_dir,
            self.env.is_main,
            lambda: claim_output_dir(self.output_dir, cfg.resume, cfg.overwrite, stages=stages),
        )
        self.overwrite = False
        return lock

    def table(
        self, model: TaskModel, tokenizer, files: Mapping[str, str], protocol: str, model_dir: Path
    ) -> dict:
        """Score ``model`` (saved in ``model_dir``) on ``files`` (language -> file) and write the table."""
        rows = []
        for language, path in files.items():
            log.info("%s %s %s: scoring %s", self.cfg.task, protocol, language, path)
            metrics = self.score(model, tokenizer, self.read(path))
            rows.append({"language": language, **metrics, "file": str(path)})
            log.info("%s %s %s: %.2f", self.cfg.task, protocol, language, self.main_score(metrics))
        columns, extra = self.columns()
        if self.env.is_main:
            source = {
                "model": str(model_dir),
                "model_digest": TaskModel.weights_digest(model_dir),
                "scoring": self.scoring_settings(),
                SWITCHES: _recorded_switches(model_dir) or None,
            }
            rows = self.with_earlier_rows(protocol, [{**row, **source} for row in rows], "model")
        return write_task_results(
            self.output_dir, str(self.cfg.task), protocol, rows, columns, extra, write=self.env.is_main
        )

    def table_conflict(self, name: str, model_key: str, digest: str) -> str | None:
        """Why table ``name`` already under ``output_dir`` cannot take rows of weights ``digest`` (``model_key``:
        ``model``, the scored model, or few-shot ``checkpoint``, the model every language started from) scored
        with this run's settings: it holds rows of other weights, or rows scored otherwise. None when it can."""
        old = read_task_table(self.output_dir, str(self.cfg.task), name)
        if old is None:
            return None
        others = other_models(old, digest, model_key)
        if others:
            started = "fine-tuned from another model" if model_key == "checkpoint" else "of another model"
            return f"holds rows {started} ({', '.join(others)})"
        scored = other_scoring(old, self.scoring_settings())
        return f"holds rows scored with other settings ({scored})" if scored else None

    def check_table(self, name: str, model_key: str, digest: str) -> None:
        """Refuse, before anything runs, a table that this run's rows could not join (:meth:`table_conflict`),
        unless ``overwrite`` (it is then moved aside when the rows are written)."""
        reason = self.table_conflict(name, model_key, digest)
        if reason and not self.cfg.overwrite:
            raise UserError(
                f"{table_path(self.output_dir, str(self.cfg.task), name)} {reason}: overwrite=true moves it aside "
                f"({name}.old-<time>.*), or set another output_dir"
            )

    def with_earlier_rows(self, name: str, rows: list[dict], model_key: str) -> list[dict]:
        """``rows`` with the other rows of table ``name`` already under ``output_dir`` (main rank): rows of the same
        weights (``model_key``: ``model``; few-shot: ``checkpoint``, a model per language from one English
        model) scored with the same settings are kept, except those of the languages run again; a table that
        :meth:`table_conflict` refuses is moved aside."""
        task = str(self.cfg.task)
        old = read_task_table(self.output_dir, task, name)
        if old is None:
            return rows
        reason = self.table_conflict(name, model_key, rows[0][f"{model_key}_digest"])
        if reason:
            aside = set_aside_table(self.output_dir, task, name)
            log.warning("%s %s; moved to %s", table_path(self.output_dir, task, name), reason, aside)
            return rows
        return merged_rows(old["rows"], rows)

    def applied_head_init(self) -> str:
        """The ``head_init`` this run's head is initialised under: the config's, except in a run resumed from a
        checkpoint, which loads its head: a changed value cannot apply, and is warned about."""
        cfg = self.cfg
        target = None
        if cfg.resume:
            target = latest_checkpoint(self.output_dir) if cfg.resume == "auto" else Path(cfg.resume)
        config_file = target / "config.json" if target is not None else None
        if config_file is None or not config_file.is_file():
            return str(cfg.head_init)
        saved = read_json(config_file)
        applied = str(saved.get(APPLIED_HEAD_INIT, saved.get("head_init", cfg.head_init)))
        if applied != str(cfg.head_init) and self.env.is_main:
            log.warning(
                "head_init=%s does not apply to this resumed run: its head was initialised under head_init=%s "
                "(%s records it as %s)",
                cfg.head_init,
                applied,
                self.output_dir / "config.json",
                APPLIED_HEAD_INIT,
            )
        return applied

    def switches(self, head_init=None) -> dict:
        """The fine-tuning switches of this run, recorded with its model and rows; ``head_init``: the value the
        head was really initialised under, where it is not this config's (a resumed run, a few-shot run)."""
        cfg = self.cfg
        return {
            "data.hflip_careful": bool(cfg.data.hflip_careful),
            "train.decay_rule": str(cfg.train.decay_rule),
            "head_init": str(head_init if head_init is not None else cfg.head_init),
        }


# ------------------------------------------------------------------------------------------------ protocols
LANGUAGE_KEYS = ("test", "translate_test", "few_shot_train", "few_shot_dev")


def select_languages(cfg: FinetuneConfig) -> None:
    """``languages=[de,ja]``: keep only those languages' files under ``data.test``, ``translate_test``,
    ``few_shot_train`` and ``few_shot_dev`` (the English training and dev files stay); a language the config
    names no file for is refused."""
    wanted = [str(language) for language in cfg.languages]
    if not wanted:
        return
    named = sorted({language for key in LANGUAGE_KEYS for language in getattr(cfg.data, key)})
    unknown = [language for language in wanted if language not in named]
    if unknown:
        raise ConfigError(
            f"languages: {', '.join(unknown)} not named by this config's files (it has: {', '.join(named)})"
        )
    tested = sorted({language for key in ("test", "translate_test") for language in getattr(cfg.data, key)})
    for key in LANGUAGE_KEYS:
        files = getattr(cfg.data, key)
        setattr(cfg.data, key, {language: path for language, path in files.items() if language in wanted})
    if cfg.protocol == Protocol.zero_shot and tested and not (cfg.data.test or cfg.data.translate_test):
        raise ConfigError(
            f"languages: {', '.join(wanted)} has no test file in this config (it tests {', '.join(tested)}): "
            "the zero-shot run would report nothing"
        )


def _texts(data: TaskData) -> list[str]:
    return list(data.texts) if isinstance(data, RetrievalData) else [e.text for e in data.examples]


def _model_yaml(name: str) -> Path:
    """A model yaml path, or a name under configs/model/ (``tiny``, ``base``)."""
    return Path(name) if name.endswith((".yaml", ".yml")) else CONFIG_ROOT / "model" / f"{name}.yaml"


@holds_stop_signal  # NLVR domain pretraining, then fine-tuning: a signal between them is kept
def run_zero_shot(cfg: FinetuneConfig) -> dict:
    # before anything is read or written
    check_output_dir(cfg.output_dir, cfg.resume, cfg.overwrite, stages=(domain_pretrain.STAGE,))
    if SelectOn(str(cfg.train.select_on)) != SelectOn.dev:
        raise ValueError(
            "train.select_on=test is the reference's few-shot selection (protocol=few_shot); zero-shot fine-tuning "
            "selects on the English dev set (data.dev)"
        )
    runner = TaskRunner(cfg)
    domain_pretrain.check(cfg, runner.kind)
    train_datas, dev_datas = runner.read_all(cfg.data.train), runner.read_all(cfg.data.dev)
    if not train_datas:
        raise ValueError("config key 'data.train' must list the English training file(s)")
    runner.check_images(
        [
            *train_datas,
            *dev_datas,
            *runner.read_all([*cfg.data.test.values(), *cfg.data.translate_test.values()]),
        ]
    )
    lock = runner.claim_output_dir()
    try:
        return _zero_shot(runner, train_datas, dev_datas)
    finally:
        if lock is not None:
            lock.release()


# Keys a rerun of a finished zero-shot run may change and still score its model instead of training anew: what
# is scored and how the run is started and logged.
RESCORING_KEYS = (
    "resume",
    "overwrite",
    "languages",
    "data.test",
    "data.translate_test",
    "data.num_workers",
    "eval",
    "train.log_every",
    "train.progress_bar",
    APPLIED_HEAD_INIT,
)


def _finished_model(runner: TaskRunner) -> Path | None:
    """With ``resume=auto``: the model of a run whose training finished (``model/`` saved) without a checkpoint to
    resume (the default ``train.save_every=0``), when this config trains what it trained. Such a run stopped
    while scoring; training it again from step 0 would throw its training away. Refused in one line when the
    config changed a key that shapes the training."""
    cfg, model_dir = runner.cfg, runner.output_dir / "model"
    if cfg.resume != "auto" or latest_checkpoint(runner.output_dir) is not None:
        return None
    if not (model_dir / "task.json").is_file():
        return None
    saved = runner.output_dir / "config.json"
    changes = config_changes(read_json(saved), to_dict(cfg)) if saved.is_file() else {}
    changes = {
        key: change
        for key, change in changes.items()
        if not any(key == free or key.startswith(free + ".") for free in RESCORING_KEYS)
    }
    if changes:
        raise ConfigError(
            f"resume=auto: {model_dir} holds this run's finished model, trained with other settings "
            f"({named(changes)}) and without a checkpoint to resume: put back its values to score it, or train "
            "anew with overwrite=true (the old run is moved aside)"
        )
    return model_dir


def _zero_shot(runner: TaskRunner, train_datas, dev_datas) -> dict:
    cfg = runner.cfg
    finished = _finished_model(runner)
    if finished is not None:
        log.warning(
            "resume=auto: %s holds this run's finished model: scoring it, not training again", finished
        )
        model, tokenizer = runner.load_checkpoint(str(finished))
        return _score_zero_shot(runner, model, tokenizer, finished)
    head_init = runner.applied_head_init()
    seed_everything(cfg.train.seed)
    model, tokenizer = runner.start_model(train_datas)
    model, selection = runner.train(
        model,
        tokenizer,
        train_datas,
        dev_datas,
        cfg.train.lr,
        runner.output_dir,
        run_info={APPLIED_HEAD_INIT: head_init},
    )
    info = {
        "selection": {"dev": selection.best_score, "step": selection.best_step, "steps": selection.steps},
        SWITCHES: runner.switches(head_init),
    }
    model_dir = runner.output_dir / "model"
    if runner.env.is_main:
        model.save(model_dir, tokenizer, extra=info)
        (runner.output_dir / "train_history.json").write_text(json.dumps(selection.history, indent=2))
    return _score_zero_shot(runner, model, tokenizer, model_dir)


def _score_zero_shot(runner: TaskRunner, model: TaskModel, tokenizer, model_dir: Path) -> dict:
    cfg = runner.cfg
    tables = {}
    if cfg.data.test:
        tables["zero_shot"] = runner.table(model, tokenizer, cfg.data.test, "zero_shot", model_dir)
    if cfg.data.translate_test:
        tables["translate_test"] = runner.table(
            model, tokenizer, cfg.data.translate_test, "translate_test", model_dir
        )
    if runner.env.is_main and tables:
        record_results(model_dir, model, tables)
    return tables


def record_results(folder: Path, model: TaskModel, tables: Mapping[str, dict]) -> None:
    """The test tables of a saved task model into its folder and model card (:meth:`TaskModel.record_results`):
    {table: {language: {metric: value}}}."""
    results = {
        name: {row["language"]: {m: row[m] for m in table["metrics"] if m in row} for row in table["rows"]}
        for name, table in tables.items()
    }
    model.record_results(folder, results)


# ------------------------------------------------------------------------------------------------- few-shot
_SHOTS = re.compile(r"train_?(\d+(?:x\d+)?)$")
SELECTED_ON_TEST = "selected_on_test"  # the suffix of test-selected few-shot tables and folders


@dataclass(frozen=True)
class FewShotRun:
    """One few-shot training file of one language: ``shots`` is IGLUE's name of its size (``48``, ``10x2``)."""

    language: str
    shots: str
    train_path: str


def shots_of(path: str | Path) -> str:
    """The shot count in an IGLUE few-shot file name (``train_48.jsonl`` -> ``48``, ``marvl-id_train10x2.jsonl``
    -> ``10x2``, ``train_100x5.jsonl`` -> ``100x5``); another name gives its stem."""
    stem = Path(path).name.split(".")[0]
    match = _SHOTS.search(stem)
    return match.group(1) if match else stem


def few_shot_runs(data_cfg) -> list[FewShotRun]:
    """The runs of ``data.few_shot_train`` (language -> file or brace pattern of files), in the configured order
    of languages and, within one, of the pattern's alternatives."""
    runs = []
    for language, spec in data_cfg.few_shot_train.items():
        seen: dict[str, str] = {}
        for path in braceexpand.braceexpand(str(spec)):
            shots = shots_of(path)
            if shots in seen:
                raise ValueError(
                    f"data.few_shot_train.{language}: {seen[shots]} and {path} are both {shots}-shot files"
                )
            seen[shots] = path
            runs.append(FewShotRun(str(language), shots, path))
    return runs


FEW_SHOT_RUN = "few_shot_run"  # the run's language, shot count and training file, in its saved config.json


def _check_run_folder(folder: Path, run: FewShotRun, cfg: FinetuneConfig) -> None:
    """A few-shot run folder the sweep may write: a fresh run needs ``overwrite`` to replace one, and a resumed
    one must have been trained on the same file (a run folder is per language, and per shot count only when the
    sweep has several)."""
    check_output_dir(folder, cfg.resume, cfg.overwrite)
    saved_config = folder / "config.json"
    if not cfg.resume or not holds_run(folder) or not saved_config.is_file():
        return
    saved = read_json(saved_config).get(FEW_SHOT_RUN) or {}
    trained_on = saved.get("train")
    if trained_on and Path(trained_on).name != Path(run.train_path).name:
        raise ConfigError(
            f"resume: {folder} was trained on {trained_on} ({saved.get('shots')} shots), not {run.train_path}; "
            "resume it with that file, or start this one with overwrite=true or another output_dir"
        )


def few_shot_files(data_cfg) -> list[str]:
    """Every few-shot training file that ``data.few_shot_train`` names (its brace patterns expanded)."""
    return [run.train_path for run in few_shot_runs(data_cfg)]


def _check_no_test_images(run: FewShotRun, train: TaskData, test: TaskData, test_path: str) -> None:
    """A few-shot training image that the test file also holds would be tested on: refuse it."""
    shared = train.used_image_refs & test.used_image_refs
    if shared:
        example = sorted(shared, key=lambda ref: (str(ref.root), ref.path))[0]
        raise ValueError(
            f"few-shot {run.language} ({run.shots} shots): {len(shared)} image(s) of {run.train_path} are also in "
            f"the test file {test_path} (e.g. {example.path}); test on a split without the few-shot images "
            "(xGQA: the few-shot split's test.json, as configs/finetune/xgqa.yaml, not the full testdev)"
        )


@holds_stop_signal
def run_few_shot(cfg: FinetuneConfig) -> dict:
    runner = TaskRunner(cfg)
    if not cfg.checkpoint:
        raise ValueError("few-shot continues from the English fine-tuned model: set 'checkpoint'")
    if not cfg.data.few_shot_train:
        raise ValueError("config key 'data.few_shot_train' must map languages to train_<N> files")
    if not cfg.train.lr_sweep:
        raise ValueError("config key 'train.lr_sweep' must list at least one learning rate")
    select_on = SelectOn(str(cfg.train.select_on))
    on_test = select_on == SelectOn.test
    if on_test:
        log.warning(
            "few-shot with train.select_on=test: the learning rate and step are selected on each language's TEST "
            "file (the CCLM reference's few-shot protocol); the tables are named *_%s and are not held-out "
            "numbers",
            SELECTED_ON_TEST,
        )
    runs = few_shot_runs(cfg.data)
    several = len({run.shots for run in runs}) > 1  # one table (and folder level) per shot count
    root = runner.output_dir / ("few_shot" + (f"_{SELECTED_ON_TEST}" if on_test else ""))
    folders = {run: root / run.language / (run.shots if several else "") for run in runs}
    for run, folder in folders.items():  # every run folder, before anything is read or trained
        for lr in cfg.train.lr_sweep:
            _check_run_folder(folder / f"lr_{float(lr):g}", run, cfg)
    read_files: dict[str, TaskData] = {}

    def read(path: str) -> TaskData:
        if path not in read_files:
            read_files[path] = runner.read(path)
        return read_files[path]

    # Every run's files are read and their images checked before the first one trains: a bad file of the last
    # language fails now, not after hours of training the others.
    prepared = []
    for run in runs:
        if run.language not in cfg.data.test:
            raise ValueError(f"few-shot language '{run.language}' has no test file in data.test")
        test_path = cfg.data.test[run.language]
        train_data, test_data = read(run.train_path), read(test_path)
        _check_no_test_images(run, train_data, test_data, test_path)
        if on_test:
            dev_datas = [test_data]
        elif run.language in cfg.data.few_shot_dev:
            dev_datas = [read(cfg.data.few_shot_dev[run.language])]
        else:
            log.info(
                "few-shot %s: no data.few_shot_dev.%s, selecting on the English dev set (IGLUE's protocol)",
                run.language,
                run.language,
            )
            dev_datas = [read(path) for path in cfg.data.dev]
        prepared.append((run, train_data, dev_datas, test_data))
    runner.check_images(list(read_files.values()))

    start = {"checkpoint": str(cfg.checkpoint), "checkpoint_digest": TaskModel.weights_digest(cfg.checkpoint)}
    names = {_few_shot_table(run.shots if several else "", on_test) for run in runs}
    for name in sorted(names):  # before anything trains
        runner.check_table(name, "checkpoint", start["checkpoint_digest"])
    # every run's record of finished learning rates; a fresh sweep forgets an earlier one's
    sweeps = {
        run: SweepRecord(folder, start, bool(cfg.resume), runner.env.is_main)
        for run, folder in folders.items()
    }
    selected = str(select_on)
    rows_by_shots: dict[str, list[dict]] = {}
    for run, train_data, dev_datas, test_data in prepared:
        row = _few_shot_run(
            runner, run, folders[run], sweeps[run], train_data, dev_datas, test_data, selected
        )
        rows_by_shots.setdefault(run.shots if several else "", []).append({**row, **start})
    columns, extra = runner.columns()
    tables = {}
    for shots, rows in rows_by_shots.items():
        name = _few_shot_table(shots, on_test)
        if runner.env.is_main:  # the languages of an earlier run into this output_dir stay in its table
            rows = runner.with_earlier_rows(name, rows, "checkpoint")
        shot_counts = {row["shots"] for row in rows}
        details = {"selected_on": selected}
        if len(shot_counts) == 1:
            details = {"shots": shot_counts.pop(), **details}
        tables[name] = write_task_results(
            runner.output_dir,
            str(cfg.task),
            "few_shot",
            rows,
            columns,
            [*extra, "shots", "lr", "selected_on", selected],
            write=runner.env.is_main,
            name=name,
            details=details,
        )
    return tables


def _few_shot_table(shots: str, on_test: bool) -> str:
    return "few_shot" + (f"_{shots}" if shots else "") + (f"_{SELECTED_ON_TEST}" if on_test else "")


SWEEP_RECORD = "sweep.json"


def _lr_key(lr) -> str:
    return f"{float(lr):g}"


class SweepRecord:
    """What one few-shot run's learning-rate sweep has finished, in ``<run folder>/sweep.json``: the model it
    started from, each finished lr's selection (score, step) and, once the run is scored, its table row. A requeued
    sweep (``resume=auto``) skips what it records: without checkpoints (``train.save_every=0``) nothing else keeps
    a finished lr. Only the best finished lr keeps its selected weights (``lr_<lr>/best/``); the others' are
    removed once recorded."""

    def __init__(self, folder: Path, start: dict, resume: bool, write: bool):
        self.folder, self.path, self.write = folder, folder / SWEEP_RECORD, write
        self.data: dict = {"start": start, "lrs": {}}
        if resume and self.path.is_file():
            saved = read_json(self.path)
            began = saved.get("start", {})
            if began.get("checkpoint_digest") != start["checkpoint_digest"]:
                raise ConfigError(
                    f"resume: {folder} was fine-tuned from checkpoint={began.get('checkpoint')} (other weights than "
                    f"{start['checkpoint']}); resume it with that checkpoint, or start anew without resume "
                    "(overwrite=true moves the old runs aside) or into another output_dir"
                )
            self.data = {**saved, "start": start}
        elif write and self.folder.exists():
            self._save()

    def lr_folder(self, lr) -> Path:
        return self.folder / f"lr_{_lr_key(lr)}"

    def weights(self, lr) -> Path:
        return self.lr_folder(lr) / BEST_DIR / BEST_WEIGHTS

    def done(self, lr) -> dict | None:
        return self.data["lrs"].get(_lr_key(lr))

    def best(self, sweep: Sequence[float]) -> float | None:
        """The finished lr of ``sweep`` with the best selection score (the first of equals), or None."""
        best = None
        for lr in sweep:
            if self.done(lr) and (best is None or self.done(lr)["score"] > self.done(best)["score"]):
                best = lr
        return best

    def finished(self, lr, selection: Selection, sweep: Sequence[float]) -> None:
        """Record ``lr``'s selection, then remove the selected weights of every finished lr but the best."""
        score = selection.best_score
        self.data["lrs"][_lr_key(lr)] = {
            "score": score,
            "step": selection.best_step,
            "steps": selection.steps,
        }
        self.data.pop("row", None)
        self._save()
        best = self.best(sweep)
        if self.write:
            for other in self.data["lrs"]:
                if other != _lr_key(best):
                    self.weights(other).unlink(missing_ok=True)

    def finished_row(self, sweep: Sequence[float], scoring: dict) -> dict | None:
        """The run's recorded table row, when every lr of ``sweep`` is finished and the row is of their best,
        scored with the settings ``scoring``."""
        row = self.data.get("row")
        if row is None or row.get("scoring") != scoring or not all(self.done(lr) for lr in sweep):
            return None
        return row if _lr_key(row.get("lr")) == _lr_key(self.best(sweep)) else None

    def scored(self, row: dict) -> None:
        self.data["row"] = row
        self._save()

    def _save(self) -> None:
        if self.write:
            self.folder.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_name(SWEEP_RECORD + ".partial")
            partial.write_text(json.dumps(self.data, indent=2, default=str))
            partial.replace(self.path)


def _few_shot_run(
    runner: TaskRunner,
    run: FewShotRun,
    folder: Path,
    sweep: SweepRecord,
    train_data: TaskData,
    dev_datas: Sequence[TaskData],
    test_data: TaskData,
    selected: str,
) -> dict:
    """Train (or skip, as ``sweep`` records) every lr of ``train.lr_sweep`` for ``run``, save the best one's model
    to ``folder``, score it on the test file; returns the table row (without the starting checkpoint)."""
    cfg, lrs = runner.cfg, [float(lr) for lr in runner.cfg.train.lr_sweep]
    on_test = selected == str(SelectOn.test)
    row = sweep.finished_row(lrs, runner.scoring_settings()) if cfg.resume else None
    if row is not None:
        log.info(
            "few-shot %s %s shots: finished earlier (%s), not run again", run.language, run.shots, sweep.path
        )
        return row
    kept = None  # (lr, weights on the CPU) of the best lr trained by this job
    for lr in lrs:
        if sweep.done(lr):
            log.info(
                "few-shot %s %s shots lr %g: finished earlier, not trained again", run.language, run.shots, lr
            )
            continue
        seed_everything(cfg.train.seed)
        model, tokenizer = runner.load_checkpoint(cfg.checkpoint)
        model, selection = runner.train(
            model,
            tokenizer,
            [train_data],
            dev_datas,
            lr,
            sweep.lr_folder(lr),
            run_info={FEW_SHOT_RUN: {"language": run.language, "shots": run.shots, "train": run.train_path}},
        )
        log.info(
            "few-shot %s %s shots lr %g: best %s %.2f at step %d",
            run.language,
            run.shots,
            lr,
            selected.upper() if on_test else selected,
            selection.best_score,
            selection.best_step,
        )
        sweep.finished(lr, selection, lrs)
        if sweep.best(lrs) == lr:
            kept = (lr, {k: v.cpu() for k, v in model.state_dict().items()})
    lr = sweep.best(lrs)
    best = sweep.done(lr)
    if kept is not None and kept[0] == lr:
        model.load_state_dict(kept[1])
    else:  # finished by an earlier job: its selected weights are on disk
        barrier()
        model, tokenizer = runner.load_checkpoint(cfg.checkpoint)
        _load_weights(model, sweep.weights(lr), runner.collator(model, tokenizer))
    # the head comes from the checkpoint: its head_init is the one that checkpoint records
    started = _recorded_switches(cfg.checkpoint)
    switches = runner.switches(started.get("head_init", "unrecorded"))
    if runner.env.is_main:
        model.save(
            folder,
            tokenizer,
            extra={
                "few_shot": {
                    "language": run.language,
                    "shots": run.shots,
                    "lr": lr,
                    "selected_on": selected,
                    selected: best["score"],
                },
                SWITCHES: switches,
            },
        )
    metrics = runner.score(model, tokenizer, test_data)
    if runner.env.is_main:
        table = {"metrics": runner.columns()[0], "rows": [{"language": run.language, **metrics}]}
        record_results(
            folder, model, {f"few_shot_{run.shots}" + (f"_{SELECTED_ON_TEST}" if on_test else ""): table}
        )
    log.info(
        "few-shot %s %s shots: test %.2f%s",
        run.language,
        run.shots,
        runner.main_score(metrics),
        " (SELECTED ON TEST)" if on_test else "",
    )
    row = {
        "language": run.language,
        **metrics,
        "shots": run.shots,
        "shots_file": str(run.train_path),
        "lr": lr,
        "selected_on": selected,
        selected: best["score"],
        f"{selected}_by_lr": {str(x): sweep.done(x)["score"] for x in runner.cfg.train.lr_sweep},
        "model": str(folder),
        "scoring": runner.scoring_settings(),
        SWITCHES: switches,
        **({"model_digest": TaskModel.weights_digest(folder)} if runner.env.is_main else {}),
    }
    sweep.scored(row)
    return row


def _recorded_switches(model_dir) -> dict:
    """The fine-tuning switches a task model folder records (none for a folder saved before they were)."""
    info = Path(model_dir) / "task.json"
    return (read_json(info).get(SWITCHES) or {}) if info.is_file() else {}


def _load_weights(model: TaskModel, path: Path, collator: TaskCollator) -> None:
    """The selected weights of a finished few-shot lr (a trainer's ``best/``) into ``model``."""
    if not path.is_file():
        raise UserError(
            f"{path} is missing: the sweep removed it as not the best of its learning rates; put back the "
            "train.lr_sweep it ran with, or run the language anew without resume (overwrite=true)"
        )
    prepare_answers(model, collator)
    model.float()
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    if unexpected or set(missing) - tied_aliases(model):
        raise RuntimeError(f"{path} does not fit the model: missing={missing} unexpected={unexpected}")
    model.eval()


def evaluate_checkpoint(cfg: FinetuneConfig) -> dict:
    """Evaluate ``checkpoint`` with ``protocol`` zero_shot (``data.test``) or translate_test."""
    runner = TaskRunner(cfg)
    if not cfg.checkpoint:
        raise ValueError("config key 'checkpoint' must name a fine-tuned task model folder")
    if cfg.protocol == Protocol.few_shot:
        raise ValueError(
            "few-shot models are per language: `cclm finetune ... protocol=few_shot` writes that table"
        )
    files = cfg.data.test if cfg.protocol == Protocol.zero_shot else cfg.data.translate_test
    if not files:
        key = "data.test" if cfg.protocol == Protocol.zero_shot else "data.translate_test"
        raise ValueError(f"config key '{key}' lists no files to evaluate")
    checkpoint, name = Path(cfg.checkpoint), str(cfg.protocol)
    model, tokenizer = runner.load_checkpoint(str(checkpoint))
    few_shot = TaskModel.task_info(checkpoint).get("few_shot")
    if few_shot:
        raise ConfigError(
            f"checkpoint={checkpoint} is a few-shot model ({few_shot.get('language')}, {few_shot.get('shots')} "
            f"shots), tested by its few-shot run; `cclm evaluate` scores an English fine-tuned model (the "
            "zero-shot run's model/ folder)"
        )
    runner.check_table(name, "model", TaskModel.weights_digest(checkpoint))
    runner.check_images(runner.read_all(list(files.values())))
    return {name: runner.table(model, tokenizer, files, name, checkpoint)}
