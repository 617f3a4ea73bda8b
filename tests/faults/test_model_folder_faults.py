"""A damaged or mismatched model folder, as a tester made them: loading stops with one line naming the file
(weights cut short or empty, config.json cut short or without its model section, weights that do not fit the
config, a tokenizer larger than the model's vocabulary); a released checkpoint's first file that fails to convert
is not recorded as the reference digest; the model card renders what it can of unexpected fields and a damaged
eval_results.json never stops save_pretrained."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import cclm
from cclm.cli import main as cclm_main
from cclm.errors import CheckpointError
from cclm.inference import registry
from cclm.inference.api import load_model_tokenizer
from cclm.inference.registry import ImportSettings, Pretrained, PretrainedError
from cclm.model import CrossViewModel
from cclm.model.card import render_model_card
from tests.test_convert_reference import TEXT, TINY_SWIN, reference_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def one_error_line(capsys, command: str) -> str:
    """The single ``cclm COMMAND: message`` line of a refused command (no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"cclm {command}: ")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _edit_config(path: Path, edit) -> None:
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def _set_embed_dim(config) -> None:
    config["model"]["embed_dim"] = 32  # the weights hold 64-dim projections


DAMAGE = {
    "weights cut short": ("model.safetensors", _cut, "not a readable safetensors file"),
    "weights empty": ("model.safetensors", lambda p: p.write_bytes(b""), "not a readable safetensors file"),
    "config without model": ("config.json", lambda p: _edit_config(p, lambda c: c.pop("model")), '"model"'),
    "config cut short": ("config.json", _cut, "not valid JSON"),
    "weights not fitting the config": (
        "model.safetensors",
        lambda p: _edit_config(p.with_name("config.json"), _set_embed_dim),
        "size mismatch for vision_proj.weight",
    ),
    "unknown key in the model section": (
        "config.json",
        lambda p: _edit_config(p, lambda c: c["model"].update(new_option=True)),
        "unknown config key 'new_option'",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_model_folder_is_one_line_naming_the_file(tiny_model_dir, tmp_path, capsys, damage):
    name, spoil, message = DAMAGE[damage]
    spoil(tiny_model_dir / name)
    with pytest.raises(CheckpointError, match=message) as err:
        CrossViewModel.from_pretrained(tiny_model_dir)
    assert str(tiny_model_dir / name) in str(err.value)
    with pytest.raises(CheckpointError, match=message):
        cclm.load(tiny_model_dir, device="cpu")
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (32, 32), (200, 0, 0)).save(photos / "red.png")
    argv = ["index", str(photos), "--model", str(tiny_model_dir), "--out", str(tmp_path / "index")]
    assert cclm_main(argv) == 2
    line = one_error_line(capsys, "index")
    assert str(tiny_model_dir / name) in line and message in line


def test_a_newer_config_version_loads_with_a_warning(tiny_model_dir, caplog):
    _edit_config(tiny_model_dir / "config.json", lambda c: c.update(version=99))
    with caplog.at_level(logging.WARNING):
        CrossViewModel.from_pretrained(tiny_model_dir)
    assert "version 99, newer than this cclm knows" in caplog.text and "config.json" in caplog.text


# ------------------------------------------------------------------------------------ 3. tokenizer vs model
def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused_at_load(
    tiny_model_dir, tiny_tokenizer, tmp_path
):
    vocabulary = len(tiny_tokenizer)
    bigger = shutil.copytree(tiny_model_dir, tmp_path / "bigtok")
    tokenizer = type(tiny_tokenizer).from_pretrained(str(tiny_model_dir))
    tokenizer.add_tokens([f"newword{i}" for i in range(5)])
    tokenizer.save_pretrained(str(bigger))
    with pytest.raises(CheckpointError) as err:
        load_model_tokenizer(bigger)
    message = str(err.value)
    assert f"{vocabulary + 5} tokens" in message and f"only {vocabulary} word embeddings" in message
    assert str(bigger) in message
    model, tokenizer = load_model_tokenizer(tiny_model_dir)  # the folder's own tokenizer fits
    assert len(tokenizer) == vocabulary


def test_a_folder_without_tokenizer_whose_named_tokenizer_cannot_load_says_which_and_why(
    tiny_model_dir, tmp_path, monkeypatch
):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    bare = shutil.copytree(tiny_model_dir, tmp_path / "bare")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / name).unlink(missing_ok=True)
    _edit_config(
        bare / "config.json", lambda c: c["model"]["text"].update(tokenizer="cclm-org/no-such-tokenizer")
    )
    with pytest.raises(FileNotFoundError) as err:
        load_model_tokenizer(bare)
    message = str(err.value)
    assert message.startswith(
        f"model folder {bare} has no tokenizer files, and the tokenizer its config names "
        "(cclm-org/no-such-tokenizer) cannot be loaded: "
    )
    assert "tokenizer.save_pretrained(folder)" in message


# ------------------------------------------------------------------------------------ 4. registry digests
@pytest.fixture
def manual_entry(tmp_path, tiny_tokenizer):
    template = tmp_path / "tiny_swin.yaml"
    template.write_text(
        f"vision:\n  tower: {{timm_model_name: {TINY_SWIN}, image_size: 32}}\n  image_size: 32\n"
        f"text:\n  encoder: {{num_attention_heads: {TEXT['heads']}}}\n  max_length: 32\n"
    )
    tiny_tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    entry = registry.register_pretrained(
        Pretrained(
            name="cclm-test-first-file",
            description="a fixture downloaded by hand",
            url="https://drive.google.com/file/d/XYZ/view",
            filename="cclm-test-first-file.th",
            manual_download=registry.GOOGLE_DRIVE,
            settings=ImportSettings(config=str(template), tokenizer=str(tmp_path / "tokenizer")),
        )
    )
    yield entry
    registry.unregister_pretrained(entry.name)


def test_a_first_file_that_does_not_convert_is_not_recorded(manual_entry, tmp_path, tiny_tokenizer):
    good = tmp_path / "cclm_tiny.th"
    torch.save({"model": reference_checkpoint(len(tiny_tokenizer))}, good)
    partial = tmp_path / "cclm_tiny (1).th"
    partial.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cache = tmp_path / "cache"
    with pytest.raises(PretrainedError, match="cannot convert"):
        cclm.load(manual_entry.name, checkpoint=partial, cache_dir=cache, device="cpu")
    assert registry.recorded_digest(manual_entry, cache) is None
    assert cclm.load(manual_entry.name, checkpoint=good, cache_dir=cache, device="cpu") is not None
    assert registry.recorded_digest(manual_entry, cache) == registry.sha256_of(good)


# ------------------------------------------------------------------------------------ 8. the model card
@pytest.mark.parametrize(
    "content", ['{"xtd10": {"de": ', "[1, 2]", "3"], ids=["cut short", "a list", "a number"]
)
def test_a_damaged_eval_results_file_is_left_out_of_the_card(tiny_model_dir, caplog, content):
    model = CrossViewModel.from_pretrained(tiny_model_dir)
    results = tiny_model_dir / "eval_results.json"
    results.write_text(content)
    with caplog.at_level(logging.WARNING, logger="cclm.inference"):
        model.save_pretrained(tiny_model_dir)
    assert str(results) in caplog.text
    card = (tiny_model_dir / "README.md").read_text()
    assert "No evaluation results were recorded" in card


def test_the_card_renders_what_it_can_of_unexpected_fields(tiny_model_dir, caplog):
    model = CrossViewModel.from_pretrained(tiny_model_dir)
    assert "fine-tuned for xvnli" in render_model_card(model, {"task": "xvnli"})
    with caplog.at_level(logging.WARNING, logger="cclm.inference"):
        card = render_model_card(model, {"training": [1], "eval_results": [1, 2]})
    assert "## Training" not in card and 'extra["training"] is a list' in caplog.text
    card = render_model_card(
        model, {"converted_from": {"checkpoint": "x.th", "dropped": ["box_head.weight"]}}
    )
    assert "Dropped source tensors: box_head.weight." in card
