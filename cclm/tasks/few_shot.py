"""IGLUE's few-shot protocol: for each language of ``data.few_shot_train`` and each of its files (a value may be a
brace pattern, ``.../train_{1,5,10,20,25,48}.jsonl``: one run per shot count), continue from ``checkpoint`` (the
English fine-tuned model of the zero-shot protocol, :mod:`cclm.tasks.protocols`) once per learning rate of
``train.lr_sweep``; the run with the best selection score is evaluated on that language's test file. Each run
trains at its shot count's batch size (``train.batch_size_by_shots``, else ``train.batch_size``), as IGLUE's
scripts scale the batch with the shots.

Selection (``train.select_on``) is on the dev set by default (``data.few_shot_dev.<lang>``, else the English
``data.dev``, as IGLUE); ``test`` selects on the language's test file, as the CCLM reference's few-shot configs do:
such tables are named ``..._selected_on_test`` and labelled in their header, title and rows.

A few-shot training image path that the test file also names is warned about and listed in the run's row
(``shared_test_images``; the report footnotes it), or refused with ``data.shared_test_images=refuse``: cclm
reads both from one image folder, where MaRVL zh's 10 and 10x2 splits share 5 and 7 file names with its test
file, while IGLUE, which publishes those runs, reads few-shot images from a feature file of their own. (xGQA's
few-shot images come from testdev: its runs test on the few-shot split's ``test.json``, as IGLUE's all do.)

Each run folder's ``sweep.json`` (:class:`SweepRecord`) records the finished learning rates and the scored
row: a requeued sweep (``resume=auto``) skips them, with or without checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import braceexpand
from safetensors.torch import load_file

from cclm.config import ConfigError, FinetuneConfig, SelectOn, SharedTestImages
from cclm.errors import UserError
from cclm.jsonl import read_json
from cclm.runtime.checkpoint import tied_aliases
from cclm.runtime.env import barrier, seed_everything
from cclm.runtime.output_dir import check_output_dir, holds_run
from cclm.runtime.stop_signal import holds_stop_signal
from cclm.runtime.trainer import BEST_DIR, BEST_WEIGHTS, Selection
from cclm.tasks.batching import TaskCollator
from cclm.tasks.finetune import prepare_answers
from cclm.tasks.protocols import SWITCHES, TaskData, TaskRunner, _recorded_switches, record_results
from cclm.tasks.results import write_task_results
from cclm.tasks.task_model import TaskModel

log = logging.getLogger(__name__)

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


def few_shot_batch_size(train_cfg, shots: str) -> int:
    """The batch size of a ``shots``-shot run: ``train.batch_size_by_shots``, else ``train.batch_size``."""
    return int(train_cfg.batch_size_by_shots.get(shots, train_cfg.batch_size))


def _shared_test_images(
    run: FewShotRun, train: TaskData, test: TaskData, test_path: str, policy: SharedTestImages
) -> list[str]:
    """The image paths of ``run``'s training file that the test file also names, sorted: refused with
    ``data.shared_test_images=refuse``, else warned about (the run's row lists them)."""
    shared = sorted(ref.path for ref in train.used_image_refs & test.used_image_refs)
    if not shared:
        return []
    found = (
        f"few-shot {run.language} ({run.shots} shots): {len(shared)} image(s) of {run.train_path} are also "
        f"named by the test file {test_path} ({', '.join(shared[:10])}{', ...' if len(shared) > 10 else ''})"
    )
    if policy == SharedTestImages.refuse:
        raise ValueError(
            f"{found}; test on a split without the few-shot images (xGQA: the few-shot split's test.json, as "
            "configs/finetune/xgqa.yaml, not the full testdev), or set data.shared_test_images=note"
        )
    log.warning("%s: the run goes on, its row lists them (shared_test_images)", found)
    return shared


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
    read_files: dict[tuple[str, bool], TaskData] = {}

    def read(path: str, scored: bool = False) -> TaskData:
        if (path, scored) not in read_files:
            read_files[path, scored] = runner.read(path, scored)
        return read_files[path, scored]

    def read_dev(path: str) -> TaskData:
        return read(path, scored=True).truncated(cfg.data.dev_max_examples)

    # Every run's files are read and their images checked before the first one trains: a bad file of the last
    # language fails now, not after hours of training the others.
    prepared = []
    for run in runs:
        if run.language not in cfg.data.test:
            raise ValueError(f"few-shot language '{run.language}' has no test file in data.test")
        test_path = cfg.data.test[run.language]
        train_data, test_data = read(run.train_path), read(test_path, scored=True)
        shared = _shared_test_images(
            run, train_data, test_data, test_path, SharedTestImages(str(cfg.data.shared_test_images))
        )
        if on_test:
            dev_datas = [test_data]
        elif run.language in cfg.data.few_shot_dev:
            dev_datas = [read_dev(cfg.data.few_shot_dev[run.language])]
        else:
            log.info(
                "few-shot %s: no data.few_shot_dev.%s, selecting on the English dev set (IGLUE's protocol)",
                run.language,
                run.language,
            )
            dev_datas = [read_dev(path) for path in cfg.data.dev]
        prepared.append((run, train_data, dev_datas, test_data, shared))
    runner.check_images([data for _, train, devs, test, _ in prepared for data in (train, *devs, test)])

    start = {"checkpoint": str(cfg.checkpoint), "checkpoint_digest": TaskModel.weights_digest(cfg.checkpoint)}
    names = {_few_shot_table(run.shots if several else "", on_test): run.shots for run in runs}
    for name, shots in sorted(names.items()):  # before anything trains
        runner.check_table(name, "checkpoint", start["checkpoint_digest"], shots)
    # every run's record of finished learning rates; a fresh sweep forgets an earlier one's
    sweeps = {
        run: SweepRecord(
            folder,
            {**start, **_trained_on(run), "batch_size": few_shot_batch_size(cfg.train, run.shots)},
            bool(cfg.resume),
            runner.env.is_main,
        )
        for run, folder in folders.items()
    }
    selected = str(select_on)
    rows_by_shots: dict[str, list[dict]] = {}
    for run, train_data, dev_datas, test_data, shared in prepared:
        row = _few_shot_run(
            runner, run, folders[run], sweeps[run], train_data, dev_datas, test_data, selected
        )
        if shared:
            row = {**row, "shared_test_images": shared}
        rows_by_shots.setdefault(run.shots if several else "", []).append({**row, **start})
    columns, extra = runner.columns()
    tables = {}
    for shots, rows in rows_by_shots.items():
        name = _few_shot_table(shots, on_test)
        if runner.env.is_main:  # the languages of an earlier run into this output_dir stay in its table
            rows = runner.with_earlier_rows(name, rows, "checkpoint", rows[0]["shots"])
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
            if began.get("train_digest") not in (None, start["train_digest"]):
                raise ConfigError(
                    f"resume: {folder}'s sweep began on {began.get('train')}, and {start['train']} is not that "
                    "file as it was (its content differs): resume with the file the sweep began with, or start "
                    "anew without resume (overwrite=true moves the old runs aside) or into another output_dir"
                )
            if began.get("batch_size") not in (None, start["batch_size"]):  # None: a sweep of an older cclm
                raise ConfigError(
                    f"resume: {folder}'s sweep trained at batch size {began['batch_size']}, and this one would "
                    f"train its other learning rates at {start['batch_size']}, so that selection compared runs "
                    "of two batch sizes: resume with that batch size (train.batch_size / "
                    "train.batch_size_by_shots), or start anew without resume or into another output_dir"
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


def _trained_on(run: FewShotRun) -> dict:
    """The training file of ``run`` and the digest of its content, which a requeued sweep must find unchanged (a
    finished learning rate is not trained again)."""
    digest = hashlib.sha256(Path(run.train_path).read_bytes()).hexdigest()
    return {"train": str(run.train_path), "train_digest": digest}


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
    batch_size = few_shot_batch_size(cfg.train, run.shots)
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
            run_info={
                FEW_SHOT_RUN: {
                    "language": run.language,
                    "shots": run.shots,
                    "train": run.train_path,
                    "batch_size": batch_size,
                }
            },
            batch_size=batch_size,
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
                    "batch_size": batch_size,
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
