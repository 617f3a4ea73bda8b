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
    bbox_head.*                      box regression head of X-VLM grounding: not part of this model, dropped

Our side is timm's Swin (through open_clip's timm tower; patch merging at the START of stage i+1, otherwise the
same names and the same channel order), HF ``XLMRobertaLayer`` text/fusion stacks, ``MatchingHead`` and
``XLMRobertaLMHead``. The load is strict: every source tensor is consumed or dropped for a stated reason (derived
buffers, tied copies that are checked equal, the box head), every tensor of ours is filled, and a report says so.

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

Checkpoints are read with ``torch.load(weights_only=True)`` or safetensors: never with unrestricted pickle.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cclm.config import CONFIG_ROOT, ModelConfig, TextNormalize, load_config

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
HEAD_DIM = 64  # XLM-R base/large: hidden / heads; override with text.encoder.num_attention_heads in --config

DROPPED_REASONS = {
    "bbox_head": "box regression head of X-VLM's grounding objective; not part of the cross-view model",
    "swin_buffer": "Swin relative_position_index / attn_mask buffers; timm recomputes them",
    "position_ids": "position_ids buffer; recomputed from the input ids",
    "tied_decoder_weight": "MLM decoder weight; tied to the word embeddings (checked equal)",
    "tied_decoder_bias": "MLM decoder bias; the same tensor as cls.predictions.bias (checked equal)",
    "pooler": "BERT pooler; CCLM builds its encoder without one and never reads it",
}


class ConversionError(ValueError):
    """The checkpoint cannot be converted; the message says which keys or shapes are wrong."""


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
@dataclass
class SourceLayout:
    text_prefix: str  # "text_encoder.bert." or "text_encoder."
    num_layers: int
    fusion_start: int  # first layer with cross-attention
    has_mlm_head: bool

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
        return cls(prefix, max(layers) + 1, min(cross), has_mlm)


def target_config(
    state: dict[str, torch.Tensor],
    layout: SourceLayout,
    template: ModelConfig,
    normalize: TextNormalize | str = REFERENCE_NORMALIZE,
    max_words: int = REFERENCE_MAX_WORDS,
) -> ModelConfig:
    """Our model config: the template (vision tower, image size, attention heads, max_length...) with every size
    that the checkpoint's shapes determine taken from the checkpoint, the text/fusion layer split of the
    checkpoint, and the reference's text normaliser (``normalize``, ``max_words``) that the model was trained
    with."""
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
    encoder = {**XLMR_DEFAULTS, "num_attention_heads": int(hidden) // HEAD_DIM, **given, **shapes}
    cfg = copy.deepcopy(template)
    cfg.vision.pretrained = None
    tower = dict(template.vision.tower)
    if not tower.get("timm_model_name"):
        raise ConversionError("the target config must use a timm Swin tower (vision.tower.timm_model_name)")
    # The cross-view model reads the trunk's tokens; open_clip's pooled-head projection would be an unused,
    # unfilled parameter, so the converted tower has none.
    tower.update(timm_model_pretrained=False, timm_pool="", timm_proj="none")
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
    return cfg


# ------------------------------------------------------------------------------------------------- mapping
_SWIN_DOWNSAMPLE = re.compile(r"layers\.(\d+)\.downsample\.(.+)")
_ITM = {"0": "net.0", "1": "net.1", "3": "net.3"}
_MLM = {"transform.dense.": "dense.", "transform.LayerNorm.": "layer_norm."}


def map_key(key: str, layout: SourceLayout) -> tuple[list[str], str | None]:
    """Our key(s) for one source key, or ``([], reason)`` when the key is dropped; ``([], None)``: unknown."""
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
    if head == "bbox_head":
        return [], "bbox_head"
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

    def summary(self) -> str:
        lines = [
            f"converted {self.source} -> {self.out}",
            f"  source tensors: {self.source_tensors} (consumed {self.consumed}, dropped "
            f"{sum(len(v) for v in self.dropped.values())})",
        ]
        for reason, keys in sorted(self.dropped.items()):
            lines.append(f"  dropped {len(keys):>4} x {DROPPED_REASONS[reason]}  (e.g. {keys[0]})")
        lines.append(f"  our tensors filled: {self.filled}")
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
    unknown, mismatched = [], []
    consumed = 0
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
            if name not in ours:
                unknown.append(f"{key} (-> {name}, which this model does not have)")
            elif value.numel() == ours[name].numel() == 1:  # the temperature: a 0-d or a 1-element tensor
                target[name] = value.reshape(ours[name].shape).to(ours[name].dtype)
            elif tuple(ours[name].shape) != tuple(value.shape):
                mismatched.append(f"{key} {tuple(value.shape)} -> {name} {tuple(ours[name].shape)}")
            else:
                target[name] = value.to(ours[name].dtype)
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
            hint += (
                " (the Swin width differs from the text width: the target config does not fit the checkpoint)"
            )
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
    )
    return target, report


def _first(items: list[str], n: int = 12) -> str:
    more = f" ... and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


# ------------------------------------------------------------------------------------------------- convert
def convert(
    checkpoint: str | Path,
    out: str | Path,
    config: str | Path | None = None,
    tokenizer: str | None = DEFAULT_TOKENIZER,
    position_ids: str = "reference",
    allow_missing_mlm_head: bool = False,
    normalize: TextNormalize | str = REFERENCE_NORMALIZE,
    max_words: int = REFERENCE_MAX_WORDS,
) -> ConversionReport:
    """Convert ``checkpoint`` into the model folder ``out`` (config, safetensors weights, tokenizer, model card,
    ``conversion_report.json``). The config carries the text normaliser ``normalize`` / ``max_words`` (default:
    the reference's ``pre_caption`` cut at 40 words), which every user of the folder applies."""
    from cclm.data.tokenize import load_tokenizer
    from cclm.model import CrossViewModel
    from cclm.model.card import describe_normalizer

    state = read_checkpoint(checkpoint)
    layout = SourceLayout.detect(state)
    template = load_config(ModelConfig, config or DEFAULT_CONFIG)
    cfg = target_config(state, layout, template, normalize, max_words)
    cfg.text.tokenizer = tokenizer
    vision_width = (
        state["vision_encoder.norm.weight"].shape[0] if "vision_encoder.norm.weight" in state else None
    )
    if vision_width is not None and vision_width != cfg.text.encoder["hidden_size"]:
        raise ConversionError(
            f"Swin width {vision_width} differs from the text width {cfg.text.encoder['hidden_size']}: the "
            "reference cross-attention reads Swin tokens directly, which this model supports only at equal widths"
        )
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
    target, report = convert_state(state, model, layout, position_ids, allow_missing_mlm_head)
    model.load_state_dict(target, strict=True)
    report.source, report.out = str(checkpoint), str(out)
    report.text_normalize = describe_normalizer(cfg.text)
    extra = {
        "converted_from": {
            "checkpoint": str(checkpoint),
            "layout": "CCLM/X-VLM (zengyan-97/CCLM)",
            "position_ids": position_ids,
            "dropped": {k: len(v) for k, v in report.dropped.items()},
            "left_at_init": report.left_at_init,
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
        help="model config giving the timm Swin tower and image size (default: base_swin.yaml)",
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
    args = parser.parse_args(argv[1:])
    try:
        report = convert(
            args.checkpoint,
            args.out,
            args.config,
            None if args.tokenizer.lower() == "none" else args.tokenizer,
            args.position_ids,
            args.allow_missing_mlm_head,
            args.normalize,
            args.max_words,
        )
    except ConversionError as err:
        print(f"cclm convert-reference: {err}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0
