"""IGLUE's protocols on top of the shared loop.

- zero-shot: fine-tune on English (``data.train``), select on the English dev set (``data.dev``), save the task
  model to ``<output_dir>/model`` and evaluate it on every ``data.test`` language (and, when configured, on the
  machine-translated ``data.translate_test`` files: the translate-test protocol needs no other training);
- few-shot: for each language of ``data.few_shot_train``, continue from ``checkpoint`` (the English fine-tuned
  model) once per learning rate of ``train.lr_sweep``; the run with the best dev score (``data.few_shot_dev``,
  else the English dev set) is evaluated on that language's test file;
- translate-test / zero-shot evaluation of an existing task model: :func:`evaluate_checkpoint`.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, DataLoader

from cclm.config import CONFIG_ROOT, ModelConfig, load_config
from cclm.data.tokenize import load_tokenizer, train_tokenizer
from cclm.model.cross_view import CrossViewModel
from cclm.tasks import get_task, retrieval
from cclm.tasks.batching import CaptionImagePairs, ClassificationDataset, Collator
from cclm.tasks.examples import ClassificationData, RetrievalData
from cclm.tasks.heads import TaskModel
from cclm.tasks.images import require_images
from cclm.tasks.loop import Selection, autocast_factory, finetune, predict, resolve_device
from cclm.tasks.metrics import accuracy
from cclm.tasks.results import write_results

log = logging.getLogger(__name__)
PROTOCOLS = ("zero_shot", "few_shot", "translate_test")
TaskData = ClassificationData | RetrievalData


class TaskRunner:
    """Everything a fine-tuning config needs: reading files, building/loading models, training, scoring."""

    def __init__(self, cfg):
        if cfg.protocol not in PROTOCOLS:
            raise ValueError(f"config key 'protocol' must be one of {PROTOCOLS}, got '{cfg.protocol}'")
        self.cfg = cfg
        self.task = get_task(cfg.task)
        self.kind = self.task.KIND
        self.device = resolve_device(cfg.train.device)
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        self.autocast = autocast_factory(self.device, cfg.train.precision)
        self.roots = dict(cfg.data.image_roots)
        self.output_dir = Path(cfg.output_dir)
        self._labels: list[str] | None = None

    # ------------------------------------------------------------------------------------------------ data
    def label_names(self) -> list[str]:
        if self.kind == "retrieval":
            return []
        if self._labels is None:
            self._labels = self.task.labels(self.cfg.data)
        return self._labels

    def read(self, path: str) -> TaskData:
        data = self.task.read(path, self.label_names() or None, self.cfg.data.max_examples)
        for reason, count in data.skipped.items():
            log.warning("%s: skipped %d record(s): %s", path, count, reason)
        return data

    def read_all(self, paths: Sequence[str]) -> list[TaskData]:
        return [self.read(path) for path in paths]

    def check_images(self, datas: Sequence[TaskData]) -> None:
        require_images((ref for data in datas for ref in data.used_image_refs), self.roots)

    # ---------------------------------------------------------------------------------------------- models
    def start_model(self, train_datas: Sequence[TaskData]) -> tuple[TaskModel, object]:
        """The zero-shot starting point: a pretrained cclm folder, or a random init from ``model`` (a yaml)."""
        cfg = self.cfg
        if cfg.pretrained:
            backbone = CrossViewModel.from_pretrained(cfg.pretrained)
            tokenizer = load_tokenizer(cfg.tokenizer or cfg.pretrained)
        else:
            if not cfg.model:
                raise ValueError(
                    "set 'pretrained' (a cclm model folder) or 'model' (a model yaml for random init)"
                )
            model_cfg = load_config(ModelConfig, _model_yaml(cfg.model), list(cfg.model_overrides))
            if cfg.tokenizer:
                tokenizer = load_tokenizer(cfg.tokenizer)
            else:  # random init: a tokenizer trained on the training texts, saved with the model
                texts = [t for data in train_datas for t in _texts(data)]
                vocab = int(model_cfg.text.encoder.get("vocab_size", 1000))
                tokenizer = train_tokenizer(texts, self.output_dir / "tokenizer", vocab_size=vocab)
            model_cfg.text.encoder["vocab_size"] = len(tokenizer)
            log.warning("no pretrained model: fine-tuning a randomly initialised %s", cfg.model)
            backbone = CrossViewModel(model_cfg)
        return TaskModel(backbone, self.cfg.task, self.kind, self.label_names()), tokenizer

    def load_checkpoint(self, directory: str) -> tuple[TaskModel, object]:
        model = TaskModel.load(directory)
        if model.task != self.cfg.task and get_task(model.task) is not self.task:
            raise ValueError(f"{directory} was fine-tuned for '{model.task}', not '{self.cfg.task}'")
        if self.kind != "retrieval" and model.label_names != self.label_names():
            raise ValueError(f"{directory}: its labels differ from this task's label vocabulary")
        return model, load_tokenizer(directory)

    def collator(self, model: TaskModel, tokenizer) -> Collator:
        return Collator(tokenizer, int(model.backbone.cfg.text.max_length))

    def image_size(self, model: TaskModel) -> int:
        return int(model.backbone.cfg.vision.image_size)

    # ------------------------------------------------------------------------------------------- training
    def train_loader(self, datas: Sequence[TaskData], model: TaskModel, tokenizer) -> DataLoader:
        size = self.image_size(model)
        if self.kind == "retrieval":
            offsets = [0]
            for data in datas:
                offsets.append(offsets[-1] + len(data.images))
            dataset = ConcatDataset(
                [CaptionImagePairs(d, self.roots, size, o) for d, o in zip(datas, offsets)]
            )
        else:
            dataset = ClassificationDataset([e for d in datas for e in d.examples], self.roots, size)
        generator = torch.Generator().manual_seed(self.cfg.train.seed)
        return DataLoader(
            dataset,
            batch_size=self.cfg.train.batch_size,
            shuffle=True,
            generator=generator,
            collate_fn=self.collator(model, tokenizer),
            num_workers=self.cfg.train.num_workers,
            drop_last=self.kind == "retrieval" and len(dataset) > self.cfg.train.batch_size,
        )

    def train(self, model: TaskModel, tokenizer, train_datas, dev_datas, lr: float) -> Selection:
        if not dev_datas:
            raise ValueError("model selection needs a dev set: set data.dev (never a test file)")
        t = self.cfg.train
        return finetune(
            model,
            self.train_loader(train_datas, model, tokenizer),
            lambda m: sum(self.main_score(self.score(m, tokenizer, d)) for d in dev_datas) / len(dev_datas),
            lr=lr,
            epochs=t.epochs,
            max_steps=t.max_steps,
            weight_decay=t.weight_decay,
            head_lr_mult=t.head_lr_mult,
            warmup_ratio=t.warmup_ratio,
            grad_clip=t.grad_clip,
            eval_every=t.eval_every,
            device=self.device,
            autocast=self.autocast,
            time_limit_s=60.0 * t.time_limit_minutes,
        )

    # -------------------------------------------------------------------------------------------- scoring
    def score(self, model: TaskModel, tokenizer, data: TaskData) -> dict:
        model.to(self.device)
        size, collator, batch_size = (
            self.image_size(model),
            self.collator(model, tokenizer),
            self.cfg.eval.batch_size,
        )
        if self.kind == "retrieval":
            metrics = retrieval.evaluate(
                model,
                data,
                self.roots,
                tokenizer,
                size,
                k_test=self.cfg.eval.k_test,
                batch_size=batch_size,
                precision=self.cfg.train.precision,
                device=self.device,
                num_workers=self.cfg.train.num_workers,
            )
            return {**metrics, "images": len(data.images), "captions": len(data.texts)}
        loader = DataLoader(
            ClassificationDataset(data.examples, self.roots, size),
            batch_size=batch_size,
            collate_fn=collator,
            num_workers=self.cfg.train.num_workers,
        )
        predictions, labels = predict(model, loader, self.device, self.autocast)
        return {
            "accuracy": accuracy(predictions, labels),
            "examples": len(labels),
            "skipped": sum(data.skipped.values()),
        }

    def main_score(self, metrics: dict) -> float:
        if self.kind == "retrieval":
            return (metrics[retrieval.IR_R1] + metrics[retrieval.TR_R1]) / 2
        return metrics["accuracy"]

    def columns(self) -> tuple[list[str], list[str]]:
        if self.kind == "retrieval":
            return [retrieval.IR_R1, retrieval.TR_R1], ["images", "captions"]
        return ["accuracy"], ["examples", "skipped"]

    def table(self, model: TaskModel, tokenizer, files: Mapping[str, str], protocol: str) -> dict:
        rows = []
        for language, path in files.items():
            metrics = self.score(model, tokenizer, self.read(path))
            rows.append({"language": language, **metrics, "file": str(path)})
            log.info("%s %s %s: %.2f", self.cfg.task, protocol, language, self.main_score(metrics))
        columns, extra = self.columns()
        return write_results(self.output_dir, self.cfg.task, protocol, rows, columns, extra)


# ------------------------------------------------------------------------------------------------ protocols
def _texts(data: TaskData) -> list[str]:
    return list(data.texts) if isinstance(data, RetrievalData) else [e.text for e in data.examples]


def _model_yaml(name: str) -> Path:
    """A model yaml path, or a name under configs/model/ (``tiny``, ``base``)."""
    return Path(name) if name.endswith((".yaml", ".yml")) else CONFIG_ROOT / "model" / f"{name}.yaml"


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def run_zero_shot(cfg) -> dict:
    runner = TaskRunner(cfg)
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
    _seed(cfg.train.seed)
    model, tokenizer = runner.start_model(train_datas)
    selection = runner.train(model, tokenizer, train_datas, dev_datas, cfg.train.lr)
    info = {"selection": {"dev": selection.best_score, "step": selection.best_step, "steps": selection.steps}}
    model.save(runner.output_dir / "model", tokenizer, extra=info)
    (runner.output_dir / "train_history.json").write_text(json.dumps(selection.history, indent=2))
    tables = {}
    if cfg.data.test:
        tables["zero_shot"] = runner.table(model, tokenizer, cfg.data.test, "zero_shot")
    if cfg.data.translate_test:
        tables["translate_test"] = runner.table(model, tokenizer, cfg.data.translate_test, "translate_test")
    return tables


def run_few_shot(cfg) -> dict:
    runner = TaskRunner(cfg)
    if not cfg.checkpoint:
        raise ValueError("few-shot continues from the English fine-tuned model: set 'checkpoint'")
    if not cfg.data.few_shot_train:
        raise ValueError("config key 'data.few_shot_train' must map languages to train_<N> files")
    if not cfg.train.lr_sweep:
        raise ValueError("config key 'train.lr_sweep' must list at least one learning rate")
    rows = []
    for language, train_path in cfg.data.few_shot_train.items():
        if language not in cfg.data.test:
            raise ValueError(f"few-shot language '{language}' has no test file in data.test")
        train_data = runner.read(train_path)
        dev_paths = (
            [cfg.data.few_shot_dev[language]] if language in cfg.data.few_shot_dev else list(cfg.data.dev)
        )
        if language not in cfg.data.few_shot_dev:
            log.warning(
                "few-shot %s: no data.few_shot_dev.%s, selecting on the English dev set", language, language
            )
        dev_datas = runner.read_all(dev_paths)
        test_data = runner.read(cfg.data.test[language])
        runner.check_images([train_data, *dev_datas, test_data])
        best, dev_by_lr = None, {}
        for lr in cfg.train.lr_sweep:
            _seed(cfg.train.seed)
            model, tokenizer = runner.load_checkpoint(cfg.checkpoint)
            selection = runner.train(model, tokenizer, [train_data], dev_datas, float(lr))
            log.info(
                "few-shot %s lr %g: best dev %.2f at step %d",
                language,
                lr,
                selection.best_score,
                selection.best_step,
            )
            dev_by_lr[str(lr)] = selection.best_score
            if best is None or selection.best_score > best[1].best_score:
                best = (float(lr), selection, {k: v.cpu() for k, v in model.state_dict().items()})
        lr, selection, state = best
        model.load_state_dict(state)
        model.save(
            runner.output_dir / "few_shot" / language,
            tokenizer,
            extra={"few_shot": {"language": language, "lr": lr, "dev": selection.best_score}},
        )
        metrics = runner.score(model, tokenizer, test_data)
        rows.append(
            {
                "language": language,
                **metrics,
                "shots_file": str(train_path),
                "lr": lr,
                "dev": selection.best_score,
                "dev_by_lr": dev_by_lr,
            }
        )
    columns, extra = runner.columns()
    return {
        "few_shot": write_results(
            runner.output_dir, cfg.task, "few_shot", rows, columns, [*extra, "lr", "dev"]
        )
    }


def evaluate_checkpoint(cfg) -> dict:
    """Evaluate ``checkpoint`` with ``protocol`` zero_shot (``data.test``) or translate_test."""
    runner = TaskRunner(cfg)
    if not cfg.checkpoint:
        raise ValueError("config key 'checkpoint' must name a fine-tuned task model folder")
    if cfg.protocol == "few_shot":
        raise ValueError(
            "few-shot models are per language: `cclm finetune ... protocol=few_shot` writes that table"
        )
    files = cfg.data.test if cfg.protocol == "zero_shot" else cfg.data.translate_test
    if not files:
        key = "data.test" if cfg.protocol == "zero_shot" else "data.translate_test"
        raise ValueError(f"config key '{key}' lists no files to evaluate")
    runner.check_images(runner.read_all(list(files.values())))
    model, tokenizer = runner.load_checkpoint(cfg.checkpoint)
    return {cfg.protocol: runner.table(model, tokenizer, files, cfg.protocol)}
