"""cViL: cross-lingual transfer of a fine-tuned English task model by knowledge distillation.

    teacher (frozen): image + English sentence    ──► fused [CLS] ──► task logits
    student:          image + target-language sentence ──► fused [CLS] ──► task logits
    loss = kl_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + cls_weight * MSE([CLS]s)
           (or cls_weight * (1 - cos([CLS]s)) with distill.cls_loss=cosine)

The student has the teacher's vision side (copied and frozen) and a target-language text side: a copy of the
teacher's text/fusion stacks and head, or the text/fusion stacks of another cclm model (``student_init``, e.g. a
multilingually pretrained one) with the teacher's head. Which parts train is ``distill.trainable`` (text, fusion,
head). The inputs are the task's English training sentences paired with their images and their translations
(``data.parallel``: the same file translated, aligned by example id); the gold labels of the translations are
never read. The student is then scored on each language's test file, next to the teacher, as IGLUE scores it:
an example without a gold class (XVNLI's ``-``, an xGQA answer outside the vocabulary) counts as wrong.

The VQA path with object tags, a student tokenizer of its own and translate-test is :mod:`cclm.recipes.cvil_vqa`;
it reuses the losses, :class:`Distiller`, :func:`build_student` and :class:`ParallelCollator` of this module.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from cclm.config import (
    ClsLoss,
    ConfigError,
    CViLRecipeConfig,
    CViLVQARecipeConfig,
    StudentPart,
    require,
    to_dict,
)
from cclm.data.tokenize import load_tokenizer
from cclm.model.cross_view import CrossViewModel, check_tokenizer_fits
from cclm.recipes.object_tags import encode_with_tags
from cclm.recipes.runner import check_stage_dirs, recipe_resume, run_stage, write_recipe_results
from cclm.runtime.engine import configured_precision
from cclm.runtime.env import DistEnv, init_distributed, seed_everything
from cclm.runtime.run_lock import held_until_exit
from cclm.runtime.sources import EpochBatches
from cclm.runtime.stop_signal import holds_stop_signal
from cclm.tasks.batching import ClassificationDataset, TaskCollator
from cclm.tasks.images import ImageRef
from cclm.tasks.protocols import TaskSuite
from cclm.tasks.task_model import HEAD_WEIGHTS, TaskModel

log = logging.getLogger("cclm.recipes")
TRAINABLE_PARTS = tuple(part.value for part in StudentPart)
STAGE = "distill"


# ---------------------------------------------------------------------------------------------------- losses
def distillation_losses(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_cls: torch.Tensor,
    teacher_cls: torch.Tensor,
    temperature: float,
    kl_weight: float,
    cls_weight: float,
    cls_loss: ClsLoss | str = ClsLoss.mse,
) -> dict[str, torch.Tensor]:
    """KL on temperature-softened logits (scaled by T^2 so its gradients keep their size as T changes, as in
    Hinton et al.) plus MSE (``cls_mse``) or 1 - cosine similarity (``cls_cosine``) of the fused [CLS] features;
    exactly zero when the student matches the teacher."""
    t = float(temperature)
    if t <= 0:
        raise ConfigError(f"distill.temperature must be positive, got {t}")
    kl = F.kl_div(
        F.log_softmax(student_logits.float() / t, dim=-1),
        F.log_softmax(teacher_logits.float() / t, dim=-1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)
    kind = ClsLoss(str(cls_loss))
    if kind == ClsLoss.mse:
        cls = F.mse_loss(student_cls.float(), teacher_cls.float())
    else:
        cls = 1.0 - F.cosine_similarity(student_cls.float(), teacher_cls.float(), dim=-1).mean()
    return {"kl": kl, f"cls_{kind.value}": cls, "loss": kl_weight * kl + cls_weight * cls}


def task_outputs(
    model: TaskModel, batch: dict[str, torch.Tensor], prefix: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(class logits, fused [CLS] features) of a task model on ``<prefix>_ids/<prefix>_mask`` + ``images``; for
    image-pair tasks the [CLS] of both images, concatenated (what the head sees)."""
    if model.kind == "retrieval":
        raise ConfigError(f"cViL distils class logits; task kind '{model.kind}' has none")
    cls = model.features(batch["images"], batch[f"{prefix}_ids"], batch[f"{prefix}_mask"])
    return model.head(cls), cls


class Distiller(nn.Module):
    """The student (registered: it is what the engine trains and checkpoints) next to the frozen teacher (held)."""

    def __init__(self, teacher: TaskModel, student: TaskModel, distill_cfg):
        super().__init__()
        object.__setattr__(self, "teacher", teacher)
        for param in teacher.parameters():
            param.requires_grad_(False)
        teacher.eval()
        self.student = student
        self.cfg = distill_cfg

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.teacher._apply(fn)
        return self

    def train(self, mode: bool = True) -> Distiller:
        """The student's trained parts follow ``mode``; its frozen parts (the vision tower, and fusion or head
        where ``distill.trainable`` leaves them out) run as in evaluation, as the teacher does: their dropout and
        drop-path would otherwise perturb the very features the student is distilled to match."""
        super().train(mode)
        self.teacher.eval()
        for part in frozen_parts(self.student):
            part.eval()
        return self

    def forward(self, batch: dict[str, torch.Tensor], stage: str = STAGE) -> dict[str, torch.Tensor]:
        if stage != STAGE:
            raise ValueError(f"unknown cViL stage '{stage}'")
        with torch.no_grad():
            teacher_logits, teacher_cls = task_outputs(self.teacher, batch, "teacher")
        student_logits, student_cls = task_outputs(self.student, batch, "student")
        cfg = self.cfg
        return distillation_losses(
            student_logits,
            teacher_logits,
            student_cls,
            teacher_cls,
            cfg.temperature,
            cfg.kl_weight,
            cfg.cls_weight,
            cfg.cls_loss,
        )


# ---------------------------------------------------------------------------------------------------- models
def head_outputs(directory: str | Path) -> int:
    """Number of classes of a saved task head (read from the weights, not trusted from task.json)."""
    path = Path(directory) / HEAD_WEIGHTS
    if not path.exists():
        raise FileNotFoundError(f"{directory} has no {HEAD_WEIGHTS}: not a fine-tuned classification model")
    with safe_open(str(path), framework="pt") as f:
        last = sorted(k for k in f.keys() if k.endswith(".weight") and k.startswith("net."))[-1]
        return int(f.get_slice(last).get_shape()[0])


def load_teacher(directory: str | Path, task: str, labels: list[str]) -> TaskModel:
    directory = Path(directory)
    info = TaskModel.task_info(directory) if (directory / "task.json").exists() else None
    if info is None:
        raise FileNotFoundError(f"teacher {directory} is not a fine-tuned task folder (no task.json)")
    outputs = head_outputs(directory)
    if outputs != len(labels):
        raise ConfigError(
            f"teacher {directory} has a task head with {outputs} outputs, but task '{task}' has {len(labels)} "
            f"labels {labels}: distil a teacher fine-tuned on this task"
        )
    if list(info.get("labels", [])) != list(labels):
        raise ConfigError(
            f"teacher {directory} was trained with labels {info.get('labels')}, task '{task}' has {labels}"
        )
    return TaskModel.load(directory)


def frozen_parts(module: nn.Module):
    """The largest sub-modules of ``module`` whose parameters are all frozen (a module without parameters of its
    own, such as a dropout between trained layers, belongs to its parent)."""
    for child in module.children():
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            yield child
        else:
            yield from frozen_parts(child)


def set_trainable(student: TaskModel, trainable: list[str], key: str = "distill.trainable") -> None:
    """Only the named parts of ``student`` (``text``, ``fusion``, ``head``) train; the rest is frozen."""
    trainable = [str(part) for part in trainable]
    unknown = sorted(set(trainable) - set(TRAINABLE_PARTS))
    if unknown or not trainable:
        raise ConfigError(f"{key}: {unknown or trainable} not in {TRAINABLE_PARTS} (name at least one)")
    parts = {"text": student.backbone.text, "fusion": student.backbone.fusion, "head": student.head}
    for param in student.parameters():
        param.requires_grad_(False)
    for name in trainable:
        for param in parts[name].parameters():
            param.requires_grad_(True)


def build_student(teacher: TaskModel, student_init: str | None, trainable: list[str]) -> TaskModel:
    if student_init is None:
        student = copy.deepcopy(teacher)
    else:
        backbone = CrossViewModel.from_pretrained(student_init)
        student = TaskModel(backbone, teacher.task, teacher.kind, teacher.label_names)
        try:
            student.backbone.vision.load_state_dict(teacher.backbone.vision.state_dict())
            student.backbone.image_to_fusion.load_state_dict(teacher.backbone.image_to_fusion.state_dict())
            student.head.load_state_dict(teacher.head.state_dict())
        except RuntimeError as err:
            raise ConfigError(
                f"student_init {student_init}: its vision side / hidden size differs from the teacher's, so the "
                f"teacher's vision tower and head cannot be shared ({str(err).splitlines()[0]})"
            ) from None
    set_trainable(student, trainable)
    return student


# ------------------------------------------------------------------------------------------------------ data
@dataclass(frozen=True)
class ParallelExample:
    uid: str
    images: tuple[ImageRef, ...]
    english: str
    target: str


def align_parallel(
    english, target, lang: str, skipped: dict[str, dict[str, int]] | None = None
) -> list[ParallelExample]:
    """Pair the English and translated examples by id; the translation's labels are not used. A pair whose
    translation or English sentence is empty (or only whitespace: a failed machine translation) is left out,
    counted and warned about; ``skipped[lang]`` gets the counts (``no_translation``, ``empty_translation``,
    ``empty_english``). A language left with no pair is an error."""
    by_uid = {e.uid: e for e in target.examples}
    pairs: list[ParallelExample] = []
    counts = {"no_translation": 0, "empty_translation": 0, "empty_english": 0}
    for example in english.examples:
        other = by_uid.get(example.uid)
        if other is None:
            counts["no_translation"] += 1
            continue
        if other.images != example.images:
            raise ValueError(
                f"{target.file}: example {example.uid} has images {other.images}, English has {example.images}"
            )
        if not str(example.text or "").strip():
            counts["empty_english"] += 1
            continue
        if not str(other.text or "").strip():
            counts["empty_translation"] += 1
            continue
        pairs.append(ParallelExample(example.uid, example.images, example.text, other.text))
    if skipped is not None:
        skipped[lang] = counts
    shared = len(english.examples) - counts["no_translation"]
    if not shared:
        raise ConfigError(
            f"data.parallel.{lang} ({target.file}) shares no example id with data.train ({english.file})"
        )
    if not pairs:
        raise ConfigError(
            f"data.parallel.{lang} ({target.file}): every one of the {shared} examples it shares with data.train "
            f"has an empty sentence ({counts['empty_translation']} empty translations, "
            f"{counts['empty_english']} empty English sentences): nothing to distil from; fix the translations"
        )
    if counts["no_translation"]:
        log.warning(
            "%s: %d English examples have no translation and are left out", lang, counts["no_translation"]
        )
    empty = counts["empty_translation"] + counts["empty_english"]
    if empty:
        log.warning(
            "%s: %d of %d pairs left out for an empty sentence (%d empty translations, %d empty English "
            "sentences); %d pairs remain",
            lang,
            empty,
            shared,
            counts["empty_translation"],
            counts["empty_english"],
            len(pairs),
        )
    return pairs


class ParallelDataset(ClassificationDataset):
    """Items: ``images`` (as the task's), the English sentence ``en`` and its translation ``tgt``."""

    def fields(self, example: ParallelExample) -> dict[str, Any]:
        return {"en": example.english, "tgt": example.target}


class ParallelCollator:
    """Tokenizes the English side as the teacher reads text (its tokenizer, text normaliser and max length) and
    the translation as the student does (:meth:`TaskCollator.for_model` of each backbone). Items with ``en_tags``
    and ``tgt_tags`` (object tags, :mod:`cclm.recipes.object_tags`) get them as each side's second segment."""

    def __init__(self, teacher: TaskModel, teacher_tokenizer, student: TaskModel, student_tokenizer):
        self.sides = {
            "teacher": ("en", TaskCollator.for_model(teacher.backbone, teacher_tokenizer)),
            "student": ("tgt", TaskCollator.for_model(student.backbone, student_tokenizer)),
        }

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = {"images": torch.stack([item["images"] for item in items])}
        for side, (key, collator) in self.sides.items():
            tags = [item[f"{key}_tags"] for item in items] if f"{key}_tags" in items[0] else None
            enc = encode_with_tags(collator, [item[key] for item in items], tags)
            batch[f"{side}_ids"], batch[f"{side}_mask"] = enc["text_ids"], enc["text_mask"]
        return batch


# ------------------------------------------------------------------------------------------------------- run
def run_distillation(
    model: Distiller, dataset, collator, cfg, env, stage: str, chain=None, trained_params=None
) -> dict[str, float]:
    """The distillation stage over ``dataset`` (parallel examples) for ``distill.steps`` (else ``distill.epochs``
    epochs) of ``distill.batch_size`` per rank; returns the stage's last logged scalars. ``chain`` and
    ``trained_params``: as :func:`cclm.recipes.runner.run_stage`'s."""
    batch_size = int(cfg.distill.batch_size)
    source = EpochBatches(
        dataset,
        batch_size,
        collator,
        seed=int(cfg.train.seed),
        rank=env.rank,
        world_size=env.world_size,
        drop_last=len(dataset) // env.world_size > batch_size,
        view=stage,
    )
    steps = int(cfg.distill.steps) or int(cfg.distill.epochs) * len(source)
    try:
        return run_stage(
            model, cfg, stage, steps, source, batch_size, env, chain=chain, trained_params=trained_params
        )
    finally:
        source.close()


def distillation_suite(cfg: CViLRecipeConfig | CViLVQARecipeConfig, env: DistEnv) -> TaskSuite:
    """The task's reader and evaluator for a cViL recipe, evaluating at the distillation batch size."""
    return TaskSuite(
        cfg.data.task,
        cfg.data,
        env=env,
        precision=configured_precision(cfg.deepspeed),
        eval_batch_size=cfg.distill.batch_size,
    )


@holds_stop_signal
@held_until_exit()  # its stage folders stay locked until it has written into them, then are let go
def run_cvil(cfg: CViLRecipeConfig) -> dict[str, Any]:
    require(cfg, "teacher", "languages", "data.train")
    recipe_resume(cfg, warn=True)
    languages = list(cfg.languages)
    missing = [lang for lang in languages if lang not in cfg.data.parallel]
    if missing:
        raise ConfigError(
            f"no parallel data for language(s) {missing}: data.parallel has {sorted(cfg.data.parallel)} "
            "(map each target language to the training file translated into it)"
        )
    check_stage_dirs(cfg, [STAGE])
    env = init_distributed()
    runner = distillation_suite(cfg, env)
    labels = runner.label_names()
    if not labels:
        raise ConfigError(f"task '{cfg.data.task}' is not a classification task; cViL distils class logits")
    teacher = load_teacher(cfg.teacher, cfg.data.task, labels)
    teacher_tokenizer = load_tokenizer(cfg.teacher)
    student_tokenizer = load_tokenizer(cfg.student_init) if cfg.student_init else teacher_tokenizer
    check_tokenizer_fits(teacher.backbone, teacher_tokenizer, cfg.teacher, cfg.teacher)
    english = runner.read(cfg.data.train)
    skipped: dict[str, dict[str, int]] = {}
    examples = [
        ex
        for lang in languages
        for ex in align_parallel(english, runner.read(cfg.data.parallel[lang]), lang, skipped)
    ]
    runner.check_images([english])

    seed_everything(cfg.train.seed)
    student = build_student(teacher, cfg.student_init, list(cfg.distill.trainable))
    check_tokenizer_fits(
        student.backbone, student_tokenizer, cfg.student_init or cfg.teacher, cfg.student_init or cfg.teacher
    )
    model = Distiller(teacher, student, cfg.distill)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in student.parameters())
    log.info(
        "cViL: training %d of %d student parameters on %d parallel examples", trained, total, len(examples)
    )
    image_size = int(teacher.backbone.cfg.vision.image_size)
    dataset = ParallelDataset(examples, dict(cfg.data.image_roots), image_size)
    out_dir = Path(cfg.output_dir)
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    collator = ParallelCollator(teacher, teacher_tokenizer, student, student_tokenizer)
    stats = run_distillation(model, dataset, collator, cfg, env, STAGE)

    rows: dict[str, dict[str, float]] = {}
    for lang, path in cfg.data.test.items():
        # scored as IGLUE scores a test file: an example without a gold class (an XVNLI '-' record, an xGQA
        # answer outside the vocabulary) is kept and scored as wrong, not left out as in training
        data = runner.read(path, scored=True)
        runner.check_images([data])
        scores = runner.score(student, student_tokenizer, data)
        rows[lang] = {
            "accuracy": scores["accuracy"],
            "teacher_accuracy": runner.score(teacher, teacher_tokenizer, data)["accuracy"],
            "examples": len(data.examples),
            "no_gold_class": scores["no_gold_class"],  # among `examples`, scored as wrong
        }
    teacher_en = rows.get("en", {}).get("teacher_accuracy")
    if teacher_en:
        for lang in languages:
            if lang in rows:
                rows[lang]["relative_to_teacher_en"] = rows[lang]["accuracy"] / teacher_en
    extra = {
        "training": stats,
        "parallel_examples": len(examples),
        "skipped_pairs": skipped,
        "teacher": str(cfg.teacher),
    }
    if env.is_main:
        student.save(out_dir / "student", student_tokenizer, extra={"distilled_from": str(cfg.teacher)})
        write_recipe_results(out_dir, rows, trained, total, extra)
        (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    return {"languages": rows, "trained_params": trained, "total_params": total, **extra}
