"""cViL for VQA (arXiv 2206.03354): an English VQA teacher, distilled into a target-language student on parallel
questions, with OSCAR+-style object tags as anchors, then VQA in the target language.

    stage "teacher" (when `teacher` is null): fine-tune an English VQA model (random init from
        teacher_finetune.model, a tokenizer trained on the English questions), selected on the English dev set
    student = the teacher with its word embeddings re-indexed for a tokenizer of the target languages (trained on
        their questions, CJK characters split): pieces both tokenizers have keep the teacher's rows
    stage "distill": the student reads the target-language question (and the tags translated), the frozen
        teacher the English one (and English tags); KL(teacher || student) at temperature T on the answer
        distribution + MSE or 1 - cosine on the fused [CLS] (cclm.recipes.cvil.distillation_losses); only
        distill.trainable (text / fusion / head) trains, the vision side is the teacher's, frozen
    stage "target" (target_finetune.enabled, where target-language VQA data with answers exists: data.target_train):
        cross-entropy on it, only target_finetune.trainable trains
    evaluation: the teacher on the English test questions; per target language the student, the student before
        distillation, and translate-test (the teacher on the questions translated back into English)

Object tags (``object_tags.enabled``) are the second text segment, ``question </s></s> tags``
(:mod:`cclm.recipes.object_tags`). A teacher folder records whether it was trained with tags (``object_tags`` in
its task.json) and must match the run's setting.

On easy-VQA, the target-language questions come from the template grammar of
:mod:`cclm.tasks.easy_vqa_languages` (``train:ja``, ``test:hi`` splits), and translate-test uses the same
grammar backwards (exact), unless ``data.translate_test`` names files.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from cclm.config import (
    CONFIG_ROOT,
    ConfigError,
    CViLVQARecipeConfig,
    ModelConfig,
    load_config,
    require,
    to_dict,
)
from cclm.data.normalize import normalizer_for
from cclm.data.tokenize import load_tokenizer, train_tokenizer
from cclm.model.cross_view import CrossViewModel, check_tokenizer_fits
from cclm.recipes.cvil import (
    Distiller,
    ParallelCollator,
    ParallelDataset,
    ParallelExample,
    align_parallel,
    distillation_suite,
    run_distillation,
    set_trainable,
)
from cclm.recipes.object_tags import ImageTags, build_image_tags, encode_with_tags
from cclm.recipes.runner import (
    RESULT_FILES,
    StageChain,
    TrainedParams,
    check_stage_dirs,
    move_old_run,
    recipe_resume,
    run_stage,
    write_recipe_results,
)
from cclm.runtime.env import DistEnv, barrier, init_distributed, seed_everything
from cclm.runtime.run_lock import held_until_exit
from cclm.runtime.sources import EpochBatches
from cclm.runtime.stop_signal import holds_stop_signal
from cclm.tasks import easy_vqa_languages
from cclm.tasks.batching import ClassificationDataset, TaskBatches, TaskCollator
from cclm.tasks.finetune import FinetuneSettings, finetune, predict
from cclm.tasks.metrics import accuracy
from cclm.tasks.protocols import TaskSuite
from cclm.tasks.task_data import NO_GOLD_CLASS, ClassificationData, ClassificationExample
from cclm.tasks.task_model import TaskModel

log = logging.getLogger("cclm.recipes")
TEACHER, DISTILL, TARGET = "teacher", "distill", "target"
TAGS_KEY = "object_tags"  # in a teacher's task.json: trained with object tags or not
TEACHER_RUN = f"{TEACHER}/run"  # the teacher stage's folder (its model is saved in <output_dir>/teacher)
# Every stage the recipe has, in order; and what a run writes next to them (overwrite=true moves both aside).
KNOWN_STAGES = (TEACHER_RUN, DISTILL, TARGET)
ARTIFACTS = (*RESULT_FILES, "student", "config.json")


# ------------------------------------------------------------------------------------------------------ data
@dataclasses.dataclass(frozen=True)
class TargetPair(ParallelExample):
    lang: str = ""


class TaggedDataset(ClassificationDataset):
    """Task examples with the object tags of their images in the example's language (``tags``; none: no key)."""

    def __init__(self, examples, roots, image_size: int, tags: ImageTags | None):
        super().__init__(examples, roots, image_size)
        self.tags = tags

    def fields(self, example: ClassificationExample) -> dict[str, Any]:
        fields = {"text": example.text, "label": example.label}
        if self.tags is not None:
            fields["tags"] = self.tags(example.images, example.language)
        return fields


class TaggedParallelDataset(ParallelDataset):
    """Parallel questions with each side's tags: English for the teacher, the pair's language for the student."""

    def __init__(self, pairs: Sequence[TargetPair], roots, image_size: int, tags: ImageTags | None):
        super().__init__(pairs, roots, image_size)
        self.tags = tags

    def fields(self, example: TargetPair) -> dict[str, Any]:
        fields = super().fields(example)
        if self.tags is not None:
            fields["en_tags"] = self.tags(example.images, "en")
            fields["tgt_tags"] = self.tags(example.images, example.lang)
        return fields


class TaggedCollator:
    """:class:`TaskCollator` batches with the items' ``tags`` (when they carry them) as the second segment."""

    def __init__(self, collator: TaskCollator):
        self.collator = collator

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.collator.tokenize(texts)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        tags = [item["tags"] for item in items] if "tags" in items[0] else None
        batch = encode_with_tags(self.collator, [item["text"] for item in items], tags)
        batch["images"] = torch.stack([item["images"] for item in items])
        batch["labels"] = torch.tensor([item["label"] for item in items], dtype=torch.long)
        return batch


def subset(data: ClassificationData, size: int, seed: int) -> ClassificationData:
    """A seeded random subset of ``size`` examples (in file order; all when ``size`` is 0 or larger). Files of the
    same length get the same positions: a file and its translation keep the same questions."""
    if size <= 0 or size >= len(data.examples):
        return data
    keep = sorted(random.Random(seed).sample(range(len(data.examples)), size))
    return dataclasses.replace(data, examples=[data.examples[i] for i in keep])


def translated_back(data: ClassificationData, lang: str) -> ClassificationData:
    """easy-VQA questions in ``lang`` translated back into English by the grammar (translate-test)."""
    examples = [
        dataclasses.replace(e, text=easy_vqa_languages.to_english(e.text, lang), language="en")
        for e in data.examples
    ]
    return dataclasses.replace(data, examples=examples, languages={"en"})


# ---------------------------------------------------------------------------------------------------- models
def with_tokenizer(model: TaskModel, old_tokenizer, new_tokenizer) -> TaskModel:
    """A copy of ``model`` whose word embeddings index ``new_tokenizer``'s vocabulary: a piece both vocabularies
    have keeps its row, the other rows start as the encoder initialises them (so do other vocabulary-sized
    tensors, the MLM bias)."""
    if model.decodes_answers:
        raise ConfigError("cViL VQA distils a classifier's answer distribution: use a head=iglue teacher")
    cfg = copy.deepcopy(model.backbone.cfg)
    cfg.text.encoder["vocab_size"] = len(new_tokenizer)
    new = TaskModel(
        CrossViewModel(cfg, load_pretrained=False),
        model.task,
        model.kind,
        model.label_names,
        model.head_style,
    )
    old_vocab, new_vocab = old_tokenizer.get_vocab(), new_tokenizer.get_vocab()
    pairs = [(new_id, old_vocab[piece]) for piece, new_id in new_vocab.items() if piece in old_vocab]
    dst, src = (torch.tensor(ids, dtype=torch.long) for ids in zip(*pairs))
    state, fresh = model.state_dict(), new.state_dict()
    for name, tensor in state.items():
        if tensor.shape != fresh[name].shape:  # vocabulary-sized
            rows = fresh[name].clone()
            rows[dst] = tensor[src]
            state[name] = rows
    new.load_state_dict(state)
    log.info("student vocabulary: %d pieces, %d shared with the teacher's", len(new_vocab), len(pairs))
    return new


def _model_yaml(name: str) -> Path:
    return Path(name) if name.endswith((".yaml", ".yml")) else CONFIG_ROOT / "model" / f"{name}.yaml"


def load_vqa_teacher(cfg: CViLVQARecipeConfig, labels: list[str]) -> tuple[TaskModel, Any]:
    directory = Path(cfg.teacher)
    model = TaskModel.load(directory)
    info = TaskModel.task_info(directory)
    if model.kind != "single" or model.label_names != labels:
        raise ConfigError(
            f"teacher {directory}: not a single-image model with this task's {len(labels)} answers"
        )
    tagged = bool(info.get(TAGS_KEY, False))
    if tagged != bool(cfg.object_tags.enabled):
        raise ConfigError(
            f"teacher {directory} was fine-tuned {'with' if tagged else 'without'} object tags, the run has "
            f"object_tags.enabled={cfg.object_tags.enabled}: set it to {tagged}, or teacher=null to fine-tune one"
        )
    tokenizer = load_tokenizer(str(directory))
    check_tokenizer_fits(model.backbone, tokenizer, directory, directory)
    return model, tokenizer


class Scorer:
    """Accuracy of a task model on examples, each read with its object tags (when the run has tags)."""

    def __init__(self, suite: TaskSuite, tags: ImageTags | None, batch_size: int):
        self.suite, self.tags, self.batch_size = suite, tags, int(batch_size)

    def collator(self, model: TaskModel, tokenizer) -> TaggedCollator:
        return TaggedCollator(TaskCollator.for_model(model.backbone, tokenizer))

    def dataset(self, model: TaskModel, examples) -> TaggedDataset:
        return TaggedDataset(examples, self.suite.roots, int(model.backbone.cfg.vision.image_size), self.tags)

    def __call__(self, model: TaskModel, tokenizer, data: ClassificationData) -> float:
        model.to(self.suite.device)
        loader = DataLoader(
            self.dataset(model, data.examples), self.batch_size, collate_fn=self.collator(model, tokenizer)
        )
        predictions, labels = predict(model, loader, self.suite.device, self.suite.precision)
        return accuracy(predictions, labels)


def finetune_teacher(
    cfg: CViLVQARecipeConfig,
    english: ClassificationData,
    dev: ClassificationData,
    scorer: Scorer,
    env: DistEnv,
    chain: StageChain | None = None,
) -> tuple[TaskModel, Any]:
    """Stage "teacher": an English VQA model fine-tuned from random init, with the run's tag setting; saved to
    ``<output_dir>/teacher`` (a task folder: ``teacher=`` of a later run). ``chain``: the recipe's stages
    (:class:`StageChain`; None: resumed as ``cfg.resume`` says)."""
    t, out = cfg.teacher_finetune, Path(cfg.output_dir)
    model_cfg = load_config(ModelConfig, _model_yaml(t.model), list(t.model_overrides))
    folder = out / "teacher_tokenizer"
    if env.is_main:
        normalize = normalizer_for(model_cfg.text)
        texts = [normalize(e.text) for e in english.examples]
        if scorer.tags is not None:
            texts += sorted({normalize(scorer.tags(e.images, "en")) for e in english.examples})
        train_tokenizer(texts, folder, vocab_size=int(t.vocab_size), model=str(t.tokenizer_model))
    barrier()
    tokenizer = load_tokenizer(str(folder))
    model_cfg.text.encoder["vocab_size"] = len(tokenizer)
    seed_everything(cfg.train.seed)
    model = TaskModel(CrossViewModel(model_cfg), str(cfg.data.task), "single", scorer.suite.label_names())
    size = int(model.backbone.cfg.vision.image_size)
    source = TaskBatches(
        TaggedDataset(english.examples, scorer.suite.roots, size, scorer.tags),
        int(t.batch_size),
        scorer.collator(model, tokenizer),
        seed=int(cfg.train.seed),
        rank=env.rank,
        world_size=env.world_size,
    )
    settings = FinetuneSettings(
        lr=float(t.lr),
        max_steps=int(t.steps),
        head_lr_mult=float(t.head_lr_mult),
        warmup_ratio=float(t.warmup_ratio),
        eval_every=int(t.eval_every) or int(t.steps),
        log_every=int(cfg.train.log_every),
        save_every=int(cfg.train.save_every),
        keep_last=int(cfg.train.keep_last),
        seed=int(cfg.train.seed),
    )
    chain = chain if chain is not None else StageChain(cfg, list(KNOWN_STAGES), [TEACHER_RUN])
    resume, overwrite = chain.start(TEACHER_RUN)
    chain.ran(TEACHER_RUN, chain.will_train(TEACHER_RUN, int(t.steps)))
    try:
        model, selection = finetune(
            model,
            source,
            lambda m: scorer(m, tokenizer, dev),
            settings,
            env=env,
            output_dir=out / TEACHER_RUN,
            deepspeed_cfg=cfg.deepspeed,
            run_config=to_dict(cfg),
            resume=resume,
            overwrite=overwrite,
        )
    finally:
        source.close()
    log.info("English teacher: dev accuracy %.2f at step %d", selection.best_score, selection.best_step)
    if env.is_main:
        info = {"selection": {"dev": selection.best_score, "step": selection.best_step}}
        model.save(out / TEACHER, tokenizer, extra={TAGS_KEY: bool(cfg.object_tags.enabled), **info})
    return model, tokenizer


def student_tokenizer(cfg: CViLVQARecipeConfig, pairs: Sequence[TargetPair], teacher: TaskModel, tags, env):
    """``student.tokenizer``, or one trained on the target-language questions (and tags), CJK characters split."""
    if cfg.student.tokenizer:
        return load_tokenizer(cfg.student.tokenizer)
    folder = Path(cfg.output_dir) / "student_tokenizer"
    if env.is_main:
        normalize = normalizer_for(teacher.backbone.cfg.text)
        texts = [normalize(p.target) for p in pairs]
        if tags is not None:
            texts += sorted({normalize(tags(p.images, p.lang)) for p in pairs})
        s = cfg.student
        train_tokenizer(
            texts, folder, vocab_size=int(s.vocab_size), model=str(s.tokenizer_model), split_cjk=True
        )
    barrier()
    return load_tokenizer(str(folder))


def trained_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------------- run
def _check(cfg: CViLVQARecipeConfig, suite: TaskSuite) -> list[str]:
    require(cfg, "languages")
    languages = [str(lang) for lang in cfg.languages]
    missing = [lang for lang in languages if lang not in cfg.data.parallel]
    if missing:
        raise ConfigError(
            f"no parallel questions for language(s) {missing}: data.parallel has {sorted(cfg.data.parallel)}"
        )
    if suite.kind != "single":
        raise ConfigError(
            f"cViL VQA needs a single-image classification task, '{cfg.data.task}' is {suite.kind}"
        )
    if cfg.target_finetune.enabled and not cfg.data.target_train:
        raise ConfigError(
            "target_finetune.enabled needs data.target_train (target-language VQA data with answers)"
        )
    return languages


@holds_stop_signal
@held_until_exit()  # its stage folders stay locked until it has written into them, then are let go
def run_cvil_vqa(cfg: CViLVQARecipeConfig) -> dict[str, Any]:
    """Every stage, then the scores. ``trained_params`` of the results: every student parameter the distillation
    or target stage trained, counted once (the teacher's fine-tuning is ``stages.teacher.trained_params``)."""
    recipe_resume(cfg, warn=True)
    planned = [
        *([] if cfg.teacher else [TEACHER_RUN]),
        DISTILL,
        *([TARGET] if cfg.target_finetune.enabled else []),
    ]
    check_stage_dirs(cfg, list(KNOWN_STAGES))  # an old run's stages this config does not plan too
    env = init_distributed()
    suite = distillation_suite(cfg, env)
    languages = _check(cfg, suite)
    seed, out = int(cfg.train.seed), Path(cfg.output_dir)
    move_old_run(cfg, list(KNOWN_STAGES), list(ARTIFACTS))
    chain, trained = StageChain(cfg, list(KNOWN_STAGES), planned), TrainedParams()
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    tags = build_image_tags(cfg.object_tags, cfg.data.image_roots)
    scorer = Scorer(suite, tags, max(int(cfg.distill.batch_size), 64))
    english = subset(suite.read(cfg.data.train), int(cfg.data.train_examples), seed)
    suite.check_images([english])
    stats: dict[str, Any] = {}
    if cfg.teacher:
        teacher, teacher_tokenizer = load_vqa_teacher(cfg, suite.label_names())
    else:
        dev = subset(suite.read(cfg.data.dev, scored=True), int(cfg.data.test_examples), seed)
        teacher, teacher_tokenizer = finetune_teacher(cfg, english, dev, scorer, env, chain)
        stats[TEACHER] = {
            "trained_params": trained_parameters(teacher),
            "steps": int(cfg.teacher_finetune.steps),
        }

    skipped: dict[str, dict[str, int]] = {}
    pairs = [
        TargetPair(p.uid, p.images, p.english, p.target, lang)
        for lang in languages
        for p in align_parallel(english, suite.read(cfg.data.parallel[lang]), lang, skipped)
    ]
    tokenizer = student_tokenizer(cfg, pairs, teacher, tags, env)
    seed_everything(seed)
    student = with_tokenizer(teacher, teacher_tokenizer, tokenizer)
    set_trainable(student, list(cfg.distill.trainable))
    # dev and test files are scored as IGLUE scores them: a question without a gold class (an xGQA answer
    # outside the vocabulary) is kept and counts as wrong; training files leave it out
    tests = {
        lang: subset(suite.read(path, scored=True), int(cfg.data.test_examples), seed)
        for lang, path in cfg.data.test.items()
    }
    suite.check_images(list(tests.values()))
    before = {lang: scorer(student, tokenizer, data) for lang, data in tests.items() if lang != "en"}

    stats[DISTILL] = distill(
        cfg, teacher, teacher_tokenizer, student, tokenizer, pairs, scorer, env, chain, trained
    )
    if cfg.target_finetune.enabled:
        stats[TARGET] = target_finetune(cfg, student, tokenizer, scorer, env, chain, trained)

    rows = score_languages(cfg, scorer, tests, (teacher, teacher_tokenizer), (student, tokenizer), before)
    total = sum(p.numel() for p in student.parameters())
    teacher_dir = str(cfg.teacher or out / TEACHER)
    extra = {
        "stages": stats,
        "skipped_pairs": skipped,
        "object_tags": bool(cfg.object_tags.enabled),
        "teacher": teacher_dir,
    }
    if env.is_main:
        info = {"distilled_from": teacher_dir, TAGS_KEY: extra["object_tags"]}
        student.save(out / "student", tokenizer, extra=info)
        write_recipe_results(out, rows, trained.count, total, extra)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    return {"languages": rows, "trained_params": trained.count, "total_params": total, **extra}


def distill(
    cfg, teacher, teacher_tokenizer, student, tokenizer, pairs, scorer: Scorer, env, chain=None, trained=None
) -> dict:
    """Stage "distill": the student learns the teacher's answers and fused [CLS] on the parallel questions.
    ``chain``, ``trained``: the recipe's stages and trained parameters (:func:`run_stage`)."""
    model = Distiller(teacher, student, cfg.distill)
    size = int(teacher.backbone.cfg.vision.image_size)
    dataset = TaggedParallelDataset(pairs, scorer.suite.roots, size, scorer.tags)
    stats = {"trained_params": trained_parameters(model), "parallel_questions": len(pairs)}
    log.info(
        "cViL VQA: distilling %d parameters on %d parallel questions", stats["trained_params"], len(pairs)
    )
    collator = ParallelCollator(teacher, teacher_tokenizer, student, tokenizer)
    stats.update(run_distillation(model, dataset, collator, cfg, env, DISTILL, chain, trained))
    return stats


def score_languages(cfg, scorer: Scorer, tests, teacher, student, before: dict[str, float]) -> dict:
    """Per test language: the teacher on English; the student (and before distillation), translate-test and the
    student's accuracy relative to the teacher's English one on the others."""
    rows: dict[str, dict[str, float]] = {}
    for lang, data in tests.items():
        # among `examples`, scored as wrong (no gold class)
        no_gold_class = sum(example.label == NO_GOLD_CLASS for example in data.examples)
        if lang == "en":
            rows[lang] = {
                "teacher_accuracy": scorer(*teacher, data),
                "examples": len(data.examples),
                "no_gold_class": no_gold_class,
            }
            continue
        rows[lang] = {
            "accuracy": scorer(*student, data),
            "untrained_student_accuracy": before[lang],
            "examples": len(data.examples),
            "no_gold_class": no_gold_class,
        }
        back = translate_test_data(cfg, scorer.suite, lang, data, int(cfg.train.seed))
        if back is not None:
            rows[lang]["translate_test_accuracy"] = scorer(*teacher, back)
    teacher_en = rows.get("en", {}).get("teacher_accuracy")
    for lang, row in rows.items():
        if teacher_en and lang != "en":
            row["relative_to_teacher_en"] = row["accuracy"] / teacher_en
    return rows


def target_finetune(
    cfg: CViLVQARecipeConfig, student: TaskModel, tokenizer, scorer: Scorer, env, chain=None, trained=None
) -> dict:
    """Stage "target": cross-entropy on target-language VQA data with answers (data.target_train).
    ``chain``, ``trained``: the recipe's stages and trained parameters (:func:`run_stage`)."""
    t = cfg.target_finetune
    set_trainable(student, list(t.trainable), "target_finetune.trainable")
    examples = [
        e
        for lang, path in cfg.data.target_train.items()
        for e in subset(scorer.suite.read(path), int(cfg.data.train_examples), int(cfg.train.seed)).examples
    ]
    batch_size = int(cfg.distill.batch_size)
    source = EpochBatches(
        scorer.dataset(student, examples),
        batch_size,
        scorer.collator(student, tokenizer),
        seed=int(cfg.train.seed),
        rank=env.rank,
        world_size=env.world_size,
        view=TARGET,
    )
    stats = {"trained_params": trained_parameters(student), "examples": len(examples)}
    try:
        stats.update(
            run_stage(
                student,
                cfg,
                TARGET,
                int(t.steps),
                source,
                batch_size,
                env,
                lr=t.lr,
                chain=chain,
                trained_params=trained,
            )
        )
    finally:
        source.close()
    return stats


def translate_test_data(cfg, suite: TaskSuite, lang: str, data: ClassificationData, seed: int):
    """The ``lang`` test questions in English: ``data.translate_test.<lang>``, or easy-VQA's grammar backwards."""
    if lang in cfg.data.translate_test:
        return subset(
            suite.read(cfg.data.translate_test[lang], scored=True), int(cfg.data.test_examples), seed
        )
    if str(cfg.data.task) == "easy_vqa":
        return translated_back(data, lang)
    return None
