"""Run a vision tower at another input size: Swin windows and relative-position tables, ViT position grids.

The CCLM reference pretrains at 224 px and fine-tunes at 384 px: its Swin-B goes from 7x7 to 12x12 windows
(``configs/config_swinB_384.json``) and every ``relative_position_bias_table`` is interpolated from 13x13 to
23x23 relative offsets when the pretrained weights are loaded (``models/xvlm.py`` ``load_pretrained``, with its
``interpolate_relative_pos_embed``); its ViTs resample their position grid bicubically, class token kept
(``interpolate_pos_embed``). :func:`resize_vision` does the same to a :class:`~cclm.model.CrossViewModel` in
place and records the new size in ``model.cfg.vision`` (``image_size``, and ``tower.image_size`` /
``tower.window_size``), so that ``save_pretrained`` / ``from_pretrained`` rebuild the resized model offline.

Two interpolations (``interpolation=``):

``reference`` (default)
    as the reference fine-tuned. Swin tables: BEiT's scheme -- the source offsets are laid out on a geometric
    progression that spans the new window, and a bicubic interpolating spline (scipy's ``interp2d(kind="cubic")``,
    i.e. FITPACK with ``s=0``: not-a-knot splines, points outside the source range clamped to it) is evaluated at
    the integer offsets of the new window; computed here in float64 with torch, equal to scipy's
    ``RectBivariateSpline`` on that grid. ViT grids: ``F.interpolate(mode="bicubic", align_corners=False)``
    without antialiasing.
``timm``
    timm's own resizing: Swin tables by ``timm.layers.resize_rel_pos_bias_table`` (the same geometric grid,
    linear interpolation), ViT grids by ``timm.layers.resample_abs_pos_embed`` (bicubic with antialiasing, as
    open_clip's ``resize_pos_embed`` too).

The Swin geometry is the reference's: no padding. Every stage's token grid must be tiled by the window (or be no
larger than it: the stage is then one window, without shift), so the image size must be a multiple of
``patch * 2**(stages - 1)`` (32 px for Swin-B) and the window must divide each stage's grid; anything else is a
:class:`~cclm.config.ConfigError` naming the image size, the window and the stage, with sizes that fit.
Without ``window_size`` the window is scaled with the image (timm's rule ``window * new_grid // old_grid``):
7 at 224 px becomes 12 at 384 px and 15 at 480 px, the reference's pairs.

Pretrained weights are fitted on load the same way: a model built at a ``model.vision.image_size`` other than its
pretrained ViT's gets the loaded position grid resampled to its own (:func:`fit_pretrained_state`, the reference's
``interpolate_pos_embed`` when it loads a ViT checkpoint).

Parameters are replaced, not resized in place: resize before building an optimizer over the model.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from cclm.config import ConfigError

if TYPE_CHECKING:
    from cclm.model.cross_view import CrossViewModel
    from cclm.model.vision import VisionTower

INTERPOLATIONS = ("reference", "timm")


# ------------------------------------------------------------------------------------------ the public entry
def resize_vision(
    model: CrossViewModel,
    image_size: int,
    window_size: int | None = None,
    *,
    interpolation: str = "reference",
) -> None:
    """Make ``model``'s vision tower take ``image_size`` px images, in place.

    Swin (a timm ``SwinTransformer`` tower): ``window_size`` is the new window (None or 0: scaled with the image,
    see the module doc, so unchanged at the same size); windows, shifts, ``relative_position_index`` and attention masks are recomputed and the
    relative-position tables interpolated. ViT (open_clip's): the patch-position grid is resampled, the class
    token's position kept; ``window_size`` must be None. Other timm towers are resized by their own
    ``set_input_size`` (convolutional ones need nothing). The new size is recorded in ``model.cfg.vision``.
    Raises :class:`~cclm.config.ConfigError` when the size does not fit the tower."""
    resize_tower(model.vision, image_size, window_size, interpolation=interpolation)
    tower = dict(model.cfg.vision.tower)
    for key in ("image_size", "window_size"):
        if key in model.vision.tower_cfg:
            tower[key] = model.vision.tower_cfg[key]
    model.cfg.vision.tower = tower
    model.cfg.vision.image_size = int(image_size)


def resize_tower(
    tower: VisionTower,
    image_size: int,
    window_size: int | None = None,
    *,
    interpolation: str = "reference",
) -> None:
    """:func:`resize_vision` on a :class:`~cclm.model.vision.VisionTower` alone (updates ``tower.tower_cfg``)."""
    image_size = _positive_int(image_size, "image_size")
    if window_size is not None and window_size != 0:  # 0, as FinetuneConfig.window_size: not given
        window_size = _positive_int(window_size, "window_size")
    else:
        window_size = None
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    visual = tower.visual
    if tower.is_timm:
        trunk = visual.trunk
        if is_swin(trunk):
            window = resize_swin(trunk, image_size, window_size, interpolation=interpolation)
            tower.tower_cfg["window_size"] = window
        else:
            if window_size is not None:
                raise ConfigError(
                    f"window_size={window_size}: the timm tower {type(trunk).__name__} has no Swin windows"
                )
            if timm_trunk_image_size(trunk) not in (None, image_size):
                if not hasattr(trunk, "set_input_size"):
                    raise ConfigError(f"the timm tower {type(trunk).__name__} cannot change its input size")
                trunk.set_input_size(img_size=(image_size, image_size))
        visual.image_size = (image_size, image_size)
    elif hasattr(visual, "positional_embedding") and hasattr(visual, "grid_size"):
        if window_size is not None:
            raise ConfigError(f"window_size={window_size}: only Swin towers have windows, this one is a ViT")
        resize_open_clip_vit(
            visual,
            image_size,
            sincos=tower.tower_cfg.get("pos_embed_type") == "sin_cos_2d",
            interpolation=interpolation,
        )
    else:
        raise ConfigError(
            f"cannot resize a {type(visual).__name__} vision tower (open_clip ViTs and timm only)"
        )
    tower.tower_cfg["image_size"] = image_size


def _positive_int(value: Any, name: str) -> int:
    whole = isinstance(value, int) or isinstance(value, float) and value.is_integer()
    if isinstance(value, bool) or not whole or int(value) <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def timm_trunk_image_size(trunk: nn.Module) -> int | None:
    size = getattr(getattr(trunk, "patch_embed", None), "img_size", None)
    if size is None:
        return None
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    return int(size[0]) if size[0] == size[1] else None


# ------------------------------------------------------------------------------------------ ViT position grids
def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    prefix_tokens: int = 1,
    interpolation: str = "reference",
) -> torch.Tensor:
    """``[prefix + H*W, C]`` (or with a leading batch dim of 1) -> ``[prefix + H'*W', C]``: the prefix (class
    token) rows kept, the grid resampled bicubically (``reference``: no antialiasing, as the reference's
    ``interpolate_pos_embed``; ``timm``: with it, as ``timm.layers.resample_abs_pos_embed``)."""
    batched = pos_embed.ndim == 3
    pos = pos_embed if batched else pos_embed.unsqueeze(0)
    n_grid = pos.shape[1] - prefix_tokens
    if old_grid is None:
        side = math.isqrt(n_grid)
        if side * side != n_grid:
            raise ValueError(f"{n_grid} position rows are not a square grid; give old_grid")
        old_grid = (side, side)
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    prefix, grid = pos[:, :prefix_tokens], pos[:, prefix_tokens:]
    width = grid.shape[-1]
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], width).permute(0, 3, 1, 2)
    grid = F.interpolate(
        grid, size=tuple(new_grid), mode="bicubic", align_corners=False, antialias=interpolation == "timm"
    )
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], width).to(pos.dtype)
    out = torch.cat([prefix, grid], dim=1)
    return out if batched else out.squeeze(0)


def fit_pretrained_state(
    tower: VisionTower, state: dict[str, torch.Tensor], interpolation: str = "reference"
) -> dict[str, torch.Tensor]:
    """A pretrained visual state dict made at its weights' own input size, fitted to ``tower`` as built (at the
    configured ``image_size``), as the reference does when it loads a ViT (``models/xvlm.py``
    ``interpolate_pos_embed``): the position grid of an open_clip ViT (``positional_embedding``) or of a timm
    ViT (``trunk.pos_embed``) resampled to the tower's grid (:func:`resample_pos_embed`, prefix rows kept); a
    fixed sin-cos table is the tower's own. Returns a new dict; what already fits is passed through, and
    anything else that does not fit is left to ``load_state_dict`` to name."""
    from cclm.model.vision import timm_prefix_tokens

    state = dict(state)
    visual = tower.visual
    if tower.is_timm:
        trunk, key = visual.trunk, "trunk.pos_embed"
        own = getattr(trunk, "pos_embed", None)
        if key in state and isinstance(own, torch.Tensor) and state[key].shape != own.shape:
            prefix = 0 if getattr(trunk, "no_embed_class", False) else timm_prefix_tokens(trunk)[0]
            grid = tuple(int(n) for n in trunk.patch_embed.grid_size)
            with torch.no_grad():
                state[key] = resample_pos_embed(state[key], grid, None, prefix, interpolation)
        return state
    key = "positional_embedding"
    own = getattr(visual, key, None)
    if key in state and isinstance(own, torch.Tensor) and state[key].shape != own.shape:
        if tower.tower_cfg.get("pos_embed_type") == "sin_cos_2d":
            state[key] = own.detach().clone()
        else:
            grid = tuple(int(n) for n in visual.grid_size)
            with torch.no_grad():
                state[key] = resample_pos_embed(state[key], grid, None, 1, interpolation)
    return state


def resize_open_clip_vit(
    visual: nn.Module, image_size: int, sincos: bool = False, interpolation: str = "reference"
) -> None:
    """open_clip ``VisionTransformer`` at ``image_size``: ``positional_embedding`` resampled (a fixed sin-cos
    one recomputed), ``image_size`` / ``grid_size`` updated."""
    patch = tuple(visual.patch_size)
    if image_size % patch[0] or image_size % patch[1]:
        raise ConfigError(
            f"image_size {image_size} is not a multiple of the ViT patch size {patch[0]}: the patch grid would "
            f"drop the last {image_size % patch[0]} px (e.g. {_nearest_multiples(image_size, patch[0])})"
        )
    new_grid = (image_size // patch[0], image_size // patch[1])
    old = visual.positional_embedding
    if new_grid != tuple(visual.grid_size):
        if sincos:
            from open_clip.pos_embed import get_2d_sincos_pos_embed

            table = torch.from_numpy(get_2d_sincos_pos_embed(old.shape[-1], new_grid[0], cls_token=True))
            new = table.to(device=old.device, dtype=old.dtype)
        else:
            with torch.no_grad():
                new = resample_pos_embed(old.detach(), new_grid, tuple(visual.grid_size), 1, interpolation)
        visual.positional_embedding = nn.Parameter(new.contiguous(), requires_grad=old.requires_grad)
    visual.image_size = (image_size, image_size)
    visual.grid_size = new_grid


# ------------------------------------------------------------------------------------------ Swin tables
def interpolate_rel_pos_table(
    table: torch.Tensor,
    new_window: int,
    old_window: int | None = None,
    interpolation: str = "reference",
) -> torch.Tensor:
    """A Swin ``relative_position_bias_table`` ``[(2*old-1)**2, heads]`` -> ``[(2*new-1)**2, heads]`` (see the
    module doc for the two interpolations). ``old_window`` defaults to the one the row count implies."""
    rows, heads = table.shape
    if old_window is None:
        old_window = window_of_table_rows(rows)
    src, dst = 2 * old_window - 1, 2 * new_window - 1
    if src * src != rows:
        raise ValueError(f"a table for window {old_window} has {src * src} rows, this one {rows}")
    if src == dst:
        return table
    if interpolation == "timm":
        from timm.layers import resize_rel_pos_bias_table

        return resize_rel_pos_bias_table(
            table, (new_window, new_window), (dst * dst, heads), old_window_size=(old_window, old_window)
        )
    if interpolation != "reference":
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if table.is_meta:
        return table.new_empty(dst * dst, heads)
    out = _table_weights(src, dst) @ table.detach().to("cpu", torch.float64)
    return out.to(device=table.device, dtype=table.dtype)


@functools.lru_cache(maxsize=16)
def _table_weights(src: int, dst: int) -> torch.Tensor:
    """``[dst*dst, src*src]``: the reference's table interpolation as one linear map. Row ``r * src + c`` of a
    table is vertical offset r, horizontal offset c, so ``kron(W, W)`` applies the 1-D spline map W along both."""
    offsets = torch.tensor(geometric_offsets(src, dst), dtype=torch.float64)
    targets = torch.arange(-(dst // 2), dst // 2 + 1, dtype=torch.float64)
    weights = spline_matrix(offsets, targets)  # [dst, src]
    return torch.kron(weights, weights)


def window_of_table_rows(rows: int) -> int:
    """The square window whose relative-position table has ``rows`` rows (``(2*window-1)**2``)."""
    side = math.isqrt(rows)
    if side * side != rows or side % 2 == 0:
        raise ValueError(f"{rows} rows is no square window's relative-position table ((2*window-1)**2 rows)")
    return (side + 1) // 2


def geometric_offsets(src: int, dst: int) -> list[float]:
    """Where BEiT's scheme places the ``src`` source offsets (symmetric, 0 in the middle): unit first step, each
    next step ``q`` times the last, ``q`` chosen by bisection on [1.01, 1.5] so that the outermost offset reaches
    the new window's ``dst // 2``."""

    def reach(q: float, n: int) -> float:  # 1 + q + ... + q**(n-1)
        return (1.0 - q**n) / (1.0 - q)

    low, high = 1.01, 1.5
    while high - low > 1e-6:
        q = (low + high) / 2.0
        if reach(q, src // 2) > dst // 2:
            high = q
        else:
            low = q
    steps, position = [], 1.0
    for i in range(src // 2):
        steps.append(position)
        position += q ** (i + 1)
    return [-s for s in reversed(steps)] + [0.0] + steps


def spline_matrix(nodes: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[len(targets), len(nodes)]``: the linear map from values at ``nodes`` (increasing) to the not-a-knot
    cubic interpolating spline evaluated at ``targets`` (clamped into the node range, as FITPACK evaluates).
    Up to 4 nodes the spline is the one polynomial through them."""
    x, t = nodes.double(), targets.double().clamp(float(nodes[0]), float(nodes[-1]))
    n = x.numel()
    if n <= 4:
        powers = torch.arange(n, dtype=torch.float64)
        return (t[:, None] ** powers) @ torch.linalg.inv(x[:, None] ** powers)
    h = x[1:] - x[:-1]
    # second derivatives m = solve(lhs, rhs @ values): continuity of the first derivative inside, and a
    # continuous third derivative at the second and the second-to-last node (not-a-knot)
    lhs = torch.zeros(n, n, dtype=torch.float64)
    rhs = torch.zeros(n, n, dtype=torch.float64)
    lhs[0, :3] = torch.stack([-h[1], h[0] + h[1], -h[0]])
    lhs[-1, -3:] = torch.stack([-h[-1], h[-2] + h[-1], -h[-2]])
    for i in range(1, n - 1):
        lhs[i, i - 1 : i + 2] = torch.stack([h[i - 1], 2 * (h[i - 1] + h[i]), h[i]])
        rhs[i, i - 1 : i + 2] = 6 * torch.stack([1 / h[i - 1], -1 / h[i - 1] - 1 / h[i], 1 / h[i]])
    second = torch.linalg.solve(lhs, rhs)
    j = (torch.searchsorted(x, t, right=True) - 1).clamp(0, n - 2)
    hj, a, b = h[j], x[j + 1] - t, t - x[j]
    eye = torch.eye(n, dtype=torch.float64)
    return (
        eye[j] * (a / hj)[:, None]
        + eye[j + 1] * (b / hj)[:, None]
        + second[j] * (a**3 / (6 * hj) - hj * a / 6)[:, None]
        + second[j + 1] * (b**3 / (6 * hj) - hj * b / 6)[:, None]
    )


# ------------------------------------------------------------------------------------------ Swin geometry
def is_swin(trunk: nn.Module) -> bool:
    from timm.models.swin_transformer import SwinTransformer

    return isinstance(trunk, SwinTransformer)


def swin_geometry(trunk: nn.Module) -> dict[str, Any]:
    """image_size, patch_size, stages, window (stage 0's), per-stage windows as built and heads of a timm Swin."""
    patch = tuple(trunk.patch_embed.patch_size)
    stages = list(trunk.layers)
    return {
        "image_size": timm_trunk_image_size(trunk),
        "patch_size": int(patch[0]),
        "stages": len(stages),
        "window": int(stages[0].blocks[0].attn.window_size[0]),
        "stage_windows": [int(s.blocks[0].attn.window_size[0]) for s in stages],
        "heads": [int(s.blocks[0].attn.num_heads) for s in stages],
    }


def swin_stage_grids(image_size: int, patch_size: int, stages: int) -> list[int]:
    grid = image_size // patch_size
    return [grid >> i for i in range(stages)]


def swin_fit_problem(image_size: int, window: int, patch_size: int, stages: int) -> str | None:
    """Why a Swin with ``stages`` stages and ``patch_size`` cannot run the reference's window partition at
    ``image_size`` with ``window`` (None when it can)."""
    unit = patch_size * 2 ** (stages - 1)
    if image_size % unit:
        return (
            f"{image_size} px is not a multiple of {unit} px (patch {patch_size}, halved {stages - 1} times "
            f"by patch merging)"
        )
    for stage, grid in enumerate(swin_stage_grids(image_size, patch_size, stages)):
        if grid > window and grid % window:
            return (
                f"stage {stage} is {grid}x{grid} tokens at {image_size} px, which {window}x{window} windows do not "
                f"tile ({grid} % {window} = {grid % window})"
            )
    return None


def check_swin_fit(image_size: int, window: int, patch_size: int, stages: int, what: str = "Swin") -> None:
    """:class:`~cclm.config.ConfigError` naming the image size, the window and the failing stage, with windows
    that fit the size and sizes that fit the window."""
    problem = swin_fit_problem(image_size, window, patch_size, stages)
    if problem is None:
        return
    unit = patch_size * 2 ** (stages - 1)
    fits_size = [
        w
        for w in range(1, image_size // patch_size + 1)
        if swin_fit_problem(image_size, w, patch_size, stages) is None
    ]
    fits_size = sorted(fits_size, key=lambda w: (abs(w - window), w))[:5]
    sizes = [
        s
        for s in range(unit, 4 * max(image_size, unit) + 1, unit)
        if s // patch_size >= window and swin_fit_problem(s, window, patch_size, stages) is None
    ]
    sizes = sorted(sorted(sizes, key=lambda s: (abs(s - image_size), s))[:4])
    hints = []
    if fits_size:
        hints.append(f"windows that fit {image_size} px: {', '.join(map(str, sorted(fits_size)))}")
    if sizes:
        hints.append(f"image sizes that fit window {window}: {', '.join(map(str, sizes))}")
    hint = f" ({'; '.join(hints)})" if hints else ""
    raise ConfigError(
        f"{what} at image_size={image_size} with window_size={window}: {problem}; the reference's Swin needs "
        f"every stage's grid divisible by the window or no larger than it{hint}"
    )


def resize_swin(
    trunk: nn.Module, image_size: int, window_size: int | None = None, *, interpolation: str = "reference"
) -> int:
    """A timm ``SwinTransformer`` at ``image_size`` with ``window_size`` (None: scaled with the image), in place;
    returns the window. Uses timm's ``set_input_size`` for the geometry (windows, shifts, position index,
    attention masks) and, for ``reference``, replaces its interpolated tables with the reference's."""
    geo = swin_geometry(trunk)
    old_size = geo["image_size"]
    if old_size is None:
        raise ConfigError(f"the Swin tower has a non-square input size {trunk.patch_embed.img_size}")
    if window_size is None:
        old_grid, new_grid = old_size // geo["patch_size"], image_size // geo["patch_size"]
        window_size = (
            geo["window"] if image_size == old_size else max(1, geo["window"] * new_grid // old_grid)
        )
    check_swin_fit(image_size, window_size, geo["patch_size"], geo["stages"])
    expected = [min(window_size, g) for g in swin_stage_grids(image_size, geo["patch_size"], geo["stages"])]
    if image_size == old_size and geo["stage_windows"] == expected:
        return window_size
    if "window_size" not in inspect.signature(trunk.set_input_size).parameters:
        raise ConfigError(
            "this timm version cannot change a Swin's window (SwinTransformer.set_input_size); upgrade timm"
        )
    import timm.models.swin_transformer as timm_swin

    own_tables = interpolation == "reference" and hasattr(timm_swin, "get_relative_position_index")
    if own_tables:
        # The reference's tables, and the attention windows and position index they index, set here: timm's
        # set_input_size then finds each attention at its window and leaves its table alone (its own
        # interpolation would only be overwritten, and takes seconds for Swin-B).
        for stage, window in zip(trunk.layers, expected):
            for block in stage.blocks:
                attn = block.attn
                if tuple(attn.window_size) == (window, window):
                    continue
                old = attn.relative_position_bias_table
                with torch.no_grad():
                    table = interpolate_rel_pos_table(old.detach(), window, int(attn.window_size[0]))
                attn.relative_position_bias_table = nn.Parameter(table, requires_grad=old.requires_grad)
                attn.window_size = (window, window)
                attn.window_area = window * window
                index = timm_swin.get_relative_position_index(window, window, device=old.device)
                attn.register_buffer("relative_position_index", index, persistent=False)
        trunk.set_input_size(img_size=(image_size, image_size), window_size=window_size)
    else:
        attentions = [m for m in trunk.modules() if hasattr(m, "relative_position_bias_table")]
        before = [
            (int(m.window_size[0]), m.relative_position_bias_table.detach().clone()) for m in attentions
        ]
        # timm's table interpolator warns about tensor layouts in torch >= 2.8
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module=r"timm\.layers\.interpolate")
            trunk.set_input_size(img_size=(image_size, image_size), window_size=window_size)
        if interpolation == "reference":  # a timm without get_relative_position_index: replace its tables
            for module, (old_window, table) in zip(attentions, before):
                new_window = int(module.window_size[0])
                if new_window != old_window:
                    with torch.no_grad():
                        module.relative_position_bias_table.copy_(
                            interpolate_rel_pos_table(table, new_window, old_window, "reference")
                        )
    got = [int(s.blocks[0].attn.window_size[0]) for s in trunk.layers]
    if got != expected:  # a timm whose window rules differ from the reference's
        raise ConfigError(
            f"timm set the Swin stage windows to {got}, the reference's geometry needs {expected}"
        )
    return window_size


def _nearest_multiples(value: int, unit: int) -> str:
    low = max(unit, value // unit * unit)
    return f"{low} or {low + unit}"
