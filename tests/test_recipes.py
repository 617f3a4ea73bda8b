"""The language-extension recipes on the synthetic world: MLA teaches an English-only CLIP German, cViL distils an
English XVNLI-style teacher into a German student. Both run through ``cclm recipe`` code paths (DeepSpeed engine,
checkpoints, results.json). CPU-only, one thread (the machine is shared), each test well under a minute."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cclm.cli import main as cclm_main
from cclm.config import ConfigError, CViLRecipeConfig, MLARecipeConfig, load_config
from cclm.recipes.clip import text_tower
from cclm.recipes.cvil import Distiller, build_student, distillation_losses, load_teacher, run_cvil
from cclm.recipes.mla import MLAModel
from cclm.recipes.mla_run import run_mla

from .conftest import build_test_world

REPO = Path(__file__).resolve().parent.parent
MLA_YAML = REPO / "configs" / "recipes" / "mla_demo.yaml"
CVIL_YAML = REPO / "configs" / "recipes" / "cvil_demo.yaml"
XVNLI_LABELS = ["contradiction", "neutral", "entailment"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return build_test_world(
        tmp_path_factory.mktemp("recipe_world") / "world",
        num_images=1500,
        caption_langs=("en", "de"),
        parallel_langs=("de",),
        image_size=32,
        seed=0,
        heldout_images=100,
        heldout_langs=("en", "de"),
        xvnli_images=200,
    )


def mla_cfg(world: Path, clip_file: Path | None, out: Path, *overrides: str):
    base = [f"world={world}", f"output_dir={out}", "nlt.steps=100", "le.steps=60"]
    base.append(f"clip.pretrained={clip_file}" if clip_file else "clip.pretrained=null")
    return load_config(MLARecipeConfig, MLA_YAML, [*base, *overrides])


@pytest.fixture(scope="module")
def english_clip(world, tmp_path_factory) -> Path:
    """The demo config's tiny CLIP, fitted on the world's English captions only (never sees German) by the
    command a user runs: ``cclm recipe english-clip configs/recipes/mla_demo.yaml``."""
    out = tmp_path_factory.mktemp("clip")
    path = out / "clip.safetensors"
    torch.manual_seed(0)
    argv = ["recipe", "english-clip", str(MLA_YAML), f"world={world}", f"clip.pretrained={path}"]
    assert cclm_main([*argv, f"output_dir={out}", "english_clip.steps=150", "--threads", "1"]) == 0
    fitted = json.loads((out / "english_clip" / "results.json").read_text())
    assert fitted["path"] == str(path) and fitted["languages"]["en"]["txt_r1"] >= 20.0
    logged = [json.loads(line) for line in (out / "english_clip" / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in logged if "loss" in row]
    assert losses[-1] < 0.5 * losses[0]
    return path


# ------------------------------------------------------------------------------------------------------- MLA
def test_english_path_is_the_untouched_clip(world, tmp_path):
    """The block-by-block English path gives open_clip's own text features, and fresh acquirers (zero-initialised
    up-projections) leave every block's output unchanged."""
    cfg = mla_cfg(world, None, tmp_path)
    model = MLAModel.build(cfg)
    ids = model.clip_tokenize(["a big red circle on the left", "two blue stars"])
    feature, states = model.encode_source(ids)
    torch.testing.assert_close(feature, model.clip.encode_text(ids), rtol=0, atol=1e-6)
    assert len(states) == len(text_tower(model.clip).blocks)
    x = torch.randn(2, 5, text_tower(model.clip).width)
    for acquirer in model.acquirers["shared"]:
        assert torch.equal(acquirer(x), x)
    # Only the embedding table and the acquirers train.
    trained, total = model.trainable_parameter_count()
    expected = sum(p.numel() for p in model.embedding.parameters()) + sum(
        p.numel() for p in model.acquirers.parameters()
    )
    assert trained == expected and total == trained + sum(p.numel() for p in model.clip.parameters())
    assert not any(p.requires_grad for p in model.clip.parameters())


def test_mla_teaches_a_frozen_english_clip_german(world, english_clip, tmp_path):
    out = tmp_path / "mla"
    cfg = mla_cfg(world, english_clip, out)
    model = MLAModel.build(cfg)
    frozen_before = {k: v.clone() for k, v in model.clip.state_dict().items()}
    results = run_mla(cfg, model)

    def r1(metrics):
        return (metrics["txt_r1"] + metrics["img_r1"]) / 2

    before, after = results["before"], results["languages"]
    assert r1(before["de"]) <= 5.0  # chance is 1% on 100 images: the new embedding knows nothing yet
    assert r1(after["en"]) >= 20.0  # the English CLIP works ...
    assert r1(after["en"]) == r1(before["en"])  # ... and MLA does not touch it
    assert r1(after["de"]) >= 0.7 * r1(after["en"]), (before, after)
    # Every frozen CLIP parameter and buffer is bit-identical after both stages.
    frozen_after = model.clip.state_dict()
    assert frozen_after.keys() == frozen_before.keys()
    assert all(torch.equal(frozen_before[k], frozen_after[k]) for k in frozen_before)
    # results.json, trained weights without the CLIP, per-stage logs and checkpoints.
    written = json.loads((out / "results.json").read_text())
    assert written["languages"]["de"]["txt_r1"] == after["de"]["txt_r1"]
    assert 0 < written["trained_params"] < 0.2 * written["total_params"]
    table = json.loads((out / "languages.json").read_text())  # the per-language table, also .csv and .md
    assert table["de"]["txt_r1"] == after["de"]["txt_r1"] and set(table) == set(after)
    assert len((out / "languages.csv").read_text().splitlines()) == 1 + len(after)
    from safetensors.torch import load_file

    acquired = load_file(str(out / "acquired.safetensors"))
    assert sum(t.numel() for t in acquired.values()) == written["trained_params"]
    assert not any(k.startswith("clip.") for k in acquired)
    for stage, steps in (("nlt", 100), ("le", 60)):
        assert json.loads((out / stage / "metrics.jsonl").read_text().splitlines()[-1])["step"] == steps
        assert (out / stage / "checkpoints" / f"step_{steps:08d}" / "complete.json").exists()


def test_mla_refuses_a_language_without_parallel_data(world, tmp_path):
    cfg = mla_cfg(world, None, tmp_path, "languages=[fr]")
    with pytest.raises(ConfigError, match=r"no parallel sentences .*\['fr'\]"):
        run_mla(cfg)
    assert (
        cclm_main(
            ["recipe", "mla", str(MLA_YAML), f"world={world}", "clip.pretrained=null", "languages=[en]"]
        )
        == 2
    )
    with pytest.raises(ConfigError, match="nlt.stepz"):
        mla_cfg(world, None, tmp_path, "nlt.stepz=3")


def test_mla_per_language_acquirers(world, tmp_path):
    cfg = mla_cfg(world, None, tmp_path, "adapters.shared=false", "languages=[de,fr]")
    model = MLAModel.build(cfg)
    assert sorted(model.acquirers) == ["de", "fr"]
    enc = model.tokenizer(["ein roter Kreis", "un cercle rouge"], padding=True, return_tensors="pt")
    # A mixed batch equals each language encoded on its own (one acquirer set per language).
    for acquirer in model.acquirers.values():
        torch.nn.init.normal_(acquirer[0].up.weight)
    mixed, _ = model.encode_target_by_language(enc["input_ids"], enc["attention_mask"], ["de", "fr"])
    alone, _ = model.encode_target(enc["input_ids"][1:], enc["attention_mask"][1:], "fr")
    torch.testing.assert_close(mixed[1:], alone)
    with pytest.raises(ValueError, match="no acquirers for language 'es'"):
        model.encode_target(enc["input_ids"], enc["attention_mask"], "es")


def test_mla_embedding_from_a_multilingual_encoder(world, tmp_path):
    """``embedding.init_from``: the table starts as the encoder's word embeddings (any width), projected to the
    CLIP text width."""
    from transformers import XLMRobertaConfig, XLMRobertaModel

    from cclm.data.tokenize import load_tokenizer

    vocab = len(load_tokenizer(str(world / "tokenizer")))
    encoder = XLMRobertaModel(
        XLMRobertaConfig(
            vocab_size=vocab + 5,
            hidden_size=48,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    )
    encoder.save_pretrained(tmp_path / "encoder")
    model = MLAModel.build(mla_cfg(world, None, tmp_path, f"embedding.init_from={tmp_path / 'encoder'}"))
    words = encoder.get_input_embeddings().weight[:vocab]
    assert torch.equal(model.embedding.table.weight, words)
    assert model.embedding.proj.in_features == 48 and model.embedding.proj.out_features == 64
    small = XLMRobertaModel(
        XLMRobertaConfig(vocab_size=10, hidden_size=48, num_hidden_layers=1, num_attention_heads=2)
    )
    small.save_pretrained(tmp_path / "small")
    with pytest.raises(ConfigError, match="fewer than the tokenizer"):
        MLAModel.build(mla_cfg(world, None, tmp_path, f"embedding.init_from={tmp_path / 'small'}"))


# ------------------------------------------------------------------------------------------------------ cViL
@pytest.fixture(scope="module")
def teacher(world, tmp_path_factory) -> Path:
    """A tiny cross-view model fine-tuned on the world's English XVNLI-style training set only."""
    from cclm.config import FinetuneConfig
    from cclm.tasks.protocols import run_zero_shot

    out = tmp_path_factory.mktemp("teacher")
    x = world / "xvnli" / "annotations"
    cfg = load_config(
        FinetuneConfig,
        None,
        [
            "task=xvnli",
            "model=tiny",
            f"tokenizer={world}/tokenizer",
            f"output_dir={out}",
            f"data.train=[{x}/en/train.jsonl]",
            f"data.dev=[{x}/en/dev.jsonl]",
            f"data.image_roots={{flickr30k: {world}/xvnli/images}}",
            "train.epochs=8",
            "train.batch_size=32",
            "train.lr=5e-4",
            "train.device=cpu",
        ],
    )
    torch.manual_seed(0)
    run_zero_shot(cfg)
    return out / "model"


def cvil_cfg(world: Path, teacher_dir: Path, out: Path, *overrides: str):
    base = [f"world={world}", f"teacher={teacher_dir}", f"output_dir={out}", "distill.epochs=6"]
    return load_config(CViLRecipeConfig, CVIL_YAML, [*base, *overrides])


def test_distillation_loss_is_zero_when_student_is_teacher(world, teacher, tmp_path):
    cfg = cvil_cfg(world, teacher, tmp_path)
    teacher_model = load_teacher(teacher, "xvnli", XVNLI_LABELS)
    student = build_student(teacher_model, None, ["text", "fusion", "head"])
    distiller = Distiller(teacher_model, student, cfg.distill).eval()
    from cclm.data.tokenize import load_tokenizer

    enc = load_tokenizer(str(teacher))(
        ["there is a red circle", "the blue star is made of wood"], padding=True, return_tensors="pt"
    )
    batch = {
        "images": torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8),
        "teacher_ids": enc["input_ids"],
        "teacher_mask": enc["attention_mask"],
        "student_ids": enc["input_ids"],
        "student_mask": enc["attention_mask"],
    }
    out = distiller(batch)
    assert out["loss"].item() == 0.0 and out["kl"].item() == 0.0 and out["cls_mse"].item() == 0.0
    # Reference values for differing logits: KL(p_t || p_s) at temperature T, times T^2.
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    cs, ct = torch.randn(4, 8), torch.randn(4, 8)
    got = distillation_losses(s, t, cs, ct, temperature=2.0, kl_weight=0.5, cls_weight=3.0)
    p_t, log_p_s = F.softmax(t / 2, -1), F.log_softmax(s / 2, -1)
    kl = (p_t * (p_t.log() - log_p_s)).sum(-1).mean() * 4
    torch.testing.assert_close(got["kl"], kl)
    torch.testing.assert_close(got["loss"], 0.5 * kl + 3.0 * ((cs - ct) ** 2).mean())
    # The student shares the teacher's (frozen) vision side.
    assert not any(p.requires_grad for p in student.backbone.vision.parameters())
    assert all(p.requires_grad for p in student.backbone.text.parameters())


def test_the_students_frozen_parts_distil_as_in_evaluation(world, teacher, tmp_path):
    """Training mode reached the student's frozen fusion and head too: with dropout (real models have 0.1) the
    features the student is distilled to match were perturbed, and a student equal to the teacher had a loss."""
    cfg = cvil_cfg(world, teacher, tmp_path)
    teacher_model = load_teacher(teacher, "xvnli", XVNLI_LABELS)
    dropouts = [m for m in teacher_model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts
    for module in dropouts:
        module.p = 0.1
    student = build_student(teacher_model, None, ["text"])
    distiller = Distiller(teacher_model, student, cfg.distill).train()
    frozen = [student.backbone.vision, student.backbone.fusion, student.head]
    assert not any(m.training for part in frozen for m in part.modules())
    assert all(m.training for m in student.backbone.text.modules())
    assert not teacher_model.training
    student.backbone.text.eval()  # only the frozen parts could still add noise
    from cclm.data.tokenize import load_tokenizer

    enc = load_tokenizer(str(teacher))(["there is a red circle"] * 4, padding=True, return_tensors="pt")
    batch = {
        "images": torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8),
        **{
            f"{side}_{k}": enc[key]
            for side in ("teacher", "student")
            for k, key in (("ids", "input_ids"), ("mask", "attention_mask"))
        },
    }
    assert distiller(batch)["loss"].item() == 0.0


def test_cvil_student_learns_the_task_in_german_by_distillation(world, teacher, tmp_path):
    out = tmp_path / "cvil"
    results = run_cvil(cvil_cfg(world, teacher, out))
    rows = results["languages"]
    teacher_en = rows["en"]["teacher_accuracy"]
    assert teacher_en > 50.0  # above chance (33%): the teacher learned the task in English
    assert rows["de"]["teacher_accuracy"] < 0.8 * teacher_en  # zero-shot German is not already solved
    assert rows["de"]["accuracy"] >= 0.8 * teacher_en, rows
    written = json.loads((out / "results.json").read_text())
    assert written["languages"]["de"]["accuracy"] == rows["de"]["accuracy"]
    assert 0 < written["trained_params"] < written["total_params"]
    assert (out / "student" / "task.json").exists() and (out / "distill" / "metrics.jsonl").exists()


def test_cvil_bad_inputs(world, teacher, tmp_path):
    from cclm.model.cross_view import CrossViewModel
    from cclm.tasks.task_model import TaskModel

    with pytest.raises(ConfigError, match=r"no parallel data for language\(s\) \['fr'\]"):
        run_cvil(cvil_cfg(world, teacher, tmp_path / "a", "languages=[de,fr]"))
    # A teacher whose head was trained for a different number of classes.
    wrong = TaskModel(CrossViewModel.from_pretrained(teacher), "xvnli", "single", ["yes", "no"])
    wrong.save(tmp_path / "binary_teacher")
    with pytest.raises(ConfigError, match="head with 2 outputs, but task 'xvnli' has 3 labels"):
        run_cvil(cvil_cfg(world, tmp_path / "binary_teacher", tmp_path / "b"))
    # Translations that share no example with the English training file.
    other = tmp_path / "unrelated.jsonl"
    lines = (world / "xvnli" / "annotations" / "de" / "test.jsonl").read_text().splitlines()
    other.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="shares no example id"):
        run_cvil(cvil_cfg(world, teacher, tmp_path / "c", f"data.parallel.de={other}"))
    with pytest.raises(FileNotFoundError, match="task.json"):
        load_teacher(tmp_path, "xvnli", XVNLI_LABELS)


def test_recipe_cli_reports_config_errors(tmp_path, capsys):
    assert cclm_main(["recipe", "cvil", str(CVIL_YAML), "distill.temprature=2"]) == 2
    assert "distill.temperature" in capsys.readouterr().err


def test_cvil_evaluates_in_the_precision_its_deepspeed_file_trains_in(tmp_path):
    """A DeepSpeed file with fp16 and no deepspeed.precision: the evaluation took auto (bf16 on a GPU)."""
    from cclm.recipes.cvil import distillation_suite
    from cclm.runtime.env import init_distributed

    ds = tmp_path / "ds.json"
    ds.write_text('{"fp16": {"enabled": true}}')
    cfg = load_config(CViLRecipeConfig, overrides=[f"deepspeed.config_file={ds}"])
    assert distillation_suite(cfg, init_distributed("cpu")).precision == "fp16"
