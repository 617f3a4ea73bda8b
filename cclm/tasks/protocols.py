"""IGLUE's protocols on top of the shared loop.

- zero-shot: fine-tune on English (``data.train``), select on the English dev set (``data.dev``), save the task
  model to ``<output_dir>/model`` and evaluate it on every ``data.test`` language (and, when configured, on the
  machine-translated ``data.translate_test`` files: the translate-test protocol needs no other training);
- few-shot: :mod:`cclm.tasks.few_shot` (a sweep of learning rates per language, from the zero-shot model);
- translate-test / zero-shot evaluation of an existing task model: :func:`evaluate_checkpoint`.

Retrieval files are grouped into image entries as ``data.duplicate_images`` says
(:func:`cclm.tasks.iglue_retrieval.with_duplicate_images`) when they are read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from cclm.config import (
    CONFIG_ROOT,
    ConfigError,
    DuplicateImages,
    FinetuneConfig,
    ModelConfig,
    NoGoldLabel,
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
from cclm.runtime.checkpoint import latest_checkpoint
from cclm.runtime.config_changes import config_changes, named
from cclm.runtime.engine import configured_precision
from cclm.runtime.env import (
    DistEnv,
    barrier,
    init_distributed,
    local_main_first,
    resolve_precision,
    seed_everything,
)
from cclm.runtime.output_dir import check_output_dir, claim_output_dir
from cclm.runtime.run_lock import hold_output_dir
from cclm.runtime.sources import EpochBatches
from cclm.runtime.stop_signal import holds_stop_signal
from cclm.runtime.trainer import Selection
from cclm.tasks import domain_pretrain, get_task, iglue_retrieval
from cclm.tasks.annotations import AnnotationError
from cclm.tasks.batching import ClassificationDataset, TaskBatches, TaskCollator, training_dataset
from cclm.tasks.finetune import FinetuneSettings, finetune, predict
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
from cclm.tasks.task_data import NO_GOLD_CLASS, ClassificationData, RetrievalData, no_usable_example
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
        # XVNLI's records labelled "-": scored as wrong (IGLUE) or dropped (the reference); cViL: IGLUE's
        self.no_gold_label = (
            NoGoldLabel(str(getattr(data_cfg, "no_gold_label", NoGoldLabel.iglue)))
            if getattr(self.task, "NO_GOLD_LABEL", None)
            else None
        )
        self._labels: list[str] | None = None

    # ------------------------------------------------------------------------------------------------ data
    def label_names(self) -> list[str]:
        if self.kind == "retrieval":
            return []
        if self._labels is None:
            self._labels = self.task.labels(self.data_cfg)
        return self._labels

    def read(self, path: str, scored: bool = False) -> TaskData:
        """The examples of ``path``; retrieval lines grouped into image entries (``data.duplicate_images``).
        ``scored``: a dev or test file, whose examples without a gold class (an XVNLI record labelled ``-``,
        an xGQA answer outside the vocabulary) are kept and scored as wrong, as IGLUE scores them (XVNLI with
        ``data.no_gold_label=drop``: left out, as the CCLM reference); a training file leaves them out."""
        data = self.task.read(path, self.label_names() or None, self.data_cfg.max_examples)
        keeps_no_gold_class = scored and self.no_gold_label != NoGoldLabel.drop
        if isinstance(data, ClassificationData) and not keeps_no_gold_class:
            data = data.without_no_gold_class()
        for reason, count in data.skipped.items():
            log.warning("%s: skipped %d record(s): %s", path, count, reason)
        for reason, count in getattr(data, "no_gold_class", {}).items():
            log.warning("%s: %d example(s) kept and scored as wrong, as IGLUE: %s", path, count, reason)
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

    def read_all(self, paths: Sequence[str], scored: bool = False) -> list[TaskData]:
        return [self.read(path, scored) for path in paths]

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
            "no_gold_class": int((labels == NO_GOLD_CLASS).sum()),  # among `examples`, scored as wrong
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
        if self.no_gold_label is not None:
            settings["no_gold_label"] = str(self.no_gold_label)
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
        return ["accuracy"], ["examples", "skipped", "no_gold_class"]


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
            precision=configured_precision(cfg.deepspeed),  # as the fine-tuning trains
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
    def train_batches(
        self, datas: Sequence[TaskData], model: TaskModel, tokenizer, batch_size: int | None = None
    ) -> EpochBatches:
        """Training batches of ``datas`` (``batch_size``, else ``train.batch_size``), their images augmented
        as ``data.augment`` says (dev and test never)."""
        size, t = self.image_size(model), self.cfg.train
        batch_size = batch_size or t.batch_size
        side_words = getattr(self.task, "REFERENCE_SIDE_WORDS", ())
        augment = TaskAugment.from_config(self.cfg.data, size, t.seed, self.label_names(), side_words)
        dataset = training_dataset(self.kind, datas, self.roots, size, augment)
        return TaskBatches(
            dataset,
            batch_size,
            self.collator(model, tokenizer),
            seed=t.seed,
            rank=self.env.rank,
            world_size=self.env.world_size,
            # contrastive batches need their full size (a last batch of 1 has no negative)
            drop_last=self.kind == "retrieval" and len(dataset) > batch_size,
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
        batch_size: int | None = None,
    ) -> tuple[TaskModel, Selection]:
        """Fine-tune ``model`` at ``lr`` into ``output_dir`` (metrics, checkpoints); returns the model selected on
        ``dev_datas`` (the dev files; few-shot with ``train.select_on=test``: the test file) and the selection.
        ``run_info`` joins the configuration saved with the run (``config.json``); ``batch_size`` replaces
        ``train.batch_size`` (a few-shot run's, ``train.batch_size_by_shots``)."""
        if not dev_datas:
            raise ValueError("model selection needs a dev set: set data.dev (never a test file)")
        return finetune(
            model,
            self.train_batches(train_datas, model, tokenizer, batch_size),
            lambda m: sum(self.main_score(self.score(m, tokenizer, d)) for d in dev_datas) / len(dev_datas),
            self.settings(lr),
            env=self.env,
            output_dir=output_dir,
            deepspeed_cfg=self.cfg.deepspeed,
            run_config={**to_dict(self.cfg), **dict(run_info or {})},
            resume=self.cfg.resume,
            overwrite=self.overwrite,
        )

    def read_dev(self, path: str) -> TaskData:
        """A dev file for model selection: its first ``data.dev_max_examples`` examples (or images)."""
        return self.read(path, scored=True).truncated(self.cfg.data.dev_max_examples)

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
            metrics = self.score(model, tokenizer, self.read(path, scored=True))
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

    def table_conflict(self, name: str, model_key: str, digest: str, shots: str | None = None) -> str | None:
        """Why table ``name`` already under ``output_dir`` cannot take rows of weights ``digest`` (``model_key``:
        ``model``, the scored model, or few-shot ``checkpoint``, the model every language started from) scored
        with this run's settings: it holds rows of other weights, rows of another shot count (few-shot:
        ``shots``; its average would mix them), or rows scored otherwise. None when it can."""
        old = read_task_table(self.output_dir, str(self.cfg.task), name)
        if old is None:
            return None
        others = other_models(old, digest, model_key)
        if others:
            started = "fine-tuned from another model" if model_key == "checkpoint" else "of another model"
            return f"holds rows {started} ({', '.join(others)})"
        if shots is not None:
            counts = sorted({str(row.get("shots")) for row in old["rows"]} - {str(shots)})
            if counts:
                return f"holds rows of another shot count ({', '.join(counts)}; this run: {shots})"
        scored = other_scoring(old, self.scoring_settings())
        return f"holds rows scored with other settings ({scored})" if scored else None

    def check_table(self, name: str, model_key: str, digest: str, shots: str | None = None) -> None:
        """Refuse, before anything runs, a table that this run's rows could not join (:meth:`table_conflict`),
        unless ``overwrite`` (it is then moved aside when the rows are written)."""
        reason = self.table_conflict(name, model_key, digest, shots)
        if reason and not self.cfg.overwrite:
            raise UserError(
                f"{table_path(self.output_dir, str(self.cfg.task), name)} {reason}: overwrite=true moves it aside "
                f"({name}.old-<time>.*), or set another output_dir"
            )

    def with_earlier_rows(
        self, name: str, rows: list[dict], model_key: str, shots: str | None = None
    ) -> list[dict]:
        """``rows`` with the other rows of table ``name`` already under ``output_dir`` (main rank): rows of the same
        weights (``model_key``: ``model``; few-shot: ``checkpoint``, a model per language from one English
        model) scored with the same settings are kept, except those of the languages run again; a table that
        :meth:`table_conflict` refuses is moved aside."""
        task = str(self.cfg.task)
        old = read_task_table(self.output_dir, task, name)
        if old is None:
            return rows
        reason = self.table_conflict(name, model_key, rows[0][f"{model_key}_digest"], shots)
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
    train_datas = runner.read_all(cfg.data.train)
    dev_datas = [runner.read_dev(path) for path in cfg.data.dev]
    if not train_datas:
        raise ValueError("config key 'data.train' must list the English training file(s)")
    runner.check_images(
        [
            *train_datas,
            *dev_datas,
            *runner.read_all([*cfg.data.test.values(), *cfg.data.translate_test.values()], scored=True),
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
    "data.no_gold_label",
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


def _recorded_switches(model_dir) -> dict:
    """The fine-tuning switches a task model folder records (none for a folder saved before they were)."""
    info = Path(model_dir) / "task.json"
    return (read_json(info).get(SWITCHES) or {}) if info.is_file() else {}


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
    runner.check_images(runner.read_all(list(files.values()), scored=True))
    return {name: runner.table(model, tokenizer, files, name, checkpoint)}
