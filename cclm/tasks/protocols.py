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
  few-shot images come from testdev: its runs test on the few-shot split's ``test.json``, as IGLUE's all do);
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
from cclm.runtime.env import DistEnv, barrier, init_distributed, local_main_first, seed_everything
from cclm.runtime.output_dir import check_output_dir, holds_run
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
    read_task_table,
    set_aside_table,
    table_path,
    write_task_results,
)
from cclm.tasks.task_data import ClassificationData, RetrievalData, no_usable_example
from cclm.tasks.task_model import TaskModel

log = logging.getLogger(__name__)
TaskData = ClassificationData | RetrievalData


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
            model = domain_pretrain.domain_pretrain(model, tokenizer, cfg, self.env)
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
            overwrite=self.cfg.overwrite,
        )

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
            digest = TaskModel.weights_digest(model_dir)
            rows = [{**row, "model": str(model_dir), "model_digest": digest} for row in rows]
            rows = self.with_earlier_rows(protocol, rows, one_model=True)
        return write_task_results(
            self.output_dir, str(self.cfg.task), protocol, rows, columns, extra, write=self.env.is_main
        )

    def with_earlier_rows(self, name: str, rows: list[dict], one_model: bool) -> list[dict]:
        """``rows`` with the other rows of table ``name`` already under ``output_dir`` (main rank): a table of
        one model (zero-shot, translate-test) keeps the rows of the same weights and is moved aside when another
        model wrote it; a few-shot table (a model per language) keeps the languages not run again."""
        task = str(self.cfg.task)
        old = read_task_table(self.output_dir, task, name)
        if old is None:
            return rows
        others = other_models(old, rows[0]["model_digest"]) if one_model else []
        if others:
            aside = set_aside_table(self.output_dir, task, name)
            log.warning(
                "%s held rows of another model (%s); moved to %s",
                table_path(self.output_dir, task, name),
                ", ".join(others),
                aside,
            )
            return rows
        return merged_rows(old["rows"], rows)


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
    check_output_dir(cfg.output_dir, cfg.resume, cfg.overwrite)  # before anything is read or written
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
    seed_everything(cfg.train.seed)
    model, tokenizer = runner.start_model(train_datas)
    model, selection = runner.train(model, tokenizer, train_datas, dev_datas, cfg.train.lr, runner.output_dir)
    info = {"selection": {"dev": selection.best_score, "step": selection.best_step, "steps": selection.steps}}
    model_dir = runner.output_dir / "model"
    if runner.env.is_main:
        model.save(model_dir, tokenizer, extra=info)
        (runner.output_dir / "train_history.json").write_text(json.dumps(selection.history, indent=2))
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

    selected = str(select_on)
    rows_by_shots: dict[str, list[dict]] = {}
    for run, train_data, dev_datas, test_data in prepared:
        folder = folders[run]
        best, score_by_lr = None, {}
        for lr in cfg.train.lr_sweep:
            seed_everything(cfg.train.seed)
            model, tokenizer = runner.load_checkpoint(cfg.checkpoint)
            model, selection = runner.train(
                model,
                tokenizer,
                [train_data],
                dev_datas,
                float(lr),
                folder / f"lr_{float(lr):g}",
                run_info={
                    FEW_SHOT_RUN: {"language": run.language, "shots": run.shots, "train": run.train_path}
                },
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
            score_by_lr[str(lr)] = selection.best_score
            if best is None or selection.best_score > best[1].best_score:
                best = (float(lr), selection, {k: v.cpu() for k, v in model.state_dict().items()})
        lr, selection, state = best
        model.load_state_dict(state)
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
                        selected: selection.best_score,
                    }
                },
            )
        metrics = runner.score(model, tokenizer, test_data)
        if runner.env.is_main:
            table = {"metrics": runner.columns()[0], "rows": [{"language": run.language, **metrics}]}
            name = f"few_shot_{run.shots}" + (f"_{SELECTED_ON_TEST}" if on_test else "")
            record_results(folder, model, {name: table})
        log.info(
            "few-shot %s %s shots: test %.2f%s",
            run.language,
            run.shots,
            runner.main_score(metrics),
            " (SELECTED ON TEST)" if on_test else "",
        )
        rows_by_shots.setdefault(run.shots if several else "", []).append(
            {
                "language": run.language,
                **metrics,
                "shots": run.shots,
                "shots_file": str(run.train_path),
                "lr": lr,
                "selected_on": selected,
                selected: selection.best_score,
                f"{selected}_by_lr": score_by_lr,
                "model": str(folder),
                **({"model_digest": TaskModel.weights_digest(folder)} if runner.env.is_main else {}),
            }
        )
    columns, extra = runner.columns()
    tables = {}
    for shots, rows in rows_by_shots.items():
        name = "few_shot" + (f"_{shots}" if shots else "") + (f"_{SELECTED_ON_TEST}" if on_test else "")
        if runner.env.is_main:  # the languages of an earlier run into this output_dir stay in its table
            rows = runner.with_earlier_rows(name, rows, one_model=False)
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
    earlier = read_task_table(runner.output_dir, str(cfg.task), name)
    others = other_models(earlier, TaskModel.weights_digest(checkpoint)) if earlier else []
    if others and not cfg.overwrite:
        raise UserError(
            f"{table_path(runner.output_dir, str(cfg.task), name)} holds rows of another model ({', '.join(others)}): "
            f"overwrite=true moves it aside ({name}.old-<time>.*), or set another output_dir"
        )
    runner.check_images(runner.read_all(list(files.values())))
    return {name: runner.table(model, tokenizer, files, name, checkpoint)}
