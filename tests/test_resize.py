"""cclm.model.resize: a model's vision tower at another resolution. Swin tables follow the reference (BEiT's
geometric grid with a bicubic spline: scipy's RectBivariateSpline, the documented replacement of the reference's
``interp2d(kind="cubic")``) or timm's own resizing, ViT grids the reference's bicubic resampling or timm's; the
resized geometry equals timm's ``set_input_size``; a resized model saves, reloads and loads through
``cclm.load`` at its new size; sizes that do not fit are refused naming the size and the window."""

from __future__ import annotations

import pytest
import torch
from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table
from timm.models.swin_transformer import SwinTransformer

import cclm
from cclm.config import ConfigError, ModelConfig, load_config
from cclm.model import CrossViewModel
from cclm.model.resize import (
    geometric_offsets,
    interpolate_rel_pos_table,
    resample_pos_embed,
    resize_vision,
    spline_matrix,
)
from cclm.model.vision import VisionTower, check_tower_fields
from tests.conftest import REPO
from tests.test_convert_reference import SWIN, TINY_SWIN

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def swin_cfg(tiny_model_cfg) -> ModelConfig:
    """The tiny model with the tiny timm Swin (32 px, patch 4, window 4, width 64 = the text width)."""
    cfg = load_config(ModelConfig, REPO / "configs" / "model" / "tiny.yaml")
    cfg.text.encoder = dict(tiny_model_cfg.text.encoder)
    cfg.vision.tower = {"timm_model_name": TINY_SWIN, "image_size": 32, "timm_pool": "", "timm_proj": "none"}
    return cfg


def _tables(model: CrossViewModel) -> list[torch.Tensor]:
    trunk = model.vision.visual.trunk
    return [b.attn.relative_position_bias_table.detach().clone() for s in trunk.layers for b in s.blocks]


def _images(size: int, n: int = 2) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )


# --------------------------------------------------------------------------------------------- interpolation
@pytest.mark.parametrize("old, new", [(7, 12), (7, 15), (4, 6), (12, 7), (2, 4)])
def test_reference_table_interpolation_equals_scipys_bicubic_spline_on_beits_grid(old, new):
    interpolate = pytest.importorskip("scipy.interpolate")
    heads = 3
    table = torch.randn((2 * old - 1) ** 2, heads)
    ours = interpolate_rel_pos_table(table, new, old, "reference")
    src, dst = 2 * old - 1, 2 * new - 1
    assert ours.shape == (dst * dst, heads)
    offsets = geometric_offsets(src, dst)
    targets = list(range(-(dst // 2), dst // 2 + 1))
    degree = min(3, src - 1)
    for h in range(heads):
        grid = table[:, h].view(src, src).double().numpy()
        spline = interpolate.RectBivariateSpline(offsets, offsets, grid, kx=degree, ky=degree, s=0)
        expected = torch.from_numpy(spline(targets, targets)).float().reshape(-1)
        torch.testing.assert_close(ours[:, h], expected, atol=1e-5, rtol=1e-5)


def test_the_spline_reproduces_cubics_and_the_source_values():
    nodes = torch.tensor(geometric_offsets(13, 23), dtype=torch.float64)
    targets = torch.linspace(-11, 11, 23, dtype=torch.float64)
    cubic = lambda x: 0.3 * x**3 - x**2 + 2 * x - 1  # noqa: E731
    weights = spline_matrix(nodes, targets)
    inside = targets.abs() <= nodes[-1]
    torch.testing.assert_close((weights @ cubic(nodes))[inside], cubic(targets)[inside])
    torch.testing.assert_close(spline_matrix(nodes, nodes), torch.eye(13, dtype=torch.float64))


def test_timm_table_interpolation_is_timms():
    table = torch.randn(13 * 13, 4)
    expected = resize_rel_pos_bias_table(table, (12, 12), (23 * 23, 4), old_window_size=(7, 7))
    torch.testing.assert_close(interpolate_rel_pos_table(table, 12, 7, "timm"), expected, rtol=0, atol=0)
    assert interpolate_rel_pos_table(table, 7, 7) is table


@pytest.mark.parametrize("interpolation, antialias", [("reference", False), ("timm", True)])
def test_vit_grid_resampling_equals_timms_and_keeps_the_class_token(interpolation, antialias):
    pos = torch.randn(1 + 14 * 14, 32)
    ours = resample_pos_embed(pos, (24, 24), interpolation=interpolation)
    expected = resample_abs_pos_embed(
        pos[None], [24, 24], [14, 14], num_prefix_tokens=1, antialias=antialias
    )[0]
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    assert torch.equal(ours[0], pos[0])


def test_timm_vit_resampling_is_open_clips_resize_pos_embed(tiny_model_cfg):
    from open_clip.model import resize_pos_embed

    model = CrossViewModel(tiny_model_cfg, load_pretrained=False)
    pos = model.vision.visual.positional_embedding.detach().clone()
    resize_vision(model, 48, interpolation="timm")
    state = {"visual.positional_embedding": pos}
    resize_pos_embed(state, type("M", (), {"visual": model.vision.visual})())
    torch.testing.assert_close(
        model.vision.visual.positional_embedding.detach(), state["visual.positional_embedding"]
    )


# --------------------------------------------------------------------------------------------- towers
def test_swin_resize_equals_timms_set_input_size(swin_cfg):
    """Same weights: our model resized 32 -> 48 px (window 4 -> 6, scaled with the image) against timm's own
    Swin resized by set_input_size; with the reference's tables, against timm's geometry holding those tables."""
    for interpolation in ("timm", "reference"):
        model = CrossViewModel(swin_cfg, load_pretrained=False).eval()
        timm_swin = SwinTransformer(**SWIN, num_classes=0).eval()
        timm_swin.load_state_dict(model.vision.visual.trunk.state_dict(), strict=False)
        before = _tables(model)
        resize_vision(model, 48, interpolation=interpolation)
        assert model.cfg.vision.image_size == 48
        assert model.cfg.vision.tower["image_size"] == 48 and model.cfg.vision.tower["window_size"] == 6
        timm_swin.set_input_size(img_size=(48, 48), window_size=6)
        blocks = [b for s in timm_swin.layers for b in s.blocks]
        if interpolation == "reference":
            for block, table in zip(blocks, before):
                with torch.no_grad():
                    block.attn.relative_position_bias_table.copy_(interpolate_rel_pos_table(table, 6, 4))
        for ours, theirs in zip(_tables(model), blocks):
            assert torch.equal(ours, theirs.attn.relative_position_bias_table.detach())
        images = _images(48)
        with torch.no_grad():
            tokens = model.vision(images)
            expected = timm_swin.forward_features(model.vision.normalize(images)).flatten(1, 2)
        assert tokens.shape == (2, 1 + 6 * 6, 64)  # the mean token, then stage 1's 6x6 tokens
        torch.testing.assert_close(tokens[:, 1:], expected, atol=1e-5, rtol=1e-4)


def test_an_explicit_window_and_a_tower_config_that_asks_for_it(swin_cfg):
    model = CrossViewModel(swin_cfg, load_pretrained=False)
    resize_vision(model, 32, window_size=0)  # 0 (FinetuneConfig's "not given"), at the same size: unchanged
    assert model.cfg.vision.tower["window_size"] == 4
    resize_vision(model, 48, window_size=3)
    trunk = model.vision.visual.trunk
    assert [s.blocks[0].attn.window_size for s in trunk.layers] == [(3, 3), (3, 3)]
    tower = VisionTower(
        {**swin_cfg.vision.tower, "image_size": 64, "window_size": 8}, 64, load_pretrained=False
    )
    table = tower.visual.trunk.layers[0].blocks[0].attn.relative_position_bias_table
    assert table.shape == (15 * 15, SWIN["num_heads"][0])
    assert tower(_images(64, 1)).shape == (1, 1 + 8 * 8, 64)


def test_sizes_and_windows_that_do_not_fit_are_refused_naming_them(swin_cfg, tiny_model_cfg):
    model = CrossViewModel(swin_cfg, load_pretrained=False)
    with pytest.raises(
        ConfigError, match=r"image_size=36 with window_size=4: 36 px is not a multiple of 8 px"
    ):
        resize_vision(model, 36)
    with pytest.raises(
        ConfigError, match=r"image_size=48 with window_size=5: stage 0 is 12x12 tokens"
    ) as err:
        resize_vision(model, 48, window_size=5)
    assert "windows that fit 48 px: " in str(
        err.value
    ) and "image sizes that fit window 5: 40, 80, 120, 160)" in str(err.value)
    assert model.cfg.vision.image_size == 32 and model.vision.tower_cfg["image_size"] == 32  # left unchanged
    vit = CrossViewModel(tiny_model_cfg, load_pretrained=False)
    with pytest.raises(ConfigError, match="36 is not a multiple of the ViT patch size 8"):
        resize_vision(vit, 36)
    with pytest.raises(ConfigError, match="only Swin towers have windows"):
        resize_vision(vit, 48, window_size=6)
    with pytest.raises(ConfigError, match="window_size'=0: must be a positive integer"):
        check_tower_fields({"timm_model_name": TINY_SWIN, "window_size": 0})
    with pytest.raises(ConfigError, match="only timm Swin towers have windows"):
        check_tower_fields({"width": 64, "window_size": 4})


# --------------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("tower", ["vit", "swin"])
def test_a_resized_model_saves_and_reloads_with_identical_outputs(tmp_path, tiny_model_cfg, swin_cfg, tower):
    cfg = swin_cfg if tower == "swin" else tiny_model_cfg
    model = CrossViewModel(cfg, load_pretrained=False).eval()
    model.save_pretrained(tmp_path / "at32")
    resize_vision(model, 48)
    model.save_pretrained(tmp_path / "at48")
    reloaded = CrossViewModel.from_pretrained(tmp_path / "at48").eval()
    assert reloaded.cfg.vision.image_size == 48
    # resizing at load time is the same as resizing after loading
    resized_on_load = CrossViewModel.from_pretrained(tmp_path / "at32", image_size=48).eval()
    images = _images(48)
    with torch.no_grad():
        expected = model.encode_image(images)
        for other in (reloaded, resized_on_load):
            got = other.encode_image(images)
            assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_cclm_load_at_another_image_size(tiny_model_dir):
    from PIL import Image

    engine = cclm.load(tiny_model_dir, device="cpu", dtype=torch.float32, image_size=48)
    assert engine.image_size == 48 and engine.model.cfg.vision.image_size == 48
    assert engine.model.vision.visual.positional_embedding.shape == (1 + 6 * 6, 64)
    picture = Image.new("RGB", (50, 70), (200, 30, 30))
    assert engine.image_tensor([picture]).shape == (1, 3, 48, 48)
    feats = engine.encode_images([picture, picture])
    assert feats.shape == (2, engine.model.cfg.embed_dim) and torch.isfinite(feats).all()
    reference = CrossViewModel.from_pretrained(tiny_model_dir)
    resize_vision(reference, 48)
    torch.testing.assert_close(
        engine.model.vision.visual.positional_embedding.detach(),
        reference.vision.visual.positional_embedding.detach(),
    )
    assert (
        cclm.load(tiny_model_dir, device="cpu", dtype=torch.float32).image_size == 32
    )  # unchanged by default


# ----------------------------------------------------------------------- pretrained weights at another size
def test_pretrained_vit_weights_of_their_own_size_load_into_a_tower_built_at_image_size(
    tiny_model_cfg, monkeypatch
):
    """An open_clip model resolved by name is built at ``model.vision.image_size`` (48 px here) while its
    pretrained state is at the weights' own size (32 px): the position grid is resampled on load as the
    reference's ``interpolate_pos_embed`` (bicubic, no antialiasing, class row kept) -- the same tower as one
    loaded at 32 px and then resized. Before: a size mismatch on ``positional_embedding``."""
    import open_clip

    import cclm.model.cross_view as cross_view

    native = dict(tiny_model_cfg.vision.tower)  # the "open_clip model": 32 px, patch 8
    torch.manual_seed(1)
    state = VisionTower(native, 64, load_pretrained=False).visual.state_dict()
    monkeypatch.setattr(
        cross_view, "resolve_open_clip_vision_cfg", lambda name, pretrained=None: (dict(native), 64)
    )
    monkeypatch.setattr(cross_view, "load_pretrained_visual_state", lambda name, pretrained: state)
    monkeypatch.setattr(open_clip, "create_model", None)  # nothing is downloaded or built by open_clip here
    tiny_model_cfg.vision.tower = {}
    tiny_model_cfg.vision.name, tiny_model_cfg.vision.pretrained = "tiny-vit", "local"
    tiny_model_cfg.vision.image_size = 48

    model = CrossViewModel(tiny_model_cfg, load_pretrained=True).eval()
    pos = model.vision.visual.positional_embedding.detach()
    grid = state["positional_embedding"][1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    assert pos.shape == (1 + 6 * 6, 64) and torch.equal(pos[0], state["positional_embedding"][0])
    torch.testing.assert_close(pos[1:], expected.permute(0, 2, 3, 1).reshape(36, 64))
    for name, value in state.items():  # everything else as loaded
        if name not in ("positional_embedding", "proj"):
            assert torch.equal(model.vision.visual.state_dict()[name], value), name

    tiny_model_cfg.vision.image_size = 32
    at_32 = CrossViewModel(tiny_model_cfg, load_pretrained=True).eval()
    resize_vision(at_32, 48)
    with torch.no_grad():
        assert torch.equal(model.vision(_images(48)), at_32.vision(_images(48)))


def test_a_timm_vit_state_of_another_size_is_fitted_to_the_tower(tiny_model_cfg, monkeypatch):
    """A timm ViT's ``trunk.pos_embed`` ([1, class + grid, C]) is resampled the same way (an open_clip timm tower,
    e.g. a SigLIP, at a size other than its weights')."""
    import cclm.model.cross_view as cross_view

    tower_cfg = {"timm_model_name": "vit_tiny_patch16_224", "timm_pool": "", "timm_proj": "none"}
    torch.manual_seed(1)
    native = VisionTower({**tower_cfg, "image_size": 32}, 64, load_pretrained=False).visual.state_dict()
    monkeypatch.setattr(cross_view, "load_pretrained_visual_state", lambda name, pretrained: native)
    tiny_model_cfg.vision.tower = {**tower_cfg, "image_size": 64}
    tiny_model_cfg.vision.name, tiny_model_cfg.vision.pretrained = "tiny-timm-vit", "local"
    tiny_model_cfg.vision.image_size = 64
    model = CrossViewModel(tiny_model_cfg, load_pretrained=True)
    loaded = model.vision.visual.state_dict()
    old = native["trunk.pos_embed"]
    assert old.shape == (1, 1 + 2 * 2, 192) and loaded["trunk.pos_embed"].shape == (1, 1 + 4 * 4, 192)
    torch.testing.assert_close(loaded["trunk.pos_embed"], resample_pos_embed(old, (4, 4)), rtol=0, atol=0)
    assert all(torch.equal(loaded[k], native[k]) for k in loaded if k != "trunk.pos_embed")
