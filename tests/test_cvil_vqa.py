"""cViL for VQA (cclm.recipes.cvil_vqa) on real easy-VQA images: an English teacher fine-tuned with object tags is
distilled into a Japanese + Hindi student that beats its untrained self on held-out target-language questions;
each stage's optimizer holds exactly the parameters that stage should train; the losses match a direct
computation; a student with the teacher's own tokenizer is the teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cclm.runtime.trainer as trainer_module
from cclm.config import ConfigError, CViLVQARecipeConfig, load_config
from cclm.data.tokenize import load_tokenizer
from cclm.recipes.cvil import distillation_losses
from cclm.recipes.cvil_vqa import run_cvil_vqa, with_tokenizer
from cclm.tasks.task_model import TaskModel

pytest.importorskip("easy_vqa")
REPO = Path(__file__).resolve().parent.parent
YAML = REPO / "configs" / "recipes" / "cvil_easy_vqa.yaml"
SMALL = {
    "teacher_finetune.model_overrides": "[]",  # the tiny model's own 32 px
    "teacher_finetune.batch_size": "32",
    "teacher_finetune.lr": "2e-3",
    "data.train_examples": "1200",
    "data.test_examples": "300",
    "distill.batch_size": "32",
    "train.log_every": "1000",
}


def overrides(**changed: str) -> list[str]:
    """The small run's overrides with ``changed`` (dotted keys written with ``__``) replacing or adding keys."""
    merged = {**SMALL, **{key.replace("__", "."): value for key, value in changed.items()}}
    return [f"{key}={value}" for key, value in merged.items()]


def spying_engine(built: list[set[str]]):
    """``build_engine`` that also records the names of the parameters its optimizer holds, in build order."""
    real = trainer_module.build_engine

    def spy(model, **kwargs):
        engine, optimizer, scheduler, config = real(model, **kwargs)
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        built.append({name for name, p in model.named_parameters() if id(p) in held})
        return engine, optimizer, scheduler, config

    return spy


@pytest.fixture()
def optimizer_params(monkeypatch):
    built: list[set[str]] = []
    monkeypatch.setattr(trainer_module, "build_engine", spying_engine(built))
    return built


def names(module: torch.nn.Module, prefix: str) -> set[str]:
    return {f"{prefix}{name}" for name, _ in module.named_parameters()}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cvil_vqa")
    spy_built: list[set[str]] = []
    real = trainer_module.build_engine
    trainer_module.build_engine = spying_engine(spy_built)  # module scope: monkeypatch is per test
    try:
        cfg = load_config(
            CViLVQARecipeConfig,
            YAML,
            overrides(output_dir=str(out), teacher_finetune__steps="150", distill__steps="120"),
        )
        torch.manual_seed(0)
        results = run_cvil_vqa(cfg)
    finally:
        trainer_module.build_engine = real
    return out, results, spy_built


def test_student_learns_target_language_vqa_by_distillation(first_run):
    out, results, _ = first_run
    rows = results["languages"]
    teacher_en = rows["en"]["teacher_accuracy"]
    assert (
        teacher_en > 55.0
    )  # well above the most frequent answer ("yes", 37%): the teacher learned English VQA
    for lang in ("ja", "hi"):
        assert rows[lang]["accuracy"] > rows[lang]["untrained_student_accuracy"] + 15.0, rows
        assert rows[lang]["accuracy"] >= 0.85 * teacher_en, rows
        # The grammar's translations are exact: translate-test is the teacher on the English questions.
        assert rows[lang]["translate_test_accuracy"] == teacher_en
    written = json.loads((out / "results.json").read_text())
    assert written["languages"]["hi"]["accuracy"] == rows["hi"]["accuracy"] and written["object_tags"] is True
    assert json.loads((out / "teacher" / "task.json").read_text())["object_tags"] is True
    student = TaskModel.load(out / "student")
    assert student.label_names == TaskModel.load(out / "teacher").label_names


def test_teacher_and_distill_stages_train_only_their_parameters(first_run):
    out, _, built = first_run
    teacher_stage, distill_stage = built
    teacher, student = TaskModel.load(out / "teacher"), TaskModel.load(out / "student")
    assert teacher_stage == names(teacher, "")  # English fine-tuning: the whole model
    assert distill_stage == names(
        student.backbone.text, "student.backbone.text."
    )  # distill.trainable: [text]


def test_target_finetune_stage_and_a_given_teacher(first_run, optimizer_params, tmp_path):
    out, _, _ = first_run
    cfg = load_config(
        CViLVQARecipeConfig,
        YAML,
        overrides(
            teacher=str(out / "teacher"),
            output_dir=str(tmp_path),
            data__test_examples="64",
            distill__steps="2",
            distill__trainable="[text,fusion]",
            target_finetune__enabled="true",
            target_finetune__steps="2",
            target_finetune__trainable="[head]",
            data__target_train="{ja: 'train:ja'}",
        ),
    )
    results = run_cvil_vqa(cfg)
    assert "teacher" not in results["stages"]  # given, not fine-tuned
    student = TaskModel.load(tmp_path / "student")
    distill_stage, target_stage = optimizer_params
    assert distill_stage == names(student.backbone.text, "student.backbone.text.") | names(
        student.backbone.fusion, "student.backbone.fusion."
    )
    assert target_stage == names(student.head, "head.")
    assert results["stages"]["target"]["examples"] == 1200


def test_bad_configs_are_clear_errors(first_run, tmp_path):
    out, _, _ = first_run
    base = overrides(output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="fine-tuned with object tags"):
        run_cvil_vqa(
            load_config(
                CViLVQARecipeConfig, YAML, [*base, f"teacher={out / 'teacher'}", "object_tags.enabled=false"]
            )
        )
    with pytest.raises(ConfigError, match=r"no parallel questions for language\(s\) \['de'\]"):
        run_cvil_vqa(load_config(CViLVQARecipeConfig, YAML, [*base, "languages=[ja,de]"]))
    with pytest.raises(ConfigError, match="needs data.target_train"):
        run_cvil_vqa(load_config(CViLVQARecipeConfig, YAML, [*base, "target_finetune.enabled=true"]))


def test_a_student_with_the_teachers_tokenizer_is_the_teacher(first_run):
    out, _, _ = first_run
    teacher, tokenizer = TaskModel.load(out / "teacher").eval(), load_tokenizer(str(out / "teacher"))
    student = with_tokenizer(teacher, tokenizer, tokenizer).eval()
    enc = tokenizer(
        ["is there a red shape?", "what color is the circle?"],
        ["red circle", "blue circle"],
        padding=True,
        return_tensors="pt",
    )
    batch = {
        "images": torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8),
        "text_ids": enc["input_ids"],
        "text_mask": enc["attention_mask"],
    }
    torch.testing.assert_close(student.logits(batch), teacher.logits(batch), rtol=0, atol=0)
    # A new vocabulary keeps the rows of the pieces both tokenizers have.
    student_tok = load_tokenizer(str(out / "student_tokenizer"))
    student = with_tokenizer(teacher, tokenizer, student_tok)
    old, new = (
        teacher.backbone.text.embeddings.word_embeddings.weight,
        student.backbone.text.embeddings.word_embeddings.weight,
    )
    assert new.shape[0] == len(student_tok)
    for piece in ("<s>", "</s>", "<pad>", "?"):
        if piece in tokenizer.get_vocab() and piece in student_tok.get_vocab():
            assert torch.equal(new[student_tok.get_vocab()[piece]], old[tokenizer.get_vocab()[piece]])


def test_cosine_cls_term_matches_a_direct_computation():
    s, t, cs, ct = torch.randn(4, 13), torch.randn(4, 13), torch.randn(4, 8), torch.randn(4, 8)
    got = distillation_losses(s, t, cs, ct, temperature=3.0, kl_weight=0.5, cls_weight=2.0, cls_loss="cosine")
    p_t, log_p_s = F.softmax(t / 3, -1), F.log_softmax(s / 3, -1)
    kl = (p_t * (p_t.log() - log_p_s)).sum(-1).mean() * 9
    cos = 1 - (F.normalize(cs, dim=-1) * F.normalize(ct, dim=-1)).sum(-1).mean()
    torch.testing.assert_close(got["cls_cosine"], cos)
    torch.testing.assert_close(got["loss"], 0.5 * kl + 2.0 * cos)
    same = distillation_losses(
        s, s, cs, cs, temperature=3.0, kl_weight=1.0, cls_weight=1.0, cls_loss="cosine"
    )
    assert same["kl"].item() == 0.0 and abs(same["cls_cosine"].item()) < 1e-6


def test_recipe_cli_knows_cvil_vqa_and_names_a_wrong_key(capsys):
    from cclm.cli import main as cclm_main

    assert cclm_main(["recipe", "cvil_vqa", str(YAML), "object_tags.enabeld=true"]) == 2
    assert "object_tags.enabled" in capsys.readouterr().err
