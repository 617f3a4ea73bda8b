"""``cclm convert-reference CKPT OUT``: import a checkpoint released with the CCLM paper into a model folder.

The released checkpoints are X-VLM-style state dicts (layout learned from zengyan-97/CCLM ``models/xvlm.py``,
``models/xbert.py`` and ``models/swin_transformer.py``; nothing is copied from there):

    vision_encoder.*                 Swin-B in Microsoft's original layout (patch merging at the END of stage i)
    text_encoder.bert.*              12 BERT-named layers taken from xlm-roberta-large (pretraining checkpoints;
      (or text_encoder.*)            fine-tuned ones drop ``bert.``); layers from ``fusion_layer`` on carry
                                     ``crossattention.*`` whose keys/values read the image tokens
    text_encoder.cls.predictions.*   MLM head (pretraining checkpoints only)
    vision_proj, text_proj, temp     ITC projections and temperature
    itm_head.{0,1,3}                 Linear, LayerNorm, GELU, Linear
    bbox_head.{0,1,3}                box head (4M pretraining checkpoints): Linear, LayerNorm, GELU, Linear

Our side is timm's Swin (through open_clip's timm tower; patch merging at the START of stage i+1, otherwise the
same names and the same channel order), HF ``XLMRobertaLayer`` text/fusion stacks, ``MatchingHead`` and
``XLMRobertaLMHead`` and ``BoxHead`` (built, with ``objectives.bbox``, when the checkpoint has a ``bbox_head``:
grounding, ``cclm ground``). The load is strict: every source tensor is consumed or dropped for a stated reason
(derived buffers, tied copies that are checked equal), every tensor of ours is filled, and a report says so.

Position ids: the reference numbers text positions 0, 1, 2, ... (BERT style) although the table comes from
XLM-R, which numbers them from ``padding_idx + 1``. With ``--position-ids reference`` (default) the table is
rolled by ``padding_idx + 1`` rows so that our XLM-R-style ids read exactly the rows the released model was
trained with (texts shorter than the table minus 2 tokens give the reference's outputs); ``xlmr`` copies the
table unchanged.

Text normalisation: the reference lower-cases, turns punctuation into spaces and keeps the first ``max_words``
words of every text it tokenises (``dataset/utils.py`` ``pre_caption``; ``max_words: 40`` in its pretraining
configs), so the converted model's config carries ``text.normalize: pre_caption`` and ``text.max_words: 40``, and
``cclm.load``, evaluation, search and fine-tuning apply it. ``--max-words`` sets another cut (0 keeps every word),
``--normalize none`` turns it off.

Layers: the converted encoder has exactly the checkpoint's layers (``num_hidden_layers`` = its layer count), and
``text.text_layers`` / ``text.fusion_layers`` are set to the layers before / from the first one with
cross-attention (12 layers with cross-attention from layer 6: [0..5] and [6..11]), whatever the template says.
These index the converted encoder, not xlm-roberta-large: the reference picked its xlm-roberta-large layers
before pretraining, and the checkpoint holds the result as layers 0..N-1.

Resolution: the Swin window of the checkpoint is read from its ``relative_position_bias_table`` rows
(``(2*window-1)**2``: 169 rows = window 7, the 224 px pretraining; 529 rows = window 12, the 384 px fine-tuned
checkpoints) and its image size from the shifted blocks' ``attn_mask`` buffers (windows per stage); without
those buffers ``--image-size`` gives it, else it is inferred by scaling the config's size with the window
(224 px at window 7 -> 384 px at window 12). The target is built at that window and size (the config's timm Swin
set to it, :mod:`cclm.model.resize`) and a size the window does not tile is refused naming both. An
``--image-size`` that differs from the one the masks prove converts at the checkpoint's own size and then resizes
(tables interpolated as the reference does when it fine-tunes at another resolution).

Heads: a Swin's heads per stage are the tables' last dimension and must equal the target tower's. Text heads
cannot be read from shapes: ``--text-heads`` is checked against ``text.encoder.num_attention_heads`` of the config
(a mismatch is refused); without either, hidden / 64 (XLM-R) is assumed; the report says which.

Widths: the reference's cross-attention reads the vision tokens at the vision width (its key/value weights are
``[hidden, vision_width]``). A narrower vision tower converts exactly: ``image_to_fusion`` becomes the identity
into the first ``vision_width`` channels and the key/value weights get zero columns for the rest. A vision tower
wider than the text is refused (one shared projection cannot reproduce per-layer keys/values).

CLIP ViT (``use_clip_vit``, ``models/clip_vit.py``: OpenAI CLIP's vision transformer in HF naming) maps onto
open_clip's ViT: q/k/v projections concatenated into ``in_proj``, ``pre_layrnorm``/``post_layernorm`` into
``ln_pre``/``ln_post``; the tower (width, layers, patch, grid, MLP) is read from the shapes, QuickGELU activations
(``--vision-act``) and ``--vision-heads`` (default width / 64) from the arguments. The DeiT ViT of
``models/vit.py`` and other vision layouts (X2-VLM's BEiT) are refused naming the layout.

Checkpoints are read with ``torch.load(weights_only=True)`` or safetensors: never with unrestricted pickle.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cclm.config import CONFIG_ROOT, ConfigError, ModelConfig, TextNormalize, load_config
from cclm.errors import UserError
from cclm.model.resize import check_swin_fit, resize_vision, swin_geometry, window_of_table_rows

DEFAULT_CONFIG = CONFIG_ROOT / "model" / "base_swin.yaml"
DEFAULT_TOKENIZER = "xlm-roberta-large"
# The reference's text normalisation (dataset/utils.py pre_caption) and its word cut (max_words: 40 in the
# pretraining configs Pretrain_3m/4m.yaml).
REFERENCE_NORMALIZE = TextNormalize.pre_caption
REFERENCE_MAX_WORDS = 40
# XLM-R fields that shapes cannot tell; the shape-derived ones (sizes, layer count) are read from the checkpoint.
XLMR_DEFAULTS: dict[str, Any] = {
    "layer_norm_eps": 1e-5,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
}
HEAD_DIM = 64  # XLM-R base/large and CLIP ViTs: width / heads; --text-heads / --vision-heads otherwise
VISION_ACTS = ("quick_gelu", "gelu")

DROPPED_REASONS = {
    "swin_buffer": "Swin relative_position_index / attn_mask buffers; timm recomputes them",
    "position_ids": "position_ids buffer; recomputed from the input ids",
    "tied_decoder_weight": "MLM decoder weight; tied to the word embeddings (checked equal)",
    "tied_decoder_bias": "MLM decoder bias; the same tensor as cls.predictions.bias (checked equal)",
    "pooler": "BERT pooler; CCLM builds its encoder without one and never reads it",
    "vit_position_ids": "CLIP ViT position_ids buffer; positions are the token order",
}


class ConversionError(UserError, ValueError):
    """The checkpoint cannot be converted; the message says which keys or shapes are wrong (a user error: exit
    status 2, as every command's)."""


# ------------------------------------------------------------------------------------------------- reading
def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint file (``.th``/``.pth``/``.pt``/``.bin`` via ``torch.load(weights_only=True)``,
    or ``.safetensors``), unwrapped from ``{"model": ...}`` / ``{"state_dict": ...}`` and a DDP ``module.``."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ConversionError(f"cannot read {path} as safetensors: {err}") from err
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (
            Exception
        ) as err:  # torch raises UnpicklingError, RuntimeError or EOFError depending on the damage
            raise ConversionError(
                f"cannot read {path} as a PyTorch checkpoint with weights_only=True ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}). It is corrupt, not a checkpoint, or holds "
                "arbitrary Python objects, which are never unpickled here; re-save its state dict with "
                "torch.save(state_dict) or as safetensors."
            ) from err
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state:
        raise ConversionError(f"{path} holds no state dict (found {type(state).__name__})")
    tensors = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{path}: entry '{key}' is a {type(value).__name__}, not a tensor")
        tensors[key[len("module.") :] if key.startswith("module.") else key] = value
    return tensors


# ------------------------------------------------------------------------------------------------- layout
_SWIN_TABLE = re.compile(r"vision_encoder\.layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table")
_SWIN_MASK = re.compile(r"vision_encoder\.layers\.(\d+)\.blocks\.(\d+)\.attn_mask")
_CLIP_LAYER = re.compile(r"vision_encoder\.encoder\.layers\.(\d+)\.")


@dataclass
class SwinSource:
    """What the checkpoint's shapes say about its Swin (Microsoft layout: stage i's blocks run at grid / 2**i)."""

    patch_size: int
    width: int  # channels of the last stage (the tokens the fusion layers read)
    windows: list[int]  # per stage, as built (a stage no larger than the window is one window)
    heads: list[int]  # per stage: the tables' last dimension
    image_size: int | None  # proven by the shifted blocks' attention masks; None without them
    kind: str = "swin"

    @property
    def window(self) -> int:
        return self.windows[0]

    @classmethod
    def detect(cls, state: dict[str, torch.Tensor]) -> SwinSource:
        stages: dict[int, set[tuple[int, int]]] = defaultdict(set)
        for key, value in state.items():
            if m := _SWIN_TABLE.fullmatch(key):
                if value.ndim != 2:
                    raise ConversionError(
                        f"'{key}' has shape {tuple(value.shape)}, expected [(2*window-1)**2, heads]"
                    )
                stages[int(m.group(1))].add((int(value.shape[0]), int(value.shape[1])))
        if sorted(stages) != list(range(len(stages))):
            raise ConversionError(f"Swin stages {sorted(stages)} are not 0..N-1")
        windows, heads = [], []
        for stage in range(len(stages)):
            if len(stages[stage]) != 1:
                raise ConversionError(
                    f"Swin stage {stage}: its blocks' relative_position_bias_table shapes differ: {sorted(stages[stage])}"
                )
            rows, n_heads = next(iter(stages[stage]))
            try:
                windows.append(window_of_table_rows(rows))
            except ValueError as err:
                raise ConversionError(f"Swin stage {stage}: {err}") from None
            heads.append(n_heads)
        patch = state.get("vision_encoder.patch_embed.proj.weight")
        norm = state.get("vision_encoder.norm.weight")
        if patch is None or norm is None:
            raise ConversionError(
                "Swin vision encoder without 'vision_encoder.patch_embed.proj.weight' / 'norm.weight'"
            )
        patch_size = int(patch.shape[-1])
        sizes = {}
        for key, value in state.items():
            if m := _SWIN_MASK.fullmatch(key):
                stage = int(m.group(1))
                side = math.isqrt(int(value.shape[0]))
                if value.ndim != 3 or side * side != value.shape[0] or stage >= len(windows):
                    raise ConversionError(f"'{key}' has shape {tuple(value.shape)}, not [windows, w*w, w*w]")
                sizes[key] = windows[stage] * side * 2**stage * patch_size
        if len(set(sizes.values())) > 1:
            raise ConversionError(f"the Swin attention masks disagree on the image size: {sizes}")
        image_size = next(iter(sizes.values())) if sizes else None
        return cls(patch_size, int(norm.shape[0]), windows, heads, image_size)


@dataclass
class ClipVitSource:
    """The reference's CLIP ViT (models/clip_vit.py), read from its shapes."""

    patch_size: int
    width: int
    layers: int
    grid: int
    intermediate: int
    kind: str = "clip_vit"

    @property
    def image_size(self) -> int:
        return self.grid * self.patch_size

    @classmethod
    def detect(cls, state: dict[str, torch.Tensor]) -> ClipVitSource:
        p = "vision_encoder."
        needed = [f"{p}patch_embed.weight", f"{p}pos_embed.weight", f"{p}encoder.layers.0.mlp.fc1.weight"]
        missing = [k for k in needed if k not in state]
        if missing:
            raise ConversionError(f"CLIP ViT vision encoder without {missing}")
        patch = state[f"{p}patch_embed.weight"]
        rows, width = state[f"{p}pos_embed.weight"].shape
        grid = math.isqrt(int(rows) - 1)
        if grid * grid != rows - 1:
            raise ConversionError(f"CLIP ViT pos_embed has {rows} rows: not a class token plus a square grid")
        layers = {int(m.group(1)) for k in state if (m := _CLIP_LAYER.match(k))}
        if layers != set(range(len(layers))):
            raise ConversionError(f"CLIP ViT layers {sorted(layers)} are not 0..N-1")
        inter = int(state[f"{p}encoder.layers.0.mlp.fc1.weight"].shape[0])
        return cls(int(patch.shape[-1]), int(width), len(layers), grid, inter)


def detect_vision(state: dict[str, torch.Tensor]) -> SwinSource | ClipVitSource:
    """The vision encoder's layout: the reference's Swin or its CLIP ViT; anything else is refused by name."""
    if any(_SWIN_TABLE.fullmatch(k) for k in state):
        return SwinSource.detect(state)
    if "vision_encoder.pos_embed.weight" in state and any(".self_attn.q_proj." in k for k in state):
        return ClipVitSource.detect(state)
    keys = sorted(k for k in state if k.startswith("vision_encoder."))
    if "vision_encoder.pos_embed" in state or any(k.startswith("vision_encoder.blocks.") for k in keys):
        what = (
            "a DeiT/BEiT-style ViT (models/vit.py, or X2-VLM's BEiT): only the reference's Swin "
            "(use_swin) and CLIP ViT (use_clip_vit) encoders are supported"
        )
    else:
        what = "neither the reference's Swin (use_swin) nor its CLIP ViT (use_clip_vit)"
    raise ConversionError(f"the vision encoder is {what}; its keys: {_first(keys, 8)}")


@dataclass
class SourceLayout:
    text_prefix: str  # "text_encoder.bert." or "text_encoder."
    num_layers: int
    fusion_start: int  # first layer with cross-attention
    has_mlm_head: bool
    vision: SwinSource | ClipVitSource | None = None

    @classmethod
    def detect(cls, state: dict[str, torch.Tensor]) -> SourceLayout:
        groups = {key.split(".", 1)[0] for key in state}
        if not {"vision_encoder", "text_encoder"} <= groups:
            raise ConversionError(
                "not a CCLM/X-VLM checkpoint: expected keys under 'vision_encoder.' and 'text_encoder.', found "
                f"top-level groups {sorted(groups)[:12]}"
            )
        prefix = (
            "text_encoder.bert."
            if any(k.startswith("text_encoder.bert.") for k in state)
            else "text_encoder."
        )
        layer_re = re.compile(re.escape(prefix) + r"encoder\.layer\.(\d+)\.")
        layers = {int(m.group(1)) for k in state if (m := layer_re.match(k))}
        if not layers or layers != set(range(max(layers) + 1)):
            raise ConversionError(
                f"text encoder layers under '{prefix}encoder.layer.' are missing or not 0..N-1"
            )
        cross = {int(m.group(1)) for k in state if (m := layer_re.match(k)) and ".crossattention." in k}
        if not cross or cross != set(range(min(cross), max(layers) + 1)):
            raise ConversionError(
                "no contiguous block of fusion layers with 'crossattention' weights was found"
            )
        has_mlm = any(k.startswith("text_encoder.cls.") for k in state)
        return cls(prefix, max(layers) + 1, min(cross), has_mlm, detect_vision(state))


def resolve_text_heads(hidden: int, template: ModelConfig, text_heads: int | None = None) -> tuple[int, str]:
    """The text attention heads and where they come from: ``--text-heads`` (checked against the config), the
    config's ``text.encoder.num_attention_heads``, or hidden / 64 assumed."""
    given = dict(template.text.encoder).get("num_attention_heads")
    if text_heads is not None and given is not None and int(given) != int(text_heads):
        raise ConversionError(
            f"--text-heads {text_heads} disagrees with the config's text.encoder.num_attention_heads={given}: "
            "attention with other heads computes something else; fix one of them"
        )
    if text_heads is not None:
        source = "--text-heads" + (" (agrees with the config)" if given else "")
        return _checked_heads(int(text_heads), source, hidden, "text")
    if given is not None:
        return _checked_heads(int(given), "the config's text.encoder.num_attention_heads", hidden, "text")
    return _checked_heads(None, "--text-heads", hidden, "text")


def resolve_vision_heads(width: int, vision_heads: int | None = None) -> tuple[int, str]:
    """The CLIP ViT's heads (shapes cannot tell): ``--vision-heads`` or width / 64 (OpenAI's CLIP ViTs)."""
    return _checked_heads(vision_heads, "--vision-heads", width, "CLIP ViT")


def _checked_heads(heads: int | None, source: str, width: int, tower: str) -> tuple[int, str]:
    """``heads`` as given by ``source``, or width / 64 assumed when None; refused unless they divide ``width``."""
    if heads is None:
        heads, source = width // HEAD_DIM, f"assumed: width {width} / {HEAD_DIM} (pass {source} to state it)"
    if heads <= 0 or width % heads:
        kind = "text" if tower == "text" else "vision"
        raise ConversionError(f"{heads} {kind} attention heads do not divide the {tower} width {width}")
    return int(heads), source


def target_config(
    state: dict[str, torch.Tensor],
    layout: SourceLayout,
    template: ModelConfig,
    normalize: TextNormalize | str = REFERENCE_NORMALIZE,
    max_words: int = REFERENCE_MAX_WORDS,
    text_heads: int | None = None,
    vision_heads: int | None = None,
    vision_act: str = "quick_gelu",
) -> ModelConfig:
    """Our model config: the template (vision tower, image size, max_length...) with every size that the
    checkpoint's shapes determine taken from the checkpoint, the text/fusion layer split of the checkpoint, the
    text heads (:func:`resolve_text_heads`), and the reference's text normaliser (``normalize``, ``max_words``)
    that the model was trained with. A Swin checkpoint keeps the template's timm tower at its own size (the
    converter sets its window and size afterwards); a CLIP ViT one gets an open_clip ViT read from its
    shapes."""
    try:
        normalize = TextNormalize(str(normalize))
    except ValueError:
        choices = ", ".join(m.value for m in TextNormalize)
        raise ConversionError(f"unknown text normaliser {normalize!r}, expected one of: {choices}") from None
    if int(max_words) < 0:
        raise ConversionError(f"max_words must be >= 0 (0 keeps every word), got {max_words}")
    p = layout.text_prefix
    vocab, hidden = state[f"{p}embeddings.word_embeddings.weight"].shape
    shapes = {
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "num_hidden_layers": layout.num_layers,
        "intermediate_size": int(state[f"{p}encoder.layer.0.intermediate.dense.weight"].shape[0]),
        "max_position_embeddings": int(state[f"{p}embeddings.position_embeddings.weight"].shape[0]),
        "type_vocab_size": int(state[f"{p}embeddings.token_type_embeddings.weight"].shape[0]),
    }
    given = dict(template.text.encoder)
    clashes = {k: (given[k], v) for k, v in shapes.items() if k in given and given[k] != v}
    if clashes:
        raise ConversionError(
            f"config text.encoder disagrees with the checkpoint (config, checkpoint): {clashes}"
        )
    heads, _ = resolve_text_heads(int(hidden), template, text_heads)
    encoder = {**XLMR_DEFAULTS, **given, **shapes, "num_attention_heads": heads}
    cfg = copy.deepcopy(template)
    cfg.vision.pretrained = None
    vision = layout.vision or detect_vision(state)
    if vision.width > int(hidden):
        raise ConversionError(
            f"the vision width {vision.width} is larger than the text width {hidden}: the reference's "
            "cross-attention reads the vision tokens at their own width in every fusion layer, which one shared "
            "projection into a narrower fusion width cannot reproduce"
        )
    if vision.kind == "swin":
        tower = dict(template.vision.tower)
        if not tower.get("timm_model_name"):
            raise ConversionError(
                "a Swin checkpoint needs a target config with a timm Swin tower (vision.tower.timm_model_name)"
            )
        # The cross-view model reads the trunk's tokens; open_clip's pooled-head projection would be an unused,
        # unfilled parameter, so the converted tower has none.
        tower.update(timm_model_pretrained=False, timm_pool="", timm_proj="none")
    else:
        if vision_act not in VISION_ACTS:
            raise ConversionError(f"--vision-act must be one of {VISION_ACTS}, got {vision_act!r}")
        v_heads, _ = resolve_vision_heads(vision.width, vision_heads)
        tower = {
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "width": vision.width,
            "layers": vision.layers,
            "head_width": vision.width // v_heads,
            "mlp_ratio": vision.intermediate / vision.width,
            "quick_gelu": vision_act == "quick_gelu",
        }
        cfg.vision.image_size = vision.image_size
    cfg.vision.tower = tower
    cfg.text.name_or_path = None
    cfg.text.encoder = encoder
    cfg.text.text_layers = list(range(layout.fusion_start))
    cfg.text.fusion_layers = list(range(layout.fusion_start, layout.num_layers))
    cfg.text.normalize = normalize
    cfg.text.max_words = int(max_words)
    cfg.embed_dim = (
        int(state["vision_proj.weight"].shape[0]) if "vision_proj.weight" in state else template.embed_dim
    )
    cfg.temp = float(state["temp"]) if "temp" in state else template.temp
    cfg.objectives.bbox = any(key.startswith("bbox_head.") for key in state)
    return cfg


# ------------------------------------------------------------------------------------------------- mapping
_SWIN_DOWNSAMPLE = re.compile(r"layers\.(\d+)\.downsample\.(.+)")
_CROSS_KV = re.compile(r"fusion\.layers\.\d+\.crossattention\.self\.(key|value)\.weight")
_ITM = {"0": "net.0", "1": "net.1", "3": "net.3"}
_BOX = {"0": "mlp.0", "1": "mlp.1", "3": "mlp.3"}
_MLM = {"transform.dense.": "dense.", "transform.LayerNorm.": "layer_norm."}


_CLIP_NAMES = {
    "patch_embed.weight": "conv1.weight",
    "class_embedding": "class_embedding",
    "pos_embed.weight": "positional_embedding",
}
_CLIP_BLOCK = {
    "self_attn.out_proj.": "attn.out_proj.",
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


def _map_clip_vit(rest: str) -> tuple[list[str], str | None]:
    """open_clip ViT names for the reference's CLIP ViT; q/k/v become parts ``#0..2`` of ``in_proj``."""
    if rest == "position_ids":
        return [], "vit_position_ids"
    if rest in _CLIP_NAMES:
        return [f"vision.visual.{_CLIP_NAMES[rest]}"], None
    for old, new in (("pre_layrnorm.", "ln_pre."), ("post_layernorm.", "ln_post.")):
        if rest.startswith(old):
            return [f"vision.visual.{new}{rest[len(old) :]}"], None
    if m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", rest):
        block, tail = f"vision.visual.transformer.resblocks.{m.group(1)}", m.group(2)
        if q := re.fullmatch(r"self_attn\.([qkv]_proj)\.(weight|bias)", tail):
            return [f"{block}.attn.in_proj_{q.group(2)}#{_QKV[q.group(1)]}"], None
        for old, new in _CLIP_BLOCK.items():
            if tail.startswith(old):
                return [f"{block}.{new}{tail[len(old) :]}"], None
    return [], None


def map_key(key: str, layout: SourceLayout) -> tuple[list[str], str | None]:
    """Our key(s) for one source key, or ``([], reason)`` when the key is dropped; ``([], None)``: unknown.
    ``NAME#i``: part i of our tensor NAME (concatenated along dim 0: CLIP ViT q/k/v into ``in_proj``)."""
    if key.startswith("vision_encoder.") and layout.vision is not None and layout.vision.kind == "clip_vit":
        return _map_clip_vit(key[len("vision_encoder.") :])
    if key.startswith("vision_encoder."):
        rest = key[len("vision_encoder.") :]
        if rest.endswith(("relative_position_index", "attn_mask")):
            return [], "swin_buffer"
        if m := _SWIN_DOWNSAMPLE.fullmatch(rest):
            rest = f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
        return [f"vision.visual.trunk.{rest}"], None
    if key.startswith("text_encoder.cls.predictions."):
        rest = key[len("text_encoder.cls.predictions.") :]
        if rest == "bias":
            return ["mlm_head.decoder.bias", "mlm_head.bias"], None
        if rest == "decoder.weight":
            return [], "tied_decoder_weight"
        if rest == "decoder.bias":
            return [], "tied_decoder_bias"
        for old, new in _MLM.items():
            if rest.startswith(old):
                return [f"mlm_head.{new}{rest[len(old) :]}"], None
        return [], None
    if key.startswith(layout.text_prefix):
        rest = key[len(layout.text_prefix) :]
        if rest == "embeddings.position_ids":
            return [], "position_ids"
        if rest.startswith("pooler."):
            return [], "pooler"
        if rest.startswith("embeddings."):
            return [f"text.{rest}"], None
        if m := re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", rest):
            i, tail = int(m.group(1)), m.group(2)
            if i < layout.fusion_start:
                return [f"text.layers.{i}.{tail}"], None
            return [f"fusion.layers.{i - layout.fusion_start}.{tail}"], None
        return [], None
    head, _, tail = key.partition(".")
    if head == "bbox_head" and (m := re.fullmatch(r"(\d+)\.(weight|bias)", tail)) and m.group(1) in _BOX:
        return [f"box_head.{_BOX[m.group(1)]}.{m.group(2)}"], None
    if head == "itm_head" and (m := re.fullmatch(r"(\d+)\.(weight|bias)", tail)) and m.group(1) in _ITM:
        return [f"itm_head.{_ITM[m.group(1)]}.{m.group(2)}"], None
    if key == "temp" or head in ("vision_proj", "text_proj"):
        return [key], None
    return [], None


@dataclass
class ConversionReport:
    source: str
    out: str
    source_tensors: int
    consumed: int
    dropped: dict[str, list[str]] = field(default_factory=dict)  # reason -> source keys
    filled: int = 0
    left_at_init: list[str] = field(default_factory=list)
    position_ids: str = "reference"
    text_normalize: str = ""
    vision: dict[str, Any] = field(default_factory=dict)  # kind, image size (and where from), window, heads
    text_heads: dict[str, Any] = field(default_factory=dict)  # heads, source
    derived: list[str] = field(default_factory=list)  # tensors of ours computed rather than copied

    def summary(self) -> str:
        lines = [
            f"converted {self.source} -> {self.out}",
            f"  source tensors: {self.source_tensors} (consumed {self.consumed}, dropped "
            f"{sum(len(v) for v in self.dropped.values())})",
        ]
        for reason, keys in sorted(self.dropped.items()):
            lines.append(f"  dropped {len(keys):>4} x {DROPPED_REASONS[reason]}  (e.g. {keys[0]})")
        lines.append(f"  our tensors filled: {self.filled}")
        for line in self.derived:
            lines.append(f"  derived: {line}")
        if self.vision:
            v = self.vision
            geometry = f"window {v['window_size']}, " if v.get("window_size") else ""
            heads = v.get("heads")
            heads = "/".join(map(str, heads)) if isinstance(heads, list) else heads
            lines.append(
                f"  vision: {v['kind']}, {geometry}{v['image_size']} px ({v['image_size_from']}), heads {heads}"
                + (f" ({v['heads_from']})" if v.get("heads_from") else "")
            )
            if v.get("resized_to"):
                window = f", window {v['resized_window_size']}" if v.get("resized_window_size") else ""
                lines.append(f"  resized to {v['resized_to']} px{window} after loading (--image-size)")
        if self.text_heads:
            lines.append(f"  text attention heads: {self.text_heads['heads']} ({self.text_heads['source']})")
        if self.left_at_init:
            lines.append(f"  left at initialisation, as asked: {', '.join(self.left_at_init)}")
        lines.append(f"  position ids: {self.position_ids}")
        if self.text_normalize:
            lines.append(f"  text normaliser: {self.text_normalize}")
        return "\n".join(lines)


def _check_tied(state: dict[str, torch.Tensor], layout: SourceLayout) -> None:
    p = "text_encoder.cls.predictions."
    pairs = [
        (f"{p}decoder.weight", f"{layout.text_prefix}embeddings.word_embeddings.weight"),
        (f"{p}decoder.bias", f"{p}bias"),
    ]
    for copy_key, main_key in pairs:
        if copy_key in state and not torch.equal(state[copy_key], state.get(main_key, torch.empty(0))):
            raise ConversionError(
                f"'{copy_key}' differs from '{main_key}'; this model ties them, so it cannot "
                "represent the checkpoint"
            )


def convert_state(
    state: dict[str, torch.Tensor],
    model: torch.nn.Module,
    layout: SourceLayout,
    position_ids: str = "reference",
    allow_missing_mlm_head: bool = False,
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Our full state dict from the source one, strictly; raises :class:`ConversionError` listing every problem."""
    ours = model.state_dict()
    target: dict[str, torch.Tensor] = {}
    dropped: dict[str, list[str]] = defaultdict(list)
    unknown, mismatched, derived = [], [], []
    parts: dict[str, dict[int, tuple[str, torch.Tensor]]] = defaultdict(dict)
    consumed = 0
    hidden = int(model.encoder_config.hidden_size)
    vision_width = layout.vision.width if layout.vision is not None else hidden
    padded = 0
    for key, value in state.items():
        names, reason = map_key(key, layout)
        if reason:
            dropped[reason].append(key)
            continue
        if not names:
            unknown.append(key)
            continue
        consumed += 1
        for name in names:
            if "#" in name:
                base, index = name.split("#")
                parts[base][int(index)] = (key, value)
                continue
            if (
                vision_width < hidden
                and _CROSS_KV.fullmatch(name)
                and tuple(value.shape) == (hidden, vision_width)
            ):
                value = torch.cat([value, value.new_zeros(hidden, hidden - vision_width)], dim=1)
                padded += 1
            if name not in ours:
                unknown.append(f"{key} (-> {name}, which this model does not have)")
            elif value.numel() == ours[name].numel() == 1:  # the temperature: a 0-d or a 1-element tensor
                target[name] = value.reshape(ours[name].shape).to(ours[name].dtype)
            elif tuple(ours[name].shape) != tuple(value.shape):
                mismatched.append(f"{key} {tuple(value.shape)} -> {name} {tuple(ours[name].shape)}")
            else:
                target[name] = value.to(ours[name].dtype)
    for base, pieces in parts.items():
        keys = [pieces[i][0] for i in sorted(pieces)]
        if sorted(pieces) != [0, 1, 2]:
            unknown.append(f"{', '.join(keys)} (-> {base}: q, k and v are all needed)")
        elif base not in ours:
            unknown.append(f"{', '.join(keys)} (-> {base}, which this model does not have)")
        else:
            value = torch.cat([pieces[i][1] for i in range(3)], dim=0)
            if tuple(value.shape) != tuple(ours[base].shape):
                mismatched.append(
                    f"{', '.join(keys)} {tuple(value.shape)} -> {base} {tuple(ours[base].shape)}"
                )
            else:
                target[base] = value.to(ours[base].dtype)
    if parts:
        derived.append(f"{len(parts)} CLIP ViT in_proj weights/biases: q, k, v projections concatenated")
    if vision_width < hidden and "image_to_fusion.weight" in ours:
        weight = ours["image_to_fusion.weight"]
        target["image_to_fusion.weight"] = torch.eye(hidden, vision_width, dtype=weight.dtype)
        target["image_to_fusion.bias"] = torch.zeros(hidden, dtype=ours["image_to_fusion.bias"].dtype)
        derived.append(
            f"image_to_fusion: identity into the first {vision_width} of {hidden} fusion channels; the "
            f"{padded} cross-attention key/value weights [{hidden}, {vision_width}] get {hidden - vision_width} "
            "zero columns (the same keys and values as the reference's)"
        )
    _check_tied(state, layout)
    if "mlm_head.decoder.weight" in ours and "text.embeddings.word_embeddings.weight" in target:
        target["mlm_head.decoder.weight"] = target["text.embeddings.word_embeddings.weight"]
    left_at_init = []
    missing = [name for name in ours if name not in target]
    if allow_missing_mlm_head and not layout.has_mlm_head:
        left_at_init = [n for n in missing if n.startswith("mlm_head.")]
        missing = [n for n in missing if not n.startswith("mlm_head.")]
        target.update({n: ours[n] for n in left_at_init})
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} source tensors have no place in this model: {_first(unknown)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shapes differ: {_first(mismatched)}")
    if missing:
        hint = ""
        if not layout.has_mlm_head and any(n.startswith("mlm_head.") for n in missing):
            hint = (
                " (a fine-tuned checkpoint carries no MLM head: pass --allow-missing-mlm-head to leave it at "
                "initialisation)"
            )
        if any(n.startswith("image_to_fusion.") for n in missing):
            hint += " (the vision width differs from the text width: the target config does not fit the checkpoint)"
        problems.append(f"{len(missing)} tensors of ours are not in the checkpoint: {_first(missing)}{hint}")
    if problems:
        raise ConversionError("strict conversion failed:\n  " + "\n  ".join(problems))
    if position_ids == "reference":
        name = "text.embeddings.position_embeddings.weight"
        target[name] = torch.roll(target[name], shifts=model.encoder_config.pad_token_id + 1, dims=0)
    elif position_ids != "xlmr":
        raise ConversionError(f"--position-ids must be 'reference' or 'xlmr', not {position_ids!r}")
    report = ConversionReport(
        "",
        "",
        len(state),
        consumed,
        dict(dropped),
        len(target) - len(left_at_init),
        left_at_init,
        position_ids,
        derived=derived,
    )
    return target, report


def _first(items: list[str], n: int = 12) -> str:
    more = f" ... and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


# ------------------------------------------------------------------------------------------------- convert
def native_swin_size(
    source: SwinSource, geometry: dict[str, Any], image_size: int | None = None
) -> tuple[int, str]:
    """The image size the checkpoint's Swin ran at, and how it is known: its attention masks, ``--image-size``
    (when it has none), the target's own size (same window), or the target's size scaled with the window."""
    if source.image_size is not None:
        return source.image_size, "the checkpoint's attention masks"
    if image_size is not None:
        return int(image_size), "--image-size (the checkpoint holds no attention masks to check it against)"
    base_size, base_window = geometry["image_size"], geometry["window"]
    if source.window == base_window:
        return base_size, f"the config's size at window {base_window}"
    scaled = base_size * source.window / base_window
    unit = geometry["patch_size"] * 2 ** (geometry["stages"] - 1)
    if not scaled.is_integer() or int(scaled) % unit:
        raise ConversionError(
            f"the checkpoint's Swin windows are {source.window} (relative_position_bias_table rows "
            f"(2*{source.window}-1)**2 = {(2 * source.window - 1) ** 2}) and it holds no attention masks that "
            f"tell its resolution: pass --image-size (the config's tower runs {base_size} px at window "
            f"{base_window})"
        )
    return int(scaled), f"inferred: {base_size} px at window {base_window} scaled to window {source.window}"


def prepare_swin(model, source: SwinSource, image_size: int | None = None) -> dict[str, Any]:
    """Check the target Swin against the checkpoint's (stages, heads per stage) and set it to the checkpoint's
    window and resolution; returns the report's vision entry. Refusals name the resolution and the window."""
    trunk = model.vision.visual.trunk
    try:
        geometry = swin_geometry(trunk)
    except AttributeError:
        raise ConversionError(
            f"the config's timm tower {type(trunk).__name__} is not a Swin, the checkpoint's vision encoder is"
        ) from None
    name = model.cfg.vision.tower.get("timm_model_name")
    if geometry["stages"] != len(source.heads):
        raise ConversionError(
            f"the checkpoint's Swin has {len(source.heads)} stages, the config's tower {name} {geometry['stages']}"
        )
    if geometry["heads"] != source.heads:
        raise ConversionError(
            f"Swin attention heads differ: the checkpoint's relative_position_bias_table gives {source.heads} "
            f"heads per stage (its last dimension), the config's tower {name} has {geometry['heads']}; a model "
            "with other heads computes something else: use a config whose tower has the checkpoint's heads"
        )
    if geometry["patch_size"] != source.patch_size:
        raise ConversionError(
            f"the checkpoint's Swin patches are {source.patch_size} px, the config's tower {name} uses "
            f"{geometry['patch_size']} px"
        )
    native, native_from = native_swin_size(source, geometry, image_size)
    what = (
        f"the checkpoint's Swin (windows {source.window}: relative_position_bias_table rows "
        f"{(2 * source.window - 1) ** 2} = (2*{source.window}-1)**2)"
    )
    try:
        check_swin_fit(native, source.window, source.patch_size, len(source.heads), what=what)
    except ConfigError as err:
        hint = ""
        if source.image_size is None and image_size is None:
            hint = "; pass --image-size with the resolution it was trained at"
        raise ConversionError(f"{err}{hint}") from None
    grid = native // source.patch_size
    expected = [min(source.window, grid >> i) for i in range(len(source.windows))]
    if expected != source.windows:
        stage = next(i for i, (a, b) in enumerate(zip(expected, source.windows)) if a != b)
        raise ConversionError(
            f"at {native} px ({native_from}) with window {source.window}, Swin stage {stage} would use "
            f"{expected[stage]}x{expected[stage]} windows ({grid >> stage}x{grid >> stage} tokens) but its table is "
            f"for {source.windows[stage]}x{source.windows[stage]}: the image size does not fit the checkpoint"
        )
    if (native, source.window) != (geometry["image_size"], geometry["window"]):
        resize_vision(model, native, source.window)  # shapes only: the weights are replaced
    return {
        "kind": "swin",
        "image_size": native,
        "image_size_from": native_from,
        "window_size": source.window,
        "heads": list(source.heads),
        "heads_from": "the relative_position_bias_tables' last dimension",
    }


def convert(
    checkpoint: str | Path,
    out: str | Path,
    config: str | Path | None = None,
    tokenizer: str | None = DEFAULT_TOKENIZER,
    position_ids: str = "reference",
    allow_missing_mlm_head: bool = False,
    normalize: TextNormalize | str = REFERENCE_NORMALIZE,
    max_words: int = REFERENCE_MAX_WORDS,
    image_size: int | None = None,
    text_heads: int | None = None,
    vision_heads: int | None = None,
    vision_act: str = "quick_gelu",
) -> ConversionReport:
    """Convert ``checkpoint`` into the model folder ``out`` (config, safetensors weights, tokenizer, model card,
    ``conversion_report.json``). The config carries the text normaliser ``normalize`` / ``max_words`` (default:
    the reference's ``pre_caption`` cut at 40 words), which every user of the folder applies. ``image_size``:
    the resolution the converted model runs at (default: the checkpoint's own, see the module doc);
    ``text_heads`` / ``vision_heads`` (CLIP ViT) / ``vision_act`` (CLIP ViT): what shapes cannot tell."""
    from cclm.data.tokenize import load_tokenizer
    from cclm.model import CrossViewModel
    from cclm.model.card import describe_normalizer

    if image_size is not None and int(image_size) <= 0:
        raise ConversionError(f"--image-size must be positive, got {image_size}")
    state = read_checkpoint(checkpoint)
    layout = SourceLayout.detect(state)
    template = load_config(ModelConfig, config or DEFAULT_CONFIG)
    cfg = target_config(state, layout, template, normalize, max_words, text_heads, vision_heads, vision_act)
    cfg.text.tokenizer = tokenizer
    hidden = cfg.text.encoder["hidden_size"]
    heads, heads_from = resolve_text_heads(hidden, template, text_heads)
    try:
        tok = load_tokenizer(tokenizer) if tokenizer else None
    except (OSError, ValueError) as err:
        raise ConversionError(
            f"cannot load the tokenizer '{tokenizer}' ({err}); pass --tokenizer with a local folder, or 'none'"
        ) from err
    if tok is not None and len(tok) > cfg.text.encoder["vocab_size"]:
        raise ConversionError(
            f"tokenizer {tokenizer} has {len(tok)} tokens, the checkpoint's vocabulary only "
            f"{cfg.text.encoder['vocab_size']}"
        )
    model = CrossViewModel(cfg, load_pretrained=False)
    vision = layout.vision
    if vision.kind == "swin":
        vision_info = prepare_swin(model, vision, image_size)
    else:
        v_heads, v_heads_from = resolve_vision_heads(vision.width, vision_heads)
        vision_info = {
            "kind": "clip_vit",
            "image_size": vision.image_size,
            "image_size_from": f"the checkpoint's {vision.grid}x{vision.grid} position grid",
            "heads": v_heads,
            "heads_from": v_heads_from,
            "activation": vision_act,
        }
    target, report = convert_state(state, model, layout, position_ids, allow_missing_mlm_head)
    model.load_state_dict(target, strict=True)
    if image_size is not None and int(image_size) != vision_info["image_size"]:
        try:
            resize_vision(model, int(image_size))  # interpolated as the reference does
        except ConfigError as err:
            raise ConversionError(f"--image-size {image_size}: {err}") from None
        vision_info["resized_to"] = int(image_size)
        if model.cfg.vision.tower.get("window_size"):
            vision_info["resized_window_size"] = model.cfg.vision.tower["window_size"]
    report.source, report.out = str(checkpoint), str(out)
    report.text_normalize = describe_normalizer(cfg.text)
    report.vision = vision_info
    report.text_heads = {"heads": heads, "source": heads_from}
    extra = {
        "converted_from": {
            "checkpoint": str(checkpoint),
            "layout": "CCLM/X-VLM (zengyan-97/CCLM)",
            "position_ids": position_ids,
            "dropped": {k: len(v) for k, v in report.dropped.items()},
            "left_at_init": report.left_at_init,
            "vision": vision_info,
            "text_heads": report.text_heads,
        }
    }
    out = Path(out)
    model.save_pretrained(out, extra=extra)
    if tok is not None:
        tok.save_pretrained(str(out))
    (out / "conversion_report.json").write_text(json.dumps(report.__dict__, indent=1))
    return report


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cclm convert-reference",
        description="Convert a checkpoint released with the CCLM paper into a cclm model folder (strict).",
    )
    parser.add_argument("checkpoint", help="the released .th/.pth file (or .safetensors)")
    parser.add_argument("out", help="output model folder")
    parser.add_argument(
        "--config",
        default=str(DEFAULT_CONFIG),
        help="model config giving the timm Swin tower at its pretraining size (default: base_swin.yaml)",
    )
    parser.add_argument(
        "--tokenizer",
        default=DEFAULT_TOKENIZER,
        help="tokenizer saved into the folder (hub name or local folder); 'none' to skip",
    )
    parser.add_argument("--position-ids", choices=("reference", "xlmr"), default="reference")
    parser.add_argument(
        "--normalize",
        choices=[m.value for m in TextNormalize],
        default=REFERENCE_NORMALIZE.value,
        help="text normaliser saved with the model (default: pre_caption, the reference's)",
    )
    parser.add_argument(
        "--max-words",
        type=int,
        default=REFERENCE_MAX_WORDS,
        help=f"pre_caption keeps this many words (default {REFERENCE_MAX_WORDS}, the reference's pretraining "
        "configs; 0 keeps every word)",
    )
    parser.add_argument(
        "--allow-missing-mlm-head",
        action="store_true",
        help="fine-tuned checkpoints have no MLM head: leave ours at initialisation",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="resolution of the converted model (default: the checkpoint's: Swin attention masks, else the "
        "config's size scaled with the window read from the relative-position tables: 384 for window 12)",
    )
    parser.add_argument(
        "--text-heads",
        type=int,
        default=None,
        help="text attention heads (shapes cannot tell; checked against the config's "
        "text.encoder.num_attention_heads; default: the config's, else hidden / 64)",
    )
    parser.add_argument(
        "--vision-heads",
        type=int,
        default=None,
        help="CLIP ViT checkpoints: vision attention heads (default width / 64); Swin heads are read from the "
        "checkpoint",
    )
    parser.add_argument(
        "--vision-act",
        choices=VISION_ACTS,
        default="quick_gelu",
        help="CLIP ViT checkpoints: the activation (default quick_gelu, OpenAI CLIP's)",
    )
    args = parser.parse_args(argv[1:])
    # A ConversionError is a UserError: cclm's run_command prints it as one line with exit status 2 (and its
    # traceback under --debug / CCLM_DEBUG=1), as every command's.
    report = convert(
        args.checkpoint,
        args.out,
        args.config,
        None if args.tokenizer.lower() == "none" else args.tokenizer,
        args.position_ids,
        args.allow_missing_mlm_head,
        args.normalize,
        args.max_words,
        image_size=args.image_size,
        text_heads=args.text_heads,
        vision_heads=args.vision_heads,
        vision_act=args.vision_act,
    )
    print(report.summary())
    return 0
