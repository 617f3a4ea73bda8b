"""MLA's whole pipeline as the paper runs it: which parameters each stage trains (read from the optimizer each
stage builds), the frozen CLIP untouched by acquisition, the downstream fine-tuning stages, a CLIP named by open_clip
model name + checkpoint, precision casts, the English-CLIP command and the thread setting. A small en + ja world,
random tiny CLIPs, a few steps per stage: CPU, one thread."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cclm.cli import main as cclm_main
from cclm.config import ClipConfig, ConfigError, MLARecipeConfig, from_dict, load_config
from cclm.recipes import runner
from cclm.recipes.clip import build_clip, build_clip_tokenizer
from cclm.recipes.mla import MLAModel
from cclm.recipes.mla_run import FINETUNED_CLIP, run_mla

from .conftest import build_mla_world

REPO = Path(__file__).resolve().parent.parent
MLA_YAML = REPO / "configs" / "recipes" / "mla_demo.yaml"
ENGLISH = ["a big red circle on the left", "two blue stars", "a small green triangle at the top"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    world = tmp_path_factory.mktemp("mla_world") / "world"
    return build_mla_world(
        world, 160, 400, seed=0, heldout_images=20, heldout_langs=("en", "ja"), xvnli_images=10
    )


def mla_base(world: Path, out: Path) -> list[str]:
    """A tiny two-stage MLA run's settings (key=value items)."""
    return [
        f"world={world}",
        f"output_dir={out}",
        "languages=[ja]",
        "clip.pretrained=null",
        "threads=1",
        "nlt.steps=2",
        "le.steps=2",
        "data.parallel_text.batch_size=8",
        "data.image_caption.batch_size=8",
        "train.log_every=1",
        "train.scheduler.warmup_steps=0",
    ]


def mla_cfg(world: Path, out: Path, *overrides: str):
    return load_config(MLARecipeConfig, MLA_YAML, [*mla_base(world, out), *overrides])


def with_finetuning(world: Path, en_steps: int = 2, all_steps: int = 2) -> list[str]:
    return [
        f"finetune.data={{shards: {world}/image_caption, batch_size: 8}}",
        f"finetune.en.steps={en_steps}",
        f"finetune.all.steps={all_steps}",
    ]


@pytest.fixture
def optimized(monkeypatch) -> dict[str, set[int]]:
    """stage name -> ids of the parameters in the optimizer that stage's trainer built."""
    seen: dict[str, set[int]] = {}

    class RecordingTrainer(runner.Trainer):
        def __init__(self, model, source, loop, **kwargs):
            super().__init__(model, source, loop, **kwargs)
            seen[Path(kwargs["output_dir"]).name] = {
                id(p) for group in self.optimizer.param_groups for p in group["params"]
            }

    monkeypatch.setattr(runner, "Trainer", RecordingTrainer)
    return seen


def ids(named) -> set[int]:
    return {id(p) for _, p in named}


def test_each_stage_trains_only_its_parameters(world, tmp_path, optimized):
    cfg = mla_cfg(world, tmp_path / "mla", *with_finetuning(world), "finetune.en.trainable=[text]")
    model = MLAModel.build(cfg)
    embedding, acquirers = ids(model.embedding.named_parameters()), ids(model.acquirers.named_parameters())
    clip_text = ids(
        (n, p) for n, p in model.clip.named_parameters() if not n.startswith("visual.") and n != "logit_scale"
    )
    results = run_mla(cfg, model)

    assert optimized["nlt"] == embedding | acquirers  # NLT: the embedding and the acquirers
    assert optimized["le"] == acquirers  # LE: the acquirers (le.train_embedding: false)
    assert optimized["finetune_all"] == acquirers  # all languages: the acquirers over the fine-tuned CLIP
    # English fine-tuning: the CLIP's text tower only (finetune.en.trainable=[text]), not its temperature.
    assert optimized["finetune_en"] == clip_text
    assert results["training"]["finetune_en/trained_params"] == sum(
        p.numel()
        for n, p in model.clip.named_parameters()
        if not n.startswith("visual.") and n != "logit_scale"
    )
    assert results["training"]["le/trained_params"] == sum(p.numel() for p in model.acquirers.parameters())
    # The CLIP is frozen again after its stage, and every phase was scored.
    assert not any(p.requires_grad for p in model.clip.parameters())
    assert set(results["phases"]) == {"before", "acquired", "finetune_en", "finetune_all"}
    assert (tmp_path / "mla" / FINETUNED_CLIP).exists()


def test_stage_options_embedding_in_le_and_both_towers(world, tmp_path, optimized):
    cfg = mla_cfg(world, tmp_path / "mla", *with_finetuning(world, all_steps=0), "le.train_embedding=true")
    model = MLAModel.build(cfg)
    embedding, acquirers = ids(model.embedding.named_parameters()), ids(model.acquirers.named_parameters())
    run_mla(cfg, model)
    assert optimized["le"] == embedding | acquirers
    # both towers (the default), still not the temperature; finetune.all.steps=0: no such stage
    assert optimized["finetune_en"] == ids(
        (n, p) for n, p in model.clip.named_parameters() if n != "logit_scale"
    )
    assert "finetune_all" not in optimized


def _english_outputs(model: MLAModel, world: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from cclm.data.images import load_image
    from cclm.recipes.dual_encoder import heldout_sets

    images = heldout_sets({"world": str(world / "heldout")}, ["en"])["world"]["en"].images[:4]
    pixels = torch.stack([load_image(image, model.image_size) for image in images])
    return model.encode_texts(ENGLISH, "en"), model.encode_image(pixels)


def test_acquisition_and_multilingual_finetuning_leave_english_bit_identical(world, tmp_path):
    cfg = mla_cfg(world, tmp_path / "mla", *with_finetuning(world, en_steps=0, all_steps=2))
    model = MLAModel.build(cfg)
    text_before, image_before = _english_outputs(model, world)
    ja_before = model.encode_texts(["左に赤い丸"], "ja")
    results = run_mla(cfg, model)
    text_after, image_after = _english_outputs(model, world)
    assert torch.equal(text_before, text_after) and torch.equal(image_before, image_after)
    assert not torch.equal(ja_before, model.encode_texts(["左に赤い丸"], "ja"))  # the new language did train
    assert results["languages"]["en"] == results["before"]["en"]


def test_english_finetuning_changes_the_clip_and_finetune_all_keeps_it(world, tmp_path):
    from safetensors.torch import load_file

    cfg = mla_cfg(world, tmp_path / "mla", *with_finetuning(world), "finetune.en.lr=1e-2")
    model = MLAModel.build(cfg)
    original = {k: v.clone() for k, v in model.clip.state_dict().items()}
    results = run_mla(cfg, model)
    saved = load_file(str(tmp_path / "mla" / FINETUNED_CLIP))  # written after finetune_all
    assert any(not torch.equal(original[k], saved[k]) for k in saved)  # English fine-tuning trained the CLIP
    assert all(torch.equal(saved[k], v) for k, v in model.clip.state_dict().items())
    assert saved["logit_scale"].shape == original["logit_scale"].shape  # open_clip's layout kept
    phases = results["phases"]
    assert phases["finetune_all"]["en"] == phases["finetune_en"]["en"]  # finetune_all leaves English alone


def test_finetuning_steps_without_data_are_refused(world, tmp_path):
    with pytest.raises(ConfigError, match=r"finetune_en.*finetune.data"):
        run_mla(mla_cfg(world, tmp_path, "finetune.en.steps=3"))
    # The ViT-B/32 config with its Multi30K shards left unset names the key before anything is built.
    given = ["data.parallel_text.shards=/x", "data.image_caption.shards=/y", "threads=1"]
    vit = load_config(MLARecipeConfig, REPO / "configs" / "recipes" / "mla_vit_b32.yaml", given)
    with pytest.raises(ConfigError, match="'finetune.data.shards' must be set"):
        run_mla(vit)


def test_a_bf16_engine_leaves_the_frozen_clip_in_its_precision(world, tmp_path):
    model = MLAModel.build(mla_cfg(world, tmp_path))
    text, _ = _english_outputs(model, world)
    model.to(torch.bfloat16)
    assert model.embedding.table.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.clip.parameters())
    assert torch.equal(model.encode_texts(ENGLISH, "en"), text)
    assert model.encode_texts(["左に赤い丸"], "ja").dtype == torch.float32  # the CLIP's projection, fp32
    # An NLT step trains the bf16 parts through the fp32 CLIP.
    english, japanese = ["a red circle on the left", "two blue stars"], ["左に赤い丸", "青い星が二つ"]
    en = model.tokenizer(english, padding=True, return_tensors="pt")
    ja = model.tokenizer(japanese, padding=True, return_tensors="pt")
    batch = {"texts": english, "other_texts": japanese, "langs": ["en", "en"], "other_langs": ["ja", "ja"]}
    batch.update(text_ids=en["input_ids"], text_mask=en["attention_mask"])
    batch.update(other_ids=ja["input_ids"], other_mask=ja["attention_mask"])
    model.set_stage("nlt")
    model(batch, "nlt")["loss"].backward()
    grad = model.embedding.table.weight.grad
    assert grad.dtype == torch.bfloat16 and grad.abs().sum() > 0
    assert all(p.grad is None for p in model.clip.parameters())


# ----------------------------------------------------------------------------------- a CLIP named by open_clip
TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture
def named_clip(tmp_path):
    """An open_clip model config registered by name (as ViT-B-32 is) and its weights in a local checkpoint."""
    import open_clip

    name = "cclm-test-tiny-clip"
    (tmp_path / f"{name}.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    torch.manual_seed(3)
    reference = open_clip.create_model(name)
    checkpoint = tmp_path / "tiny_clip.pt"
    torch.save({"state_dict": reference.state_dict()}, checkpoint)
    return name, checkpoint, reference


def test_mla_starts_from_an_open_clip_model_name_and_checkpoint(world, tmp_path, named_clip):
    name, checkpoint, reference = named_clip
    clip = build_clip(from_dict(ClipConfig, {"name": name, "pretrained": str(checkpoint)}))
    for key, value in reference.state_dict().items():
        assert torch.equal(clip.state_dict()[key], value), key
    cfg = mla_cfg(world, tmp_path)
    cfg.clip = from_dict(ClipConfig, {"name": name, "pretrained": str(checkpoint)})
    model = MLAModel.build(cfg)
    tokens = build_clip_tokenizer(cfg.clip, 16)(ENGLISH)  # open_clip's own tokenizer of the model
    expected = torch.nn.functional.normalize(reference.eval().encode_text(tokens), dim=-1)
    torch.testing.assert_close(model.encode_texts(ENGLISH, "en"), expected, rtol=0, atol=1e-6)
    assert model.encode_texts(["左に赤い丸"], "ja").shape == (1, 32)


def test_an_unknown_pretrained_tag_names_the_known_ones(named_clip):
    name, _, _ = named_clip
    with pytest.raises(ConfigError, match=r"clip.pretrained 'no-such-tag' of cclm-test-tiny-clip.*tags \[\]"):
        build_clip(from_dict(ClipConfig, {"name": name, "pretrained": "no-such-tag"}))


# ---------------------------------------------------------------------------- the English CLIP and threads
def test_english_clip_command_refuses_what_it_cannot_make(world, tmp_path, capsys):
    def run(config: Path, *overrides: str) -> int:
        return cclm_main(["recipe", "english-clip", str(config), f"world={world}", "threads=1", *overrides])

    assert run(REPO / "configs" / "recipes" / "mla_vit_b32.yaml") == 2  # OpenAI's ViT-B/32: a released CLIP
    assert "English already" in capsys.readouterr().err
    existing = tmp_path / "clip.safetensors"
    existing.write_text("")
    assert run(MLA_YAML, f"clip.pretrained={existing}") == 2
    assert "overwrite=true" in capsys.readouterr().err


def test_threads_automatic_and_from_the_command_line(monkeypatch):
    import os

    from cclm.recipes import cli

    previous = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert runner.apply_threads(0) == 3 and torch.get_num_threads() == 3
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert runner.apply_threads(0) == max(1, min(8, (os.cpu_count() or 2) // 2))
        assert runner.apply_threads(2) == 2
        with pytest.raises(ConfigError, match="threads must be >= 0"):
            runner.apply_threads(-1)
        seen = {}

        def fake_run(recipe, cfg):
            seen["cfg"] = cfg
            return {"languages": {}, "trained_params": 0, "total_params": 0}

        monkeypatch.setattr(cli, "run", fake_run)
        assert cli.main(["recipe", "mla", str(MLA_YAML), "--threads", "1", "world=/nowhere"]) == 0
        assert seen["cfg"].threads == 1
    finally:
        torch.set_num_threads(previous)
