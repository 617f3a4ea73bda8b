"""``cclm convert-reference``: a state dict with the CCLM reference key names and shapes (random values, tiny
sizes, same layout) converts strictly; the text stack then equals HF XLMRobertaModel with the same weights, the
vision tower equals timm's own import of the original Swin layout; bad checkpoints fail with a clear message;
and nothing in cclm/ unpickles a checkpoint without ``weights_only=True``."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest
import timm
import torch
from timm.models import register_model
from timm.models.swin_transformer import SwinTransformer, checkpoint_filter_fn
from transformers import XLMRobertaConfig, XLMRobertaModel

from cclm.cli import main as cclm_main
from cclm.inference import convert_reference as cr
from cclm.model import CrossViewModel

REPO = Path(__file__).resolve().parent.parent
# The tiny Swin on both sides: 32 px images, patch 4 -> 8x8 tokens, window 4 (stage 0 has a shifted block with
# an attention mask), two stages of width 32 and 64. 64 = the tiny text width, as Swin-B's 1024 = XLM-R large's.
SWIN = {
    "img_size": 32,
    "patch_size": 4,
    "embed_dim": 32,
    "depths": (2, 2),
    "num_heads": (2, 4),
    "window_size": 4,
}
TEXT = {"hidden": 64, "layers": 4, "fusion_start": 2, "intermediate": 128, "positions": 66, "heads": 2}
EMBED = 48
# The reference's CLIP ViT, tiny: 32 px, patch 8 (4x4 grid), width 48 < the text width 64.
CLIP_VIT = {"image_size": 32, "patch_size": 8, "width": 48, "layers": 2, "heads": 2, "intermediate": 96}
TINY_SWIN = "cclm_test_swin_tiny"
# Swin-B's geometry (4 stages, patch 4, window 7 at 224 px; 384 px fine-tuning: window 12) at tiny widths
# (8 -> 64 = the tiny text width), and a Swin narrower than the text (width 32).
SWIN_B_SHAPE = {
    "img_size": 224,
    "patch_size": 4,
    "embed_dim": 8,
    "depths": (2, 2, 2, 2),
    "num_heads": (1, 2, 2, 4),
    "window_size": 7,
}
SWIN_384 = {**SWIN_B_SHAPE, "img_size": 384, "window_size": 12}
TINY_SWIN_B = "cclm_test_swin_b_shape"
SWIN_NARROW = {**SWIN, "embed_dim": 16, "num_heads": (1, 2)}
TINY_SWIN_NARROW = "cclm_test_swin_narrow"
_FACTORY_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")

if not timm.list_models(TINY_SWIN):

    @register_model
    def cclm_test_swin_tiny(pretrained: bool = False, **kwargs):
        return SwinTransformer(**SWIN, **{k: v for k, v in kwargs.items() if k not in _FACTORY_ONLY})


if not timm.list_models(TINY_SWIN_B):

    @register_model
    def cclm_test_swin_b_shape(pretrained: bool = False, **kwargs):
        return SwinTransformer(**SWIN_B_SHAPE, **{k: v for k, v in kwargs.items() if k not in _FACTORY_ONLY})


if not timm.list_models(TINY_SWIN_NARROW):

    @register_model
    def cclm_test_swin_narrow(pretrained: bool = False, **kwargs):
        return SwinTransformer(**SWIN_NARROW, **{k: v for k, v in kwargs.items() if k not in _FACTORY_ONLY})


# --------------------------------------------------------------------------------- a reference-layout state dict
def _linear(out_dim: int, in_dim: int, bias: bool = True) -> dict[str, torch.Tensor]:
    weights = {"weight": torch.randn(out_dim, in_dim) * 0.05}
    if bias:
        weights["bias"] = torch.randn(out_dim) * 0.02
    return weights


def _norm(dim: int) -> dict[str, torch.Tensor]:
    return {"weight": 1 + 0.1 * torch.randn(dim), "bias": 0.02 * torch.randn(dim)}


def _put(state: dict, prefix: str, params: dict[str, torch.Tensor]) -> None:
    state.update({f"{prefix}.{k}": v for k, v in params.items()})


def reference_swin(prefix: str = "vision_encoder", swin: dict = SWIN) -> dict[str, torch.Tensor]:
    """Microsoft's Swin layout as CCLM's models/swin_transformer.py builds it: patch merging at the END of each
    stage but the last, buffers relative_position_index (every block) and attn_mask (shifted blocks)."""
    state: dict[str, torch.Tensor] = {}
    dim, grid = swin["embed_dim"], swin["img_size"] // swin["patch_size"]
    state[f"{prefix}.patch_embed.proj.weight"] = (
        torch.randn(dim, 3, swin["patch_size"], swin["patch_size"]) * 0.1
    )
    state[f"{prefix}.patch_embed.proj.bias"] = torch.randn(dim) * 0.02
    _put(state, f"{prefix}.patch_embed.norm", _norm(dim))
    for stage, (depth, heads) in enumerate(zip(swin["depths"], swin["num_heads"])):
        window = min(swin["window_size"], grid)
        for block in range(depth):
            p = f"{prefix}.layers.{stage}.blocks.{block}"
            _put(state, f"{p}.norm1", _norm(dim))
            state[f"{p}.attn.relative_position_bias_table"] = torch.randn((2 * window - 1) ** 2, heads) * 0.02
            state[f"{p}.attn.relative_position_index"] = torch.randint(
                0, (2 * window - 1) ** 2, (window**2,) * 2
            )
            _put(state, f"{p}.attn.qkv", _linear(3 * dim, dim))
            _put(state, f"{p}.attn.proj", _linear(dim, dim))
            _put(state, f"{p}.norm2", _norm(dim))
            _put(state, f"{p}.mlp.fc1", _linear(4 * dim, dim))
            _put(state, f"{p}.mlp.fc2", _linear(dim, 4 * dim))
            if block % 2 == 1 and grid > window:
                state[f"{p}.attn_mask"] = torch.zeros((grid // window) ** 2, window**2, window**2)
        if stage < len(swin["depths"]) - 1:
            _put(
                state, f"{prefix}.layers.{stage}.downsample.reduction", _linear(2 * dim, 4 * dim, bias=False)
            )
            _put(state, f"{prefix}.layers.{stage}.downsample.norm", _norm(4 * dim))
            dim, grid = 2 * dim, grid // 2
    _put(state, f"{prefix}.norm", _norm(dim))
    return state


def reference_clip_vit(prefix: str = "vision_encoder", vit: dict | None = None) -> dict[str, torch.Tensor]:
    """models/clip_vit.py's CLIPVisionTransformer: HF CLIP names, patch_embed / pos_embed renamed, a
    position_ids buffer."""
    vit = vit or CLIP_VIT
    w, grid = vit["width"], vit["image_size"] // vit["patch_size"]
    state = {
        f"{prefix}.patch_embed.weight": torch.randn(w, 3, vit["patch_size"], vit["patch_size"]) * 0.1,
        f"{prefix}.class_embedding": torch.randn(w) * 0.1,
        f"{prefix}.pos_embed.weight": torch.randn(grid * grid + 1, w) * 0.1,
        f"{prefix}.position_ids": torch.arange(grid * grid + 1)[None],
    }
    _put(state, f"{prefix}.pre_layrnorm", _norm(w))
    for i in range(vit["layers"]):
        p = f"{prefix}.encoder.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _put(state, f"{p}.self_attn.{name}", _linear(w, w))
        _put(state, f"{p}.layer_norm1", _norm(w))
        _put(state, f"{p}.mlp.fc1", _linear(vit["intermediate"], w))
        _put(state, f"{p}.mlp.fc2", _linear(w, vit["intermediate"]))
        _put(state, f"{p}.layer_norm2", _norm(w))
    _put(state, f"{prefix}.post_layernorm", _norm(w))
    return state


def reference_text(
    vocab: int, prefix: str = "text_encoder.bert.", text: dict = TEXT, encoder_width: int | None = None
) -> dict[str, torch.Tensor]:
    """xbert's BertModel naming: embeddings (+ position_ids buffer), encoder.layer.N with crossattention from
    fusion_layer on (keys/values read the vision width ``encoder_width``, by default the text width)."""
    h, state = text["hidden"], {}
    vision_w = encoder_width or h
    state[f"{prefix}embeddings.word_embeddings.weight"] = torch.randn(vocab, h) * 0.05
    state[f"{prefix}embeddings.position_embeddings.weight"] = torch.randn(text["positions"], h) * 0.05
    state[f"{prefix}embeddings.token_type_embeddings.weight"] = torch.randn(1, h) * 0.05
    _put(state, f"{prefix}embeddings.LayerNorm", _norm(h))
    state[f"{prefix}embeddings.position_ids"] = torch.arange(text["positions"])[None]
    for i in range(text["layers"]):
        p = f"{prefix}encoder.layer.{i}"
        attentions = ["attention"] + (["crossattention"] if i >= text["fusion_start"] else [])
        for attn in attentions:
            for name in ("query", "key", "value"):
                reads = vision_w if attn == "crossattention" and name != "query" else h
                _put(state, f"{p}.{attn}.self.{name}", _linear(h, reads))
            _put(state, f"{p}.{attn}.output.dense", _linear(h, h))
            _put(state, f"{p}.{attn}.output.LayerNorm", _norm(h))
        _put(state, f"{p}.intermediate.dense", _linear(text["intermediate"], h))
        _put(state, f"{p}.output.dense", _linear(h, text["intermediate"]))
        _put(state, f"{p}.output.LayerNorm", _norm(h))
    return state


def reference_checkpoint(
    vocab: int,
    mlm_head: bool = True,
    swin: dict = SWIN,
    text: dict = TEXT,
    embed: int = EMBED,
    clip_vit: dict | None = None,
) -> dict[str, torch.Tensor]:
    """A CCLM pretraining checkpoint's state dict (xvlm.XVLMBase + CrossViewLM), tiny; with ``clip_vit`` its
    vision encoder is the reference's CLIP ViT instead of the Swin."""
    h = text["hidden"]
    state = reference_clip_vit(vit=clip_vit) if clip_vit else reference_swin(swin=swin)
    vision_width = clip_vit["width"] if clip_vit else swin["embed_dim"] * 2 ** (len(swin["depths"]) - 1)
    prefix = "text_encoder.bert." if mlm_head else "text_encoder."
    state.update(reference_text(vocab, prefix, text, encoder_width=vision_width))
    if mlm_head:
        p = "text_encoder.cls.predictions"
        state[f"{p}.bias"] = torch.randn(vocab) * 0.02
        _put(state, f"{p}.transform.dense", _linear(h, h))
        _put(state, f"{p}.transform.LayerNorm", _norm(h))
        state[f"{p}.decoder.weight"] = state["text_encoder.bert.embeddings.word_embeddings.weight"].clone()
        state[f"{p}.decoder.bias"] = state[f"{p}.bias"].clone()
    _put(state, "vision_proj", _linear(embed, vision_width))
    _put(state, "text_proj", _linear(embed, h))
    state["temp"] = torch.tensor(0.05)
    for head, out_dim in (("itm_head", 2), ("bbox_head", 4)):
        _put(state, f"{head}.0", _linear(2 * h, h))
        _put(state, f"{head}.1", _norm(2 * h))
        _put(state, f"{head}.3", _linear(out_dim, 2 * h))
    return state


@pytest.fixture
def tiny_config(tmp_path) -> Path:
    path = tmp_path / "tiny_swin.yaml"
    path.write_text(
        f"vision:\n  tower: {{timm_model_name: {TINY_SWIN}, image_size: 32}}\n  image_size: 32\n"
        f"text:\n  encoder: {{num_attention_heads: {TEXT['heads']}}}\n  max_length: 32\n"
    )
    return path


@pytest.fixture
def tokenizer_dir(tmp_path, tiny_tokenizer) -> Path:
    out = tmp_path / "tokenizer"
    tiny_tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture
def checkpoint(tmp_path, tiny_tokenizer) -> tuple[Path, dict[str, torch.Tensor]]:
    state = reference_checkpoint(len(tiny_tokenizer))
    path = tmp_path / "cclm_base.th"
    torch.save({"model": state, "epoch": 29}, path)
    return path, state


def _convert(checkpoint, tmp_path, tiny_config, tokenizer_dir, name="converted", **kwargs):
    return cr.convert(checkpoint, tmp_path / name, config=tiny_config, tokenizer=str(tokenizer_dir), **kwargs)


# ------------------------------------------------------------------------------------------------- strict load
def test_reference_checkpoint_converts_strictly_with_a_report(
    checkpoint, tmp_path, tiny_config, tokenizer_dir
):
    path, state = checkpoint
    report = _convert(path, tmp_path, tiny_config, tokenizer_dir)
    model = CrossViewModel.from_pretrained(tmp_path / "converted")  # strict safetensors load of every tensor
    dropped = {reason: len(keys) for reason, keys in report.dropped.items()}
    n_blocks, n_shifted = sum(SWIN["depths"]), 1
    assert dropped == {
        "swin_buffer": n_blocks + n_shifted,
        "position_ids": 1,
        "tied_decoder_weight": 1,
        "tied_decoder_bias": 1,
    }
    assert report.consumed + sum(dropped.values()) == report.source_tensors == len(state)
    assert report.filled == len(model.state_dict()) and not report.left_at_init
    assert (tmp_path / "converted" / "tokenizer.json").exists()
    assert (tmp_path / "converted" / "conversion_report.json").exists()

    # every consumed tensor sits where the mapping says, unchanged (the position table is checked below)
    ours = model.state_dict()
    layout = cr.SourceLayout.detect(state)
    for key, value in state.items():
        for name in cr.map_key(key, layout)[0]:
            if name != "text.embeddings.position_embeddings.weight":
                assert torch.equal(ours[name], value.reshape(ours[name].shape)), (key, name)
    assert torch.equal(
        ours["fusion.layers.1.crossattention.self.key.weight"],
        state["text_encoder.bert.encoder.layer.3.crossattention.self.key.weight"],
    )
    assert torch.equal(
        ours["vision.visual.trunk.layers.1.downsample.reduction.weight"],
        state["vision_encoder.layers.0.downsample.reduction.weight"],
    )
    assert torch.equal(ours["mlm_head.decoder.weight"], ours["text.embeddings.word_embeddings.weight"])
    assert model.cfg.text.text_layers == [0, 1] and model.cfg.text.fusion_layers == [2, 3]
    assert model.cfg.embed_dim == EMBED and model.temp.item() == pytest.approx(0.05)


def test_the_box_head_is_kept_and_predicts_the_references_box(
    checkpoint, tmp_path, tiny_config, tokenizer_dir
):
    """The 4M checkpoint's bbox_head becomes the box head: the same weights give the reference's
    ``bbox_head(cls).sigmoid()`` (its build_mlp: Linear, LayerNorm, GELU, Linear) on any fused [CLS]; a checkpoint
    without one converts to a model without a box head."""
    path, state = checkpoint
    _convert(path, tmp_path, tiny_config, tokenizer_dir)
    model = CrossViewModel.from_pretrained(tmp_path / "converted").eval()
    assert model.cfg.objectives.bbox and model.box_head is not None
    h = TEXT["hidden"]
    reference = torch.nn.Sequential(
        torch.nn.Linear(h, 2 * h), torch.nn.LayerNorm(2 * h), torch.nn.GELU(), torch.nn.Linear(2 * h, 4)
    )
    reference.load_state_dict(
        {k[len("bbox_head.") :]: v for k, v in state.items() if k.startswith("bbox_head.")}
    )
    cls = torch.randn(5, h)
    with torch.no_grad():
        torch.testing.assert_close(model.box_head(cls), reference(cls).sigmoid())

    without = {k: v for k, v in state.items() if not k.startswith("bbox_head.")}
    torch.save({"model": without}, tmp_path / "no_box.th")
    _convert(tmp_path / "no_box.th", tmp_path, tiny_config, tokenizer_dir, name="no_box")
    assert CrossViewModel.from_pretrained(tmp_path / "no_box").box_head is None


def _hf_text_model(state: dict[str, torch.Tensor], vocab: int) -> XLMRobertaModel:
    """HF XLMRobertaModel holding the reference's text-only layers, loaded under HF's own names."""
    config = XLMRobertaConfig(
        vocab_size=vocab,
        hidden_size=TEXT["hidden"],
        num_hidden_layers=TEXT["fusion_start"],
        num_attention_heads=TEXT["heads"],
        intermediate_size=TEXT["intermediate"],
        max_position_embeddings=TEXT["positions"],
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    hf = XLMRobertaModel(config, add_pooling_layer=False).eval()
    prefix = "text_encoder.bert."
    weights = {
        k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) and "position_ids" not in k
    }
    weights = {
        k: v
        for k, v in weights.items()
        if not k.startswith("encoder.layer.") or int(k.split(".")[2]) < TEXT["fusion_start"]
    }
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    assert not unexpected and all("position_ids" in k or "token_type_ids" in k for k in missing), missing
    return hf


@pytest.mark.parametrize("position_ids", ["reference", "xlmr"])
def test_text_stack_equals_hf_xlmroberta_with_the_same_weights(
    checkpoint, tmp_path, tiny_config, tokenizer_dir, tiny_tokenizer, position_ids
):
    path, state = checkpoint
    _convert(path, tmp_path, tiny_config, tokenizer_dir, position_ids=position_ids)
    model = CrossViewModel.from_pretrained(tmp_path / "converted").eval()
    hf = _hf_text_model(state, len(tiny_tokenizer))
    enc = tiny_tokenizer(
        ["a red circle above a blue square", "青い四角の上に赤い丸", "deux petits triangles"],
        padding=True,
        return_tensors="pt",
    )
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        ours = model.encode_text(ids, mask)[0]
        # the reference numbers positions 0, 1, 2, ...; HF's default numbering starts at padding_idx + 1
        hf_positions = (
            torch.arange(ids.shape[1])[None].expand_as(ids) if position_ids == "reference" else None
        )
        expected = hf(input_ids=ids, attention_mask=mask, position_ids=hf_positions).last_hidden_state
    valid = mask.bool()
    torch.testing.assert_close(ours[valid], expected[valid], atol=1e-5, rtol=1e-4)


def test_vision_tower_equals_timms_own_import_of_the_original_swin_layout(
    checkpoint, tmp_path, tiny_config, tokenizer_dir
):
    path, state = checkpoint
    _convert(path, tmp_path, tiny_config, tokenizer_dir)
    model = CrossViewModel.from_pretrained(tmp_path / "converted").eval()
    reference = SwinTransformer(**SWIN, num_classes=0).eval()
    original = {k[len("vision_encoder.") :]: v for k, v in state.items() if k.startswith("vision_encoder.")}
    reference.load_state_dict(checkpoint_filter_fn(original, reference), strict=True)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        tokens = model.vision(images)
        expected = reference.forward_features(model.vision.normalize(images)).flatten(1, 2)
    torch.testing.assert_close(tokens[:, 1:], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        tokens[:, 0], expected.mean(dim=1), atol=1e-5, rtol=1e-4
    )  # CCLM's avg-pooled [CLS]
    # the ITC feature is vision_proj of that token, as in the reference's get_features
    feat = model.encode_image(images)[1]
    expected_feat = torch.nn.functional.normalize(
        expected.mean(1) @ state["vision_proj.weight"].t() + state["vision_proj.bias"], dim=-1
    )
    torch.testing.assert_close(feat.detach(), expected_feat, atol=1e-5, rtol=1e-4)


def test_fine_tuned_layout_without_mlm_head_needs_an_explicit_flag(
    tmp_path, tiny_config, tokenizer_dir, tiny_tokenizer
):
    state = reference_checkpoint(len(tiny_tokenizer), mlm_head=False)
    path = tmp_path / "retrieval_ft.pth"
    torch.save(state, path)
    with pytest.raises(cr.ConversionError, match="--allow-missing-mlm-head"):
        _convert(path, tmp_path, tiny_config, tokenizer_dir)
    report = _convert(path, tmp_path, tiny_config, tokenizer_dir, allow_missing_mlm_head=True)
    assert sorted(report.left_at_init) == [
        "mlm_head.bias",
        "mlm_head.decoder.bias",
        "mlm_head.dense.bias",
        "mlm_head.dense.weight",
        "mlm_head.layer_norm.bias",
        "mlm_head.layer_norm.weight",
    ]
    model = CrossViewModel.from_pretrained(tmp_path / "converted")
    assert torch.equal(
        model.text.layers[0].attention.self.query.weight,
        state["text_encoder.encoder.layer.0.attention.self.query.weight"],
    )


def test_base_swin_config_fits_the_released_checkpoint_layout():
    """configs/model/base_swin.yaml (timm swin_base_patch4_window7_224 + 12 XLM-R-large layers) takes every
    tensor of a CCLM-base-shaped checkpoint, shape for shape. Shapes only: both sides live on the meta device."""
    swin_b = {
        "img_size": 224,
        "patch_size": 4,
        "embed_dim": 128,
        "depths": (2, 2, 18, 2),
        "num_heads": (4, 8, 16, 32),
        "window_size": 7,
    }
    xlmr_large = {"hidden": 1024, "layers": 12, "fusion_start": 6, "intermediate": 4096, "positions": 514}
    with torch.device("meta"):
        state = reference_checkpoint(250002, swin=swin_b, text=xlmr_large, embed=256)
        state["temp"] = torch.tensor(0.07, device="cpu")
        layout = cr.SourceLayout.detect(state)
        cfg = cr.target_config(state, layout, cr.load_config(cr.ModelConfig, cr.DEFAULT_CONFIG))
        model = CrossViewModel(cfg, load_pretrained=False)
    assert model.encoder_config.num_attention_heads == 16 and model.vision.width == 1024
    ours = model.state_dict()
    filled = set()
    for key, value in state.items():
        names, reason = cr.map_key(key, layout)
        assert names or reason, f"unmapped source key {key}"
        for name in names:
            assert name in ours and ours[name].numel() == value.numel(), (key, name)
            assert ours[name].shape == value.shape or value.numel() == 1, (
                key,
                name,
                ours[name].shape,
                value.shape,
            )
            filled.add(name)
    assert set(ours) - filled == {"mlm_head.decoder.weight"}  # tied to the word embeddings


# ------------------------------------------------------------------------------------------------- resolution
def _template(tmp_path: Path, tower: str, size: int, heads: int | None = TEXT["heads"]) -> Path:
    path = tmp_path / f"{tower}.yaml"
    encoder = f"  encoder: {{num_attention_heads: {heads}}}\n" if heads else ""
    path.write_text(
        f"vision:\n  tower: {{timm_model_name: {tower}, image_size: {size}}}\n  image_size: {size}\n"
        f"text:\n{encoder}  max_length: 32\n"
    )
    return path


def _timm_features(swin: dict, state: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """timm's own Swin built at ``swin``'s size and window, importing the original layout."""
    reference = SwinTransformer(**swin, num_classes=0).eval()
    original = {k[len("vision_encoder.") :]: v for k, v in state.items() if k.startswith("vision_encoder.")}
    reference.load_state_dict(checkpoint_filter_fn(original, reference), strict=True)
    with torch.no_grad():
        return reference.forward_features(pixels).flatten(1, 2)


def test_a_384px_window_12_checkpoint_converts_and_equals_timms_swin_at_window_12(
    tmp_path, tokenizer_dir, tiny_tokenizer
):
    """The fine-tuned checkpoints' geometry: 529-row tables (window 12) and 384 px attention masks, converted
    with a config whose tower is built at 224 px / window 7 (as base_swin.yaml's Swin-B)."""
    state = reference_checkpoint(len(tiny_tokenizer), mlm_head=False, swin=SWIN_384)
    assert state["vision_encoder.layers.0.blocks.0.attn.relative_position_bias_table"].shape == (529, 1)
    path = tmp_path / "retrieval_ft_384.th"
    torch.save(state, path)
    config = _template(tmp_path, TINY_SWIN_B, 224)
    report = _convert(path, tmp_path, config, tokenizer_dir, allow_missing_mlm_head=True)
    assert report.vision["window_size"] == 12 and report.vision["image_size"] == 384
    assert report.vision["image_size_from"] == "the checkpoint's attention masks"
    assert report.vision["heads"] == [1, 2, 2, 4]
    model = CrossViewModel.from_pretrained(
        tmp_path / "converted"
    ).eval()  # rebuilt at 384 / window 12 offline
    assert model.cfg.vision.image_size == 384
    assert model.cfg.vision.tower["image_size"] == 384 and model.cfg.vision.tower["window_size"] == 12
    trunk = model.vision.visual.trunk
    assert [s.blocks[0].attn.window_size for s in trunk.layers] == [(12, 12)] * 4
    images = torch.randint(0, 256, (1, 3, 384, 384), dtype=torch.uint8)
    with torch.no_grad():
        tokens = model.vision(images)
    expected = _timm_features(SWIN_384, state, model.vision.normalize(images))
    torch.testing.assert_close(tokens[:, 1:], expected, atol=1e-5, rtol=1e-4)
    assert "window 12, 384 px" in report.summary()


def test_without_masks_the_resolution_is_inferred_from_the_window_and_a_wrong_one_is_refused(
    tmp_path, tokenizer_dir, tiny_tokenizer
):
    state = reference_checkpoint(len(tiny_tokenizer), swin=SWIN_384)
    state = {k: v for k, v in state.items() if not k.endswith("attn_mask")}
    path = tmp_path / "no_masks.th"
    torch.save(state, path)
    config = _template(tmp_path, TINY_SWIN_B, 224)
    report = _convert(path, tmp_path, config, tokenizer_dir)
    assert report.vision["image_size"] == 384 and report.vision["image_size_from"].startswith("inferred")
    # a resolution that 12x12 windows do not tile is refused naming the size and the window
    with pytest.raises(
        cr.ConversionError, match=r"image_size=224 with window_size=12.*stage 0 is 56x56"
    ) as err:
        _convert(path, tmp_path, config, tokenizer_dir, name="at224", image_size=224)
    assert "529" in str(err.value) and "384" in str(err.value)


def test_an_image_size_other_than_the_checkpoints_resizes_after_loading(
    tmp_path, tokenizer_dir, tiny_tokenizer
):
    state = reference_checkpoint(len(tiny_tokenizer), swin=SWIN_384)
    path = tmp_path / "ft384.th"
    torch.save(state, path)
    report = _convert(path, tmp_path, _template(tmp_path, TINY_SWIN_B, 224), tokenizer_dir, image_size=480)
    assert report.vision["image_size"] == 384 and report.vision["resized_to"] == 480
    model = CrossViewModel.from_pretrained(tmp_path / "converted")
    assert (
        model.cfg.vision.image_size == 480 and model.cfg.vision.tower["window_size"] == 15
    )  # 12 * 120 // 96
    table = model.vision.visual.trunk.layers[0].blocks[0].attn.relative_position_bias_table
    assert table.shape == ((2 * 15 - 1) ** 2, 1)


def test_head_counts_that_differ_are_refused(tmp_path, tiny_config, tokenizer_dir, tiny_tokenizer):
    state = reference_checkpoint(len(tiny_tokenizer), swin={**SWIN, "num_heads": (4, 4)})
    path = tmp_path / "heads.th"
    torch.save(state, path)
    with pytest.raises(cr.ConversionError, match=r"gives \[4, 4\] heads per stage.*has \[2, 4\]"):
        _convert(path, tmp_path, tiny_config, tokenizer_dir)

    path = tmp_path / "ok.th"
    torch.save(reference_checkpoint(len(tiny_tokenizer)), path)
    with pytest.raises(cr.ConversionError, match=r"--text-heads 4 disagrees .*num_attention_heads=2"):
        _convert(path, tmp_path, tiny_config, tokenizer_dir, text_heads=4)
    with pytest.raises(cr.ConversionError, match="3 text attention heads do not divide the text width 64"):
        _convert(path, tmp_path, _template(tmp_path, TINY_SWIN, 32, heads=None), tokenizer_dir, text_heads=3)
    report = _convert(path, tmp_path, tiny_config, tokenizer_dir, text_heads=2)
    assert report.text_heads == {"heads": 2, "source": "--text-heads (agrees with the config)"}
    report = _convert(
        path, tmp_path, _template(tmp_path, TINY_SWIN, 32, heads=None), tokenizer_dir, name="c2"
    )
    assert report.text_heads["heads"] == 1 and report.text_heads["source"].startswith("assumed")  # 64 / 64
    assert CrossViewModel.from_pretrained(tmp_path / "c2").encoder_config.num_attention_heads == 1


def test_a_vision_tower_narrower_than_the_text_converts_exactly(tmp_path, tokenizer_dir, tiny_tokenizer):
    """The reference's cross-attention keys/values read 32-wide Swin tokens ([64, 32] weights); ours read
    image_to_fusion's 64-wide tokens: identity into the first 32 channels, zero key/value columns after."""
    state = reference_checkpoint(len(tiny_tokenizer), swin=SWIN_NARROW)
    key = "text_encoder.bert.encoder.layer.2.crossattention.self.key.weight"
    assert state[key].shape == (64, 32)
    path = tmp_path / "narrow.th"
    torch.save(state, path)
    report = _convert(path, tmp_path, _template(tmp_path, TINY_SWIN_NARROW, 32), tokenizer_dir)
    assert any(line.startswith("image_to_fusion: identity") for line in report.derived)
    model = CrossViewModel.from_pretrained(tmp_path / "converted").eval()
    assert model.vision.width == 32 and isinstance(model.image_to_fusion, torch.nn.Linear)
    tokens = torch.randn(2, 5, 32)
    with torch.no_grad():
        memory = model.image_to_fusion(tokens)
        for i in range(TEXT["layers"] - TEXT["fusion_start"]):
            attention = model.fusion.layers[i].crossattention.self
            for name in ("key", "value"):
                src = f"text_encoder.bert.encoder.layer.{TEXT['fusion_start'] + i}.crossattention.self.{name}"
                expected = tokens @ state[f"{src}.weight"].t() + state[f"{src}.bias"]
                torch.testing.assert_close(getattr(attention, name)(memory), expected, atol=1e-6, rtol=1e-5)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    ids = torch.tensor([[0, 5, 6, 2], [0, 7, 2, 1]])
    mask = (ids != 1).long()
    with torch.no_grad():
        fused = model.fuse(model.encode_text(ids, mask)[0], mask, model.encode_image(images)[0])
    assert torch.isfinite(fused).all()


def test_a_vision_tower_wider_than_the_text_is_refused(tmp_path, tiny_config, tokenizer_dir, tiny_tokenizer):
    state = reference_checkpoint(len(tiny_tokenizer), swin={**SWIN, "embed_dim": 64})
    path = tmp_path / "wide.th"
    torch.save(state, path)
    with pytest.raises(cr.ConversionError, match="vision width 128 is larger than the text width 64"):
        _convert(path, tmp_path, tiny_config, tokenizer_dir)


def test_a_clip_vit_checkpoint_equals_hf_clip_with_the_same_weights(
    tmp_path, tiny_config, tokenizer_dir, tiny_tokenizer
):
    """use_clip_vit checkpoints: models/clip_vit.py is HF's CLIP vision transformer (QuickGELU), its tokens
    post_layernorm'd; ours is open_clip's ViT with q/k/v fused."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    state = reference_checkpoint(len(tiny_tokenizer), clip_vit=CLIP_VIT)
    path = tmp_path / "clip.th"
    torch.save(state, path)
    report = _convert(path, tmp_path, tiny_config, tokenizer_dir, vision_heads=CLIP_VIT["heads"])
    assert report.vision["kind"] == "clip_vit" and report.vision["heads"] == 2
    assert report.dropped["vit_position_ids"] == ["vision_encoder.position_ids"]
    model = CrossViewModel.from_pretrained(tmp_path / "converted").eval()
    assert model.vision.tower_cfg["quick_gelu"] is True and model.vision.width == CLIP_VIT["width"]

    hf = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=CLIP_VIT["width"],
            intermediate_size=CLIP_VIT["intermediate"],
            num_hidden_layers=CLIP_VIT["layers"],
            num_attention_heads=CLIP_VIT["heads"],
            image_size=CLIP_VIT["image_size"],
            patch_size=CLIP_VIT["patch_size"],
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
        )
    ).eval()
    renames = {
        "patch_embed.weight": "embeddings.patch_embedding.weight",
        "class_embedding": "embeddings.class_embedding",
        "pos_embed.weight": "embeddings.position_embedding.weight",
    }
    weights = {}
    for key, value in state.items():
        if key.startswith("vision_encoder.") and not key.endswith("position_ids"):
            rest = key[len("vision_encoder.") :]
            weights[renames.get(rest, rest)] = value
    inner = getattr(hf, "vision_model", hf)  # transformers 5 flattened CLIPVisionModel
    missing, unexpected = inner.load_state_dict(weights, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), missing
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        ours = model.vision(images)
        hidden = hf(pixel_values=model.vision.normalize(images)).last_hidden_state
        expected = inner.post_layernorm(hidden)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)

    # at another resolution the position grid is resampled as the reference's interpolate_pos_embed does
    _convert(path, tmp_path, tiny_config, tokenizer_dir, name="at48", vision_heads=2, image_size=48)
    resized = CrossViewModel.from_pretrained(tmp_path / "at48")
    grid = state["vision_encoder.pos_embed.weight"][1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    expected_pos = torch.cat(
        [state["vision_encoder.pos_embed.weight"][:1], grid.permute(0, 2, 3, 1).reshape(36, -1)]
    )
    torch.testing.assert_close(resized.vision.visual.positional_embedding.detach(), expected_pos)


def test_other_vision_layouts_are_refused_by_name(tmp_path, tiny_config, tokenizer_dir, tiny_tokenizer):
    state = {
        k: v for k, v in reference_checkpoint(len(tiny_tokenizer)).items() if not k.startswith("vision_")
    }
    state.update(
        {
            "vision_encoder.cls_token": torch.zeros(1, 1, 64),
            "vision_encoder.pos_embed": torch.zeros(1, 17, 64),
            "vision_encoder.blocks.0.attn.qkv.weight": torch.zeros(192, 64),
        }
    )
    path = tmp_path / "deit.th"
    torch.save(state, path)
    with pytest.raises(cr.ConversionError, match=r"DeiT/BEiT-style ViT \(models/vit.py"):
        _convert(path, tmp_path, tiny_config, tokenizer_dir)


# ------------------------------------------------------------------------------------------------- bad input
def test_corrupt_or_unrelated_checkpoints_fail_with_a_clear_message(
    checkpoint, tmp_path, tiny_config, tokenizer_dir
):
    path, state = checkpoint
    corrupt = tmp_path / "corrupt.th"
    corrupt.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(cr.ConversionError, match="cannot read .* weights_only=True"):
        _convert(corrupt, tmp_path, tiny_config, tokenizer_dir)

    unrelated = tmp_path / "resnet.pth"
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).state_dict(), unrelated)
    with pytest.raises(cr.ConversionError, match="not a CCLM/X-VLM checkpoint"):
        _convert(unrelated, tmp_path, tiny_config, tokenizer_dir)

    pickled = tmp_path / "with_objects.th"
    torch.save({"model": state, "args": argparse.Namespace(lr=1e-4)}, pickled)
    with pytest.raises(cr.ConversionError, match="never unpickled"):
        _convert(pickled, tmp_path, tiny_config, tokenizer_dir)

    with pytest.raises(cr.ConversionError, match="checkpoint not found"):
        _convert(tmp_path / "nope.th", tmp_path, tiny_config, tokenizer_dir)

    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(cr.ConversionError, match="cannot load the tokenizer"):
        _convert(path, tmp_path, tiny_config, empty)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("drop", r"not in the checkpoint: fusion\.layers\.0\.crossattention\.self\.value\.weight"),
        ("extra", r"no place in this model: text_encoder\.bert\.encoder\.layer\.0\.adapter\.weight"),
        ("shape", r"shapes differ: text_proj\.weight \(40, 64\)"),
        ("untied", r"differs from 'text_encoder\.bert\.embeddings\.word_embeddings\.weight'"),
    ],
)
def test_incomplete_or_mismatched_checkpoints_name_the_keys(
    tmp_path, tiny_config, tokenizer_dir, tiny_tokenizer, damage, message
):
    state = reference_checkpoint(len(tiny_tokenizer))
    if damage == "drop":
        del state["text_encoder.bert.encoder.layer.2.crossattention.self.value.weight"]
    elif damage == "extra":
        state["text_encoder.bert.encoder.layer.0.adapter.weight"] = torch.zeros(4)
    elif damage == "shape":
        state["text_proj.weight"] = torch.zeros(40, TEXT["hidden"])
    else:
        state["text_encoder.cls.predictions.decoder.weight"] += 1
    path = tmp_path / "damaged.th"
    torch.save(state, path)
    with pytest.raises(cr.ConversionError, match=message):
        _convert(path, tmp_path, tiny_config, tokenizer_dir)
    assert not (tmp_path / "converted" / "model.safetensors").exists()


def test_cli_prints_the_report_and_fails_cleanly(checkpoint, tmp_path, tiny_config, tokenizer_dir, capsys):
    path, _ = checkpoint
    out = tmp_path / "cli_out"
    args = [
        "convert-reference",
        str(path),
        str(out),
        "--config",
        str(tiny_config),
        "--tokenizer",
        str(tokenizer_dir),
        "--text-heads",
        "2",
    ]
    assert cclm_main(args) == 0
    printed = capsys.readouterr().out
    assert "consumed" in printed and "relative_position_index" in printed and "our tensors filled" in printed
    assert "text attention heads: 2 (--text-heads" in printed and "window 4, 32 px" in printed
    assert (out / "README.md").exists()
    bad = tmp_path / "bad.th"
    bad.write_bytes(b"not a checkpoint")
    assert cclm_main(["convert-reference", str(bad), str(tmp_path / "x"), "--config", str(tiny_config)]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_cli_user_errors_exit_2_on_one_line_and_debug_shows_their_traceback(tmp_path, tiny_config, capsys):
    """docs/reliability.md: every command prints a user error as one line with status 2 (it was 1 here), and
    ``cclm --debug`` adds its traceback."""
    missing = tmp_path / "missing.pth"
    args = ["convert-reference", str(missing), str(tmp_path / "x"), "--config", str(tiny_config)]
    assert cclm_main(args) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"cclm convert-reference: checkpoint not found: {missing}"]
    assert cclm_main(["--debug", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "ConversionError" in err
    assert err.strip().splitlines()[-1] == f"cclm convert-reference: checkpoint not found: {missing}"
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------- no pickle
def _unsafe_loads(source: str) -> list[str]:
    """Calls that can unpickle arbitrary objects: torch.load without weights_only=True, pickle/dill/joblib
    loads, numpy loads with allow_pickle=True."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        keywords = {kw.arg: kw.value for kw in node.keywords}
        if func.endswith("torch.load") or func == "load" and "weights_only" in keywords:
            safe = (
                isinstance(keywords.get("weights_only"), ast.Constant)
                and keywords["weights_only"].value is True
            )
            if not safe:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif func.split(".")[0] in ("pickle", "cPickle", "dill", "joblib") and func.split(".")[-1] in (
            "load",
            "loads",
        ):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif func.endswith(("np.load", "numpy.load")):
            allow = keywords.get("allow_pickle")
            if isinstance(allow, ast.Constant) and allow.value is True:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_the_pickle_scan_catches_unsafe_loads():
    assert _unsafe_loads("import torch\nx = torch.load(p)\ny = torch.load(p, weights_only=False)")
    assert _unsafe_loads("import pickle\nx = pickle.loads(b)")
    assert not _unsafe_loads("import torch\nx = torch.load(p, map_location='cpu', weights_only=True)")


def test_no_checkpoint_is_loaded_with_unrestricted_pickle_in_cclm():
    offenders = {}
    for path in sorted((REPO / "cclm").rglob("*.py")):
        found = _unsafe_loads(path.read_text(encoding="utf-8"))
        if found:
            offenders[str(path.relative_to(REPO))] = found
    assert not offenders, f"unrestricted pickle loads: {offenders}"
