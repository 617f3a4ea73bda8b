"""Starting from real pretrained weights, as a cluster user does: the towers load from files in the formats their
libraries write (an open_clip checkpoint, an HF ``save_pretrained`` XLM-R folder) and hold exactly the saved
weights; downloads happen on each node's local rank 0 first; an offline run missing a download fails in one line
saying what to download; a ``local-dir:`` name cannot silently start from random weights. Nothing is downloaded."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import open_clip
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from transformers import XLMRobertaConfig, XLMRobertaForMaskedLM

import cclm.model.text as text_module
from cclm.cli import main as cclm_main
from cclm.config import CONFIG_ROOT, ConfigError, ModelConfig, from_dict
from cclm.model import CrossViewModel
from cclm.model.text import load_encoder
from cclm.model.vision import load_pretrained_visual_state

from .local_first_worker import ordered_worker

REPO = Path(__file__).resolve().parent.parent
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
}
TEXT_LAYERS, FUSION_LAYERS = [0, 2], [1, 3]


# ----------------------------------------------------------------------------------- files as libraries write them
def write_open_clip_folder(folder: Path) -> dict[str, torch.Tensor]:
    """A ``local-dir:`` folder as open_clip's Hub export writes it: open_clip_config.json + the weights."""
    torch.manual_seed(1)
    model = open_clip.model.CLIP(**TINY_CLIP)
    folder.mkdir()
    config = {"model_cfg": TINY_CLIP, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return model.state_dict()


def write_open_clip_training_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint as open_clip's trainer saves it under DDP: the state dict under ``state_dict`` with
    ``module.`` prefixes, beside the epoch, run name and optimizer state."""
    torch.manual_seed(2)
    model = open_clip.model.CLIP(**TINY_CLIP)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 3, "name": "tiny-run", "state_dict": state, "optimizer": {}}, path)
    return model.state_dict()


def write_xlmr_folder(folder: Path) -> dict[str, torch.Tensor]:
    """An XLM-R masked-LM saved with ``save_pretrained`` (encoder and lm_head), as on the Hub."""
    torch.manual_seed(3)
    config = XLMRobertaConfig(
        vocab_size=120,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=40,
        type_vocab_size=1,
    )
    XLMRobertaForMaskedLM(config).save_pretrained(folder)
    return load_file(folder / "model.safetensors")


def model_cfg(vision: dict, text_folder: Path) -> ModelConfig:
    return from_dict(
        ModelConfig,
        {
            "vision": {**vision, "image_size": 32},
            "text": {
                "name_or_path": str(text_folder),
                "text_layers": TEXT_LAYERS,
                "fusion_layers": FUSION_LAYERS,
            },
            "embed_dim": 32,
        },
    )


def assert_towers_hold(model: CrossViewModel, clip_state: dict, xlmr_state: dict) -> None:
    visual = {k[len("visual.") :]: v for k, v in clip_state.items() if k.startswith("visual.")}
    tower = model.vision.visual.state_dict()
    assert set(tower) == set(visual) - {"proj"}  # cclm's own vision_proj replaces the CLIP projection
    assert [k for k in tower if not torch.equal(tower[k], visual[k])] == []

    def layer(i: int) -> dict[str, torch.Tensor]:
        prefix = f"roberta.encoder.layer.{i}."
        return {k[len(prefix) :]: v for k, v in xlmr_state.items() if k.startswith(prefix)}

    for stack, ids in ((model.text.layers, TEXT_LAYERS), (model.fusion.layers, FUSION_LAYERS)):
        for module, i in zip(stack, ids):
            saved = layer(i)
            own = {k: v for k, v in module.state_dict().items() if not k.startswith("crossattention.")}
            assert set(own) == set(saved) and all(torch.equal(own[k], saved[k]) for k in own), i
    embeddings = model.text.embeddings.word_embeddings.weight
    assert torch.equal(embeddings, xlmr_state["roberta.embeddings.word_embeddings.weight"])
    assert torch.equal(model.mlm_head.dense.weight, xlmr_state["lm_head.dense.weight"])
    assert torch.equal(model.mlm_head.layer_norm.bias, xlmr_state["lm_head.layer_norm.bias"])


def test_towers_load_an_open_clip_local_dir_and_an_hf_xlmr_folder(tmp_path):
    clip_state = write_open_clip_folder(tmp_path / "clip")
    xlmr_state = write_xlmr_folder(tmp_path / "xlmr")
    name = f"local-dir:{tmp_path / 'clip'}"
    model = CrossViewModel(model_cfg({"name": name, "pretrained": name}, tmp_path / "xlmr"))
    assert_towers_hold(model, clip_state, xlmr_state)
    assert model.vision.width == 64 and model.encoder_config.num_hidden_layers == 4


def test_towers_load_an_open_clip_training_checkpoint_file(tmp_path, monkeypatch):
    config_dir = tmp_path / "model_configs"
    config_dir.mkdir()
    (config_dir / "cclm-test-tiny-vit.json").write_text(json.dumps(TINY_CLIP))
    monkeypatch.setattr(open_clip.factory, "_MODEL_CONFIGS", dict(open_clip.factory._MODEL_CONFIGS))
    open_clip.add_model_config(config_dir)
    clip_state = write_open_clip_training_checkpoint(tmp_path / "epoch_3.pt")
    xlmr_state = write_xlmr_folder(tmp_path / "xlmr")
    vision = {"name": "cclm-test-tiny-vit", "pretrained": str(tmp_path / "epoch_3.pt")}
    model = CrossViewModel(model_cfg(vision, tmp_path / "xlmr"))
    assert_towers_hold(model, clip_state, xlmr_state)


def test_a_timm_tower_loads_from_a_folder_as_timm_saves_it(tmp_path):
    """The paper configs' timm route without the Hub cache: ``timm_model_name='local-dir:DIR'`` of a folder
    written by timm's own Hub export (config.json + weights)."""
    import timm
    from timm.models._hub import save_for_hf

    torch.manual_seed(4)
    trunk = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, depth=2)
    save_for_hf(trunk, tmp_path / "vit")
    tower = {
        "timm_model_name": f"local-dir:{tmp_path / 'vit'}",
        "timm_model_pretrained": True,
        "timm_pool": "",
        "timm_proj": "none",
        "image_size": 32,
    }
    write_xlmr_folder(tmp_path / "xlmr")
    model = CrossViewModel(model_cfg({"tower": tower}, tmp_path / "xlmr"))
    saved, loaded = trunk.state_dict(), model.vision.visual.trunk.state_dict()
    assert set(loaded) == set(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved)


# ------------------------------------------------------------------------------- local-dir without its weights
def test_a_local_dir_name_without_pretrained_is_refused_not_randomly_initialised(tmp_path):
    write_open_clip_folder(tmp_path / "clip")
    write_xlmr_folder(tmp_path / "xlmr")
    name = f"local-dir:{tmp_path / 'clip'}"
    with pytest.raises(
        ConfigError, match=r"without model\.vision\.pretrained: the tower would start from random"
    ):
        CrossViewModel(model_cfg({"name": name}, tmp_path / "xlmr"))
    with pytest.raises(ConfigError, match=r"ignores a tag or file there.*set model\.vision\.pretrained="):
        CrossViewModel(model_cfg({"name": name, "pretrained": "openai"}, tmp_path / "xlmr"))


def test_a_local_dir_without_weights_fails_instead_of_starting_random(tmp_path):
    folder = tmp_path / "clip"
    write_open_clip_folder(folder)
    (folder / "open_clip_pytorch_model.bin").unlink()
    name = f"local-dir:{folder}"
    with pytest.raises(RuntimeError, match="pretrained"):
        load_pretrained_visual_state(name, name)


# -------------------------------------------------------------------------------------- offline, not in the cache
@pytest.fixture
def offline_empty_cache(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 over an empty Hugging Face cache (and an empty open_clip URL cache)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def run_cclm_error(capsys, *argv) -> str:
    code = cclm_main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"cclm {argv[0]}:")]
    assert len(lines) == 1, err
    return lines[0]


def test_the_paper_config_offline_says_what_to_download_in_one_line(tmp_path, capsys, offline_empty_cache):
    line = run_cclm_error(
        capsys,
        "pretrain",
        CONFIG_ROOT / "pretrain" / "cclm_3m.yaml",
        "data.image_caption.shards=/nowhere/ic.tar",
        "data.parallel_text.shards=/nowhere/pt.tar",
        f"output_dir={tmp_path / 'out'}",
    )
    assert "model.vision.tower.timm_model_name='swin_base_patch4_window7_224.ms_in22k'" in line
    assert "HF_HUB_OFFLINE=1" in line and str(tmp_path / "hf_cache") in line
    assert "`hf download timm/swin_base_patch4_window7_224.ms_in22k`" in line
    assert "model.vision.tower.timm_model_name='local-dir:DIR'" in line and "docs/launch.md" in line


def test_an_open_clip_tag_offline_says_what_to_download_in_one_line(tmp_path, capsys, offline_empty_cache):
    config = tmp_path / "base.yaml"
    config.write_text(f"defaults:\n  model: base\noutput_dir: {tmp_path / 'out'}\n")
    line = run_cclm_error(
        capsys, "pretrain", config, "data.image_caption.shards=/x.tar", "data.parallel_text.shards=/y.tar"
    )
    assert "model.vision.pretrained='openai'" in line
    assert "`hf download timm/vit_base_patch16_clip_224.openai open_clip_pytorch_model.bin`" in line
    assert "model.vision.pretrained=DIR/open_clip_pytorch_model.bin" in line


def test_loading_offline_without_the_cache_raises_the_one_line_error_too(offline_empty_cache):
    """The library path (no CLI check first): the Hub's offline error becomes the same ConfigError (open_clip
    looks for the weights before it builds the model, so this takes no time)."""
    with pytest.raises(
        ConfigError, match=r"model\.vision\.pretrained='openai'.*HF_HUB_OFFLINE=1.*hf download"
    ):
        load_pretrained_visual_state("RN50", "openai")


# ------------------------------------------------------------------------------- one download per node, first
def test_local_rank_zero_loads_first_and_the_others_wait_for_it(tmp_path):
    log = tmp_path / "log"
    mp.spawn(ordered_worker, args=(str(tmp_path / "store"), str(log)), nprocs=2, join=True)
    assert log.read_text().splitlines() == [
        "0 start 0",
        "0 end 0",
        "0 start 1",
        "0 end 1",
        # rank 0 failed inside the block: rank 1 is released all the same, not left waiting
        "1 start 0",
        "1 start 1",
        "1 end 1",
    ]


def test_the_tower_loaders_load_inside_the_local_rank_zero_first_block(tmp_path, monkeypatch):
    events = []

    @contextlib.contextmanager
    def recording_first():
        events.append("enter")
        yield
        events.append("exit")

    monkeypatch.setattr(text_module, "local_main_first", recording_first)
    real_from_pretrained = text_module.XLMRobertaModel.from_pretrained
    monkeypatch.setattr(
        text_module.XLMRobertaModel,
        "from_pretrained",
        lambda *a, **k: events.append("load text") or real_from_pretrained(*a, **k),
    )
    real_create = open_clip.create_model
    monkeypatch.setattr(
        open_clip, "create_model", lambda *a, **k: events.append("load vision") or real_create(*a, **k)
    )
    write_xlmr_folder(tmp_path / "xlmr")
    write_open_clip_folder(tmp_path / "clip")
    load_encoder(str(tmp_path / "xlmr"), {}, "eager")
    name = f"local-dir:{tmp_path / 'clip'}"
    load_pretrained_visual_state(name, name)
    assert events == ["enter", "load text", "exit", "enter", "load vision", "exit"]
