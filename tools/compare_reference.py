"""Check cclm against the CCLM reference code itself (zengyan-97/CCLM), on one machine, in about a minute.

    .venv/bin/python tools/compare_reference.py --reference-dir /path/to/CCLM [--seed 0] [--out report.md]

``--reference-dir`` is a clone (or ``git archive``) of https://github.com/zengyan-97/CCLM; nothing in it is
edited and nothing is downloaded. Not run in CI, which has no copy of the reference. What it checks:

1. **Data.** The same raw samples (multilingual captions with case and punctuation, parallel sentence pairs) go
   through the reference's own ``dataset/utils.py`` ``pre_caption`` and the ``preprocess`` of its
   ``ImageMultiTextDataset`` / ``ParaTextDataset`` (``dataset/pretrain_dataset_multilingual.py``, with the token
   and mask caps of its ``configs/Pretrain_3m.yaml``), and through cclm's ``pre_caption`` and ``Collator`` with
   the settings of ``configs/pretrain/cclm_3m.yaml``. The normalised texts and the token ids must be equal.
   Then many rows of every length are masked by the reference's ``TextMaskingGenerator`` and by cclm's
   ``mask_tokens`` (``rule: count``): the masks per row must be exactly the reference's count, and the n-gram
   span lengths, the share of masked ``</s>`` and the 80/10/10 replacement shares must agree within sampling
   noise.
2. **Losses.** The reference's pretraining model (``CrossViewLM``, ``models/model_pretrain_cclm.py``) is built
   at a tiny size (Swin: 224 px, window 7, widths 8..64; text: 12 layers of width 64, fusion from layer 6) with
   random weights, every parameter perturbed so that no LayerNorm is 1/0 and no bias 0, and converted with
   ``cclm.inference.convert_reference`` (``position_ids: reference``) into a ``CrossViewModel``. Both run in
   eval mode, fp32, one process (a 1-process gloo group for the reference's all-gather), on the reference's
   own masked batch of each view (its ``masked_pos`` / ``masked_ids`` become cclm's ``mlm_ids`` /
   ``mlm_labels``). Hard negatives: ``torch.multinomial`` is replaced, in both, by one inverse-CDF sampler
   fed the same uniform numbers in the same order (the reference draws row by row, cclm a whole matrix per
   direction), so both pick the same negatives whenever their sampling distributions agree, which is checked
   too. ITC/ITM/MLM (image view) and TTC/TTM/MLM (text view) must agree to 1e-4.
3. **Regions and boxes** (the 4M setting). A region batch -- the images once, each caption pointed at one of them
   (``idx_to_group_img``), whole-image captions and region captions with their boxes and patch masks
   (``image_atts``) -- goes through the reference's ``forward(..., ret_bbox_loss=True)`` and cclm's region view:
   the pooled region features, the box the converted ``bbox_head`` predicts for the same image and text, and
   ITC/ITM/MLM/L1/GIoU must agree to 1e-4.

The reference was written for transformers 4 and older timm; the shims it needs are applied here, at import
time, and listed in the output (``install_shims``). Exit status: 0 when every row is OK, 1 when one FAILs, 2
when the reference directory is missing or is not the CCLM code. docs/fidelity_check.md shows a run.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import importlib
import importlib.util
import io
import json
import math
import random
import re
import subprocess
import sys
import tempfile
import types
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

REQUIRED_FILES = (
    "models/model_pretrain_cclm.py",
    "models/xvlm.py",
    "models/xbert.py",
    "models/swin_transformer.py",
    "dataset/pretrain_dataset_multilingual.py",
    "dataset/utils.py",
    "configs/Pretrain_3m.yaml",
)
LOSS_TOL = 1e-4
SIGMAS = 5.0  # masking shares agree within 5 standard errors of the sampling noise (pooled binomial)
MASKING_ROWS = 20000
IGNORE_INDEX = -100

# The tiny model. Swin: 224 px, patch 4, window 7 -> 56, 28, 14, 7 tokens a side; two blocks per stage, so every
# stage but the last has a shifted block with an attention mask. Its last width equals the text width, as
# Swin-B's 1024 equals xlm-roberta-large's (the reference's cross-attention reads Swin tokens directly).
SWIN = {"image_res": 224, "window_size": 7, "embed_dim": 8, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 2, 4]}
TEXT = {"hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128, "max_position_embeddings": 130}
EMBED_DIM = 32
TIMM_NAME = "cclm_fidelity_swin_224"
# The reference asserts these: 12 text layers (fusion from 6), a text folder named after xlm-roberta-large.
TEXT_LAYERS = 12
TEXT_DIR_NAME = "xlm-roberta-large-tiny"

# Raw samples: case, punctuation the reference strips (, . ' ! ? " ( ) * # : ; ~ - /), <person>, runs of spaces,
# scripts without spaces, and one text longer than the word cuts (40 / 64 words) and the token caps.
LONG_CAPTION = " ".join(f"Word{i}, a" for i in range(30))  # 60 words
LONG_SENTENCE = " ".join(
    ["a b c-d"] * 25
)  # 75 words after pre_caption: over the 64-word cut of parallel text
CAPTIONS = [
    "A RED circle, above a Blue square!",
    "Ein roter Kreis -- über einem blauen Quadrat.",
    "Un cercle rouge au-dessus d'un carré bleu ; (vue de face)",
    "青い四角の上に赤い丸。とても「きれい」です",
    "蓝色正方形上方的红色圆形，很漂亮！",
    "Dos triángulos verdes/pequeños a la izquierda?",
    '<PERSON> holding a "big" umbrella #rain ~ 2   people',
    LONG_CAPTION,
]
PAIRS = [
    ("Two small green triangles on the left.", "Zwei kleine grüne Dreiecke links."),
    ("The cat's toy: a ball (red)!", "Le jouet du chat : une balle (rouge) !"),
    ("A man rides a horse.", "一个男人骑着一匹马。"),
    ("Good morning, everyone", "皆さん、おはようございます"),
    ("Das ist *sehr* gut; danke.", "C'est *très* bien ; merci."),
    ("¿Dónde está la estación?", "Where is the station?"),
    ("Это   красный круг над синим квадратом", "This is a red circle above a blue square"),
    (LONG_SENTENCE, LONG_CAPTION),
]


class ReferenceDirError(Exception):
    """The reference directory is missing or is not the CCLM code; the message says what is wrong."""


# ------------------------------------------------------------------------------------------------------ rows
@dataclass
class Row:
    quantity: str
    reference: Any
    cclm: Any
    diff: float | None = None
    tol: float | None = None  # None: shown for information, never fails
    note: str = ""

    @property
    def status(self) -> str:
        if self.tol is None:
            return "INFO"
        return "OK" if self.diff is not None and self.diff <= self.tol else "FAIL"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    return str(value)


def format_table(rows: list[Row]) -> str:
    """A Markdown table: quantity, reference, cclm, abs diff, tolerance, status (and notes below it)."""
    header = ["quantity", "reference", "cclm", "abs diff", "tol", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes: dict[str, int] = {}  # note -> its number; a note shared by several rows is printed once
    for row in rows:
        quantity = row.quantity
        if row.note:
            quantity += f" [{notes.setdefault(row.note, len(notes) + 1)}]"
        cells = [
            quantity,
            _fmt(row.reference),
            _fmt(row.cclm),
            "" if row.diff is None else _fmt(float(row.diff)),
            "" if row.tol is None else _fmt(float(row.tol)),
            row.status,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + [f"[{i}] {note}" for note, i in notes.items()]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- batch layout (pure)
def reference_mlm_to_cclm(text_ids_masked, masked_pos, masked_ids):
    """The reference's MLM layout -> cclm's: ``(mlm_ids, mlm_labels)``, both [B, L].

    Reference: ``text_ids_masked`` [B, L] (the masked input), ``masked_pos`` [B, M] (positions, padded with 0) and
    ``masked_ids`` [B, M] (the original ids there, padded with -100). cclm: the same masked input and labels
    [B, L] holding the original id at each masked position and -100 elsewhere."""
    import torch

    mlm_ids = text_ids_masked.clone()
    labels = torch.full_like(text_ids_masked, IGNORE_INDEX)
    rows, slots = (masked_ids != IGNORE_INDEX).nonzero(as_tuple=True)
    positions = masked_pos[rows, slots]
    if len(set(zip(rows.tolist(), positions.tolist()))) != len(rows):
        raise ValueError("masked_pos names a position twice in one row")
    labels[rows, positions] = masked_ids[rows, slots]
    return mlm_ids, labels


# ----------------------------------------------------------------------------------------- the reference
def check_reference_dir(path: str | Path) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise ReferenceDirError(f"--reference-dir {path}: no such directory (clone zengyan-97/CCLM there)")
    missing = [f for f in REQUIRED_FILES if not (root / f).is_file()]
    if missing:
        raise ReferenceDirError(
            f"--reference-dir {path}: not the CCLM reference code (missing {', '.join(missing)})"
        )
    return root.resolve()


def reference_commit(root: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git work tree)"


def install_shims() -> list[str]:
    """Make the reference importable with today's transformers / timm, without editing it. Returns what was
    done, one line each."""
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    done = []
    for name in ("apply_chunking_to_forward", "prune_linear_layer"):
        if not hasattr(modeling_utils, name):
            setattr(modeling_utils, name, getattr(pytorch_utils, name))
            done.append(f"transformers.modeling_utils.{name} <- transformers.pytorch_utils.{name}")
    if not hasattr(modeling_utils, "find_pruneable_heads_and_indices"):

        def find_pruneable_heads_and_indices(*args, **kwargs):
            raise NotImplementedError("head pruning: removed from transformers, never used by CCLM")

        modeling_utils.find_pruneable_heads_and_indices = find_pruneable_heads_and_indices
        done.append(
            "transformers.modeling_utils.find_pruneable_heads_and_indices <- a stub (pruning is unused)"
        )
    if importlib.util.find_spec("cv2") is None:  # dataset/randaugment.py; RandomAugment is never called here
        sys.modules["cv2"] = types.ModuleType("cv2")
        done.append("cv2 <- an empty module (imported by dataset/randaugment.py, which is not used here)")
    return done


def patch_reference_classes(ref) -> list[str]:
    """Shims on the reference's classes (after import): transformers 5 models must call ``post_init()``, which
    sets up what ``init_weights()`` now reads; the reference's xbert still calls ``init_weights()`` itself."""
    import torch
    from transformers.modeling_utils import PreTrainedModel

    base, done = ref.xbert.BertPreTrainedModel, []
    if "init_weights" not in base.__dict__ and hasattr(PreTrainedModel, "post_init"):

        def init_weights(self):
            if "all_tied_weights_keys" in self.__dict__:
                PreTrainedModel.init_weights(self)
            else:
                self.post_init()  # sets all_tied_weights_keys & co., then calls init_weights again

        base.init_weights = init_weights
        done.append("xbert.BertPreTrainedModel.init_weights -> post_init() first (transformers 5 needs it)")
    if not hasattr(base, "get_head_mask"):

        def get_head_mask(self, head_mask, num_hidden_layers, is_attention_chunked=False):
            if head_mask is not None:
                raise NotImplementedError("head masks: removed from transformers, never used by CCLM")
            return [None] * num_hidden_layers

        base.get_head_mask = get_head_mask
        done.append("xbert.BertPreTrainedModel.get_head_mask <- transformers 4.12's, for head_mask=None")
    if not hasattr(base, "invert_attention_mask"):

        def invert_attention_mask(self, mask):
            extended = (mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]).to(self.dtype)
            return (1.0 - extended) * (-1e4 if self.dtype == torch.float16 else -1e9)

        base.invert_attention_mask = invert_attention_mask
        done.append("xbert.BertPreTrainedModel.invert_attention_mask <- transformers 4.12's (-1e9 in fp32)")
    return done


def import_reference(root: Path) -> types.SimpleNamespace:
    """The reference's modules, imported from ``root`` (its top-level packages are ``models``, ``dataset`` and
    ``utils``: any module of those names imported before is set aside)."""
    for name in list(sys.modules):
        if name.split(".")[0] in ("models", "dataset", "utils"):
            del sys.modules[name]
    sys.path.insert(0, str(root))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        modules = {
            "model": importlib.import_module("models.model_pretrain_cclm"),
            "xvlm": importlib.import_module("models.xvlm"),
            "xbert": importlib.import_module("models.xbert"),
            "data": importlib.import_module("dataset.pretrain_dataset_multilingual"),
            "utils": importlib.import_module("dataset.utils"),
        }
    for name, module in modules.items():
        if not Path(module.__file__).resolve().is_relative_to(root):
            raise ReferenceDirError(
                f"reference module {name} was imported from {module.__file__}, not {root}"
            )
    return types.SimpleNamespace(**modules)


def reference_config(root: Path, work: Path) -> dict:
    """The reference's Pretrain_3m.yaml, its model sizes made tiny and its paths pointed into ``work``."""
    import yaml

    cfg = yaml.safe_load((root / "configs" / "Pretrain_3m.yaml").read_text())
    cfg.update(
        vision_config=str(work / "config_swin_tiny.json"),
        image_res=SWIN["image_res"],
        text_encoder=str(work / TEXT_DIR_NAME),
        text_num_hidden_layers=TEXT_LAYERS,
        embed_dim=EMBED_DIM,
        use_clip_vit=False,
        use_swin=True,
    )
    cfg.pop("accelerator", None)  # its FP16_OPT_LEVEL O1 would switch xbert to its fp16 attention scaling
    return cfg


# -------------------------------------------------------------------------------------------- workspace
def tokenizer_vocab(texts: list[str]) -> list[tuple[str, float]]:
    """A Unigram vocabulary made by hand, so that it is the same on every run (the trainer's is not): XLM-R's
    special tokens at XLM-R's ids, one piece per word of the normalised texts, and every character of the raw
    texts; a word is one token, anything else is spelled out in characters."""
    from cclm.data.normalize import pre_caption
    from cclm.data.tokenize import XLMR_SPECIAL_TOKENS

    words = sorted({w for t in texts for w in pre_caption(t).split(" ")})
    chars = sorted({c for t in texts for c in t if not c.isspace()})
    vocab = [(token, 0.0) for token in XLMR_SPECIAL_TOKENS] + [("\u2581", -3.0)]
    vocab += [("\u2581" + w, -4.0) for w in words]
    return vocab + [(c, -8.0) for c in chars]


def write_tokenizer(work: Path) -> Path:
    """The tokenizer, saved where both sides load it from: the reference with its own ``build_tokenizer``
    (XLMRobertaTokenizer), cclm with ``load_tokenizer``. Its pipeline is the one transformers 5's
    XLMRobertaTokenizer rebuilds from a vocabulary (no normaliser -- a real sentencepiece model brings its own,
    which both would apply alike --, whitespace split, Metaspace), so that the two loaders tokenise alike and
    what is compared is the text processing around the tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from cclm.data.tokenize import XLMR_SPECIAL_TOKENS

    texts = CAPTIONS + [t for pair in PAIRS for t in pair]
    tokenizer = Tokenizer(models.Unigram(tokenizer_vocab(texts), unk_id=3, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always"),
        ]
    )
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    names = dict(zip(("bos_token", "pad_token", "eos_token", "unk_token", "mask_token"), XLMR_SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, cls_token="<s>", sep_token="</s>", **names)
    folder = work / TEXT_DIR_NAME
    fast.save_pretrained(str(folder))
    return folder


def write_text_encoder(folder: Path, vocab_size: int) -> None:
    """config.json (XLM-R's fields, tiny sizes) and a pytorch_model.bin holding only a random ``lm_head``: the
    reference's pretraining model always loads "xlm-roberta-large" weights (load_text_params=True, hard-coded
    in CrossViewLM); every other text weight starts from its own random init."""
    import torch

    config = {
        "architectures": ["XLMRobertaForMaskedLM"],
        "model_type": "xlm-roberta",
        "vocab_size": vocab_size,
        "num_hidden_layers": 24,  # as xlm-roberta-large; the reference keeps 12 (text_num_hidden_layers)
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "type_vocab_size": 1,
        "layer_norm_eps": 1e-5,
        "initializer_range": 0.02,
        "pad_token_id": 1,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "position_embedding_type": "absolute",
        **TEXT,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    h = TEXT["hidden_size"]
    head = {
        "lm_head.dense.weight": torch.randn(h, h) * 0.02,
        "lm_head.dense.bias": torch.zeros(h),
        "lm_head.layer_norm.weight": torch.ones(h),
        "lm_head.layer_norm.bias": torch.zeros(h),
        "lm_head.bias": torch.zeros(vocab_size),
        "lm_head.decoder.weight": torch.randn(vocab_size, h) * 0.02,
    }
    torch.save(head, folder / "pytorch_model.bin")


def write_vision_encoder(ref, cfg: dict) -> None:
    """The Swin config json and a random Swin checkpoint made by the reference's own ``build_vision_encoder``
    (CrossViewLM always loads Swin weights: load_vision_params=True is hard-coded)."""
    import torch

    ckpt = Path(cfg["vision_config"]).with_name("swin_tiny_random.pth")
    vision = {**SWIN, "vision_width": SWIN["embed_dim"] * 2 ** (len(SWIN["depths"]) - 1), "ckpt": str(ckpt)}
    Path(cfg["vision_config"]).write_text(json.dumps(vision, indent=1))
    encoder, _ = ref.xvlm.build_vision_encoder(cfg, load_params=False)
    torch.save({"model": encoder.state_dict()}, ckpt)


@contextlib.contextmanager
def single_process_group(work: Path):
    """A 1-process gloo group: the reference's contrastive loss all-gathers through torch.distributed."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", init_method=f"file://{work / 'dist_init'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ models
def build_reference_model(ref, cfg: dict, seed: int, shims: list[str]):
    """CrossViewLM as the reference builds it, then every parameter perturbed (seeded), in eval mode."""
    import torch

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ref.model.CrossViewLM(cfg)
    mlm = model.text_encoder
    decoder, words = mlm.cls.predictions.decoder, mlm.bert.embeddings.word_embeddings
    if decoder.weight is not words.weight:  # transformers 4 tied them in init_weights; 5 no longer does
        decoder.weight = words.weight
        shims.append("MLM decoder weight tied to the word embeddings (transformers 4 did it in init_weights)")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name == "temp":
                continue
            # matrices: noise of std 1/sqrt(fan-in), so that different inputs give clearly different features
            scale = 0.1 if param.ndim == 1 else param[0].numel() ** -0.5
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return model.eval()


def register_tiny_swin() -> None:
    import timm
    from timm.models import register_model
    from timm.models.swin_transformer import SwinTransformer

    if timm.list_models(TIMM_NAME):
        return

    def factory(pretrained: bool = False, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay")}
        kwargs.pop("cache_dir", None)
        return SwinTransformer(
            img_size=SWIN["image_res"],
            patch_size=4,
            embed_dim=SWIN["embed_dim"],
            depths=tuple(SWIN["depths"]),
            num_heads=tuple(SWIN["num_heads"]),
            window_size=SWIN["window_size"],
            **kwargs,
        )

    factory.__name__ = TIMM_NAME
    register_model(factory)


def convert_to_cclm(ref_model):
    """The reference model's state dict through cclm's converter into a CrossViewModel (strict)."""
    from cclm.config import ModelConfig, from_dict
    from cclm.inference import convert_reference as cr
    from cclm.model import CrossViewModel

    register_tiny_swin()
    state = {k: v.detach().clone() for k, v in ref_model.state_dict().items()}
    layout = cr.SourceLayout.detect(state)
    template = from_dict(
        ModelConfig,
        {
            "vision": {
                "tower": {"timm_model_name": TIMM_NAME, "image_size": SWIN["image_res"]},
                "image_size": SWIN["image_res"],
            },
            "text": {"encoder": {"num_attention_heads": TEXT["num_attention_heads"]}},
        },
    )
    cfg = cr.target_config(state, layout, template)
    model = CrossViewModel(cfg, load_pretrained=False)
    target, report = cr.convert_state(state, model, layout, position_ids="reference")
    model.load_state_dict(target, strict=True)
    return model.eval(), report


# -------------------------------------------------------------------------------------------------- data
def reference_datasets(ref, cfg: dict, work: Path) -> dict:
    """The reference's ImageMultiTextDataset and ParaTextDataset, built by their own __init__ over a local
    (empty) data file: what is used here is their tokenizer, ``preprocess`` and ``mask_generator``."""
    data_file = work / "empty.jsonl"
    data_file.write_text("")
    with contextlib.redirect_stdout(io.StringIO()):
        image = ref.data.ImageMultiTextDataset(cfg, str(data_file), shuffle=False, repeat=False)
        text = ref.data.ParaTextDataset(cfg, str(data_file), shuffle=False, repeat=False)
    return {"image": image, "text": text}


def cclm_settings(tokenizer) -> tuple[dict, Any, dict]:
    """cclm's per-view token caps and masking specs and its normaliser, from configs/pretrain/cclm_3m.yaml,
    built the way cclm.data.pipeline builds them."""
    from cclm.config import CONFIG_ROOT, PretrainConfig, load_config
    from cclm.data.masking import MaskingSpec
    from cclm.data.normalize import normalizer_for

    cfg = load_config(PretrainConfig, CONFIG_ROOT / "pretrain" / "cclm_3m.yaml")
    caps, specs = {}, {}
    for view, stream in (("image", cfg.data.image_caption), ("text", cfg.data.parallel_text)):
        caps[view] = int(stream.max_length)
        spec = dict(cfg.data.masking)
        if stream.max_masks is not None:
            spec["max_masks"] = stream.max_masks
        specs[view] = MaskingSpec.from_tokenizer(tokenizer, **spec)
    return caps, normalizer_for(cfg.model.text), specs


def reference_batch(dataset, texts: list[str]):
    """The reference's ``preprocess`` of each text and its ``collate_fn``: text_ids, text_atts,
    text_ids_masked, masked_pos, masked_ids as tensors."""
    return dataset.collate_fn([dataset.preprocess(t) for t in texts])


VIEW_TEXTS = {"image": CAPTIONS, "text": [t for pair in PAIRS for t in pair]}


def cclm_token_ids(collator, view: str) -> list[list[int]]:
    """Token ids (padding removed) of the view's texts in cclm's own batches: the captions through
    ``Collator.image_batch`` (with dummy images), the pairs through ``text_batch`` (side A, side B, ...)."""
    import numpy as np

    if view == "image":
        examples = [
            {"image": np.zeros((2, 2, 3), np.uint8), "text": t, "key": f"c{i}", "lang": "xx"}
            for i, t in enumerate(CAPTIONS)
        ]
        batch = collator.image_batch(examples, seed=0)
        parts = [(batch["text_ids"], batch["text_mask"])]
    else:
        examples = [
            {"text": a, "other": b, "key": f"p{i}", "lang": "xx", "other_lang": "yy"}
            for i, (a, b) in enumerate(PAIRS)
        ]
        batch = collator.text_batch(examples, seed=0)
        parts = [(batch["text_ids"], batch["text_mask"]), (batch["other_ids"], batch["other_mask"])]
    sides = [[row[m.bool()].tolist() for row, m in zip(ids, mask)] for ids, mask in parts]
    return [ids for texts in zip(*sides) for ids in texts]


def tokenizer_row(ref, ref_tokenizer, tokenizer) -> Row:
    """The tokenizer file as each side loads it, alone: the same ids for every raw and normalised text."""
    every = VIEW_TEXTS["image"] + VIEW_TEXTS["text"]
    every += [ref.utils.pre_caption(t, 1000) for t in every]
    differ = sum(
        ref_tokenizer.convert_tokens_to_ids(ref_tokenizer.tokenize(t))
        != tokenizer(t, add_special_tokens=False)["input_ids"]
        for t in every
    )
    return Row(
        f"tokenizer alone: ids of {len(every)} raw and normalised texts, rows that differ",
        "build_tokenizer",
        "load_tokenizer",
        float(differ),
        0.0,
    )


def normalised_row(ref, view: str, dataset, normalizer) -> Row:
    ref_norm = [ref.utils.pre_caption(t, dataset.max_words) for t in VIEW_TEXTS[view]]
    differ = sum(a != normalizer(t) for a, t in zip(ref_norm, VIEW_TEXTS[view]))
    return Row(
        f"{view} view: normalised texts that differ",
        f"max_words {dataset.max_words}",
        f"max_words {getattr(normalizer, 'keywords', {}).get('max_words', 'none')}",
        float(differ),
        None,
        "cclm_3m.yaml cuts every text at 64 words, the reference captions at 40: the texts longer than the cut "
        "differ here. Every word is at least one token, so a cut at or above the token cap never removes what "
        "the token cut keeps: the token ids (next row) must still be equal",
    )


def token_ids_row(view: str, dataset, collator, cap: int) -> Row:
    """The reference's ``preprocess`` (pre_caption, tokenize, [CLS] + tokens + [EOS] within max_tokens) against
    cclm's batches, text by text."""
    ref_ids = []
    for t in VIEW_TEXTS[view]:
        text_ids, text_atts = dataset.preprocess(t)[:2]
        ref_ids.append([i for i, a in zip(text_ids, text_atts) if a])
    ours = cclm_token_ids(collator, view)
    bad = [i for i, (a, b) in enumerate(zip(ref_ids, ours)) if a != b]
    note = ""
    if bad:
        i = bad[0]
        note = f"{view} text {i} {VIEW_TEXTS[view][i]!r}: reference {ref_ids[i]}, cclm {ours[i]}"
    return Row(
        f"{view} view: token ids of {len(ref_ids)} texts, rows that differ",
        f"max_tokens {dataset.max_tokens}",
        f"max_length {cap}",
        float(len(bad) + abs(len(ref_ids) - len(ours))),
        0.0,
        note,
    )


def caps_row(view: str, dataset, spec) -> Row:
    ref, ours = _caps_ref(dataset), _caps_ours(spec)
    return Row(
        f"{view} view: masking settings (mask_prob, max_masks, skipgram p/size)",
        ref,
        ours,
        float(ref != ours),
        0.0,
    )


def data_rows(ref, datasets, collator, normalizer, caps, specs) -> list[Row]:
    rows = [tokenizer_row(ref, datasets["image"].tokenizer, collator.tokenizer)]
    for view, dataset in datasets.items():
        rows.append(normalised_row(ref, view, dataset, normalizer))
        rows.append(token_ids_row(view, dataset, collator, caps[view]))
        rows.append(caps_row(view, dataset, specs[view]))
    return rows


def _caps_ref(dataset) -> str:
    g = dataset.mask_generator
    return f"{g.mask_prob}, {g.mask_max}, {g.skipgram_prb}/{g.skipgram_size}"


def _caps_ours(spec) -> str:
    return f"{spec.mask_prob}, {spec.max_masks}, {spec.skipgram_prob}/{spec.skipgram_size}"


# ----------------------------------------------------------------------------------------------- masking
def n_pred(length: int, mask_prob: float, max_masks: int) -> int:
    """The reference's masks per row (TextMaskingGenerator.__call__)."""
    return min(max_masks, max(1, int(round(length * mask_prob))))


def span_lengths(positions) -> list[int]:
    """Lengths of the runs of consecutive masked positions."""
    runs, last = [], None
    for p in sorted(positions):
        if last is not None and p == last + 1:
            runs[-1] += 1
        else:
            runs.append(1)
        last = p
    return runs


@dataclass
class MaskStats:
    """Counts over many masked rows of one side (reference or cclm)."""

    rows: int = 0
    off_count: int = 0  # rows whose number of masks is not the reference's n_pred
    masks: int = 0
    eos_masked: int = 0
    spans: Counter = field(default_factory=Counter)  # span length (4 = 4 or more) -> how many
    to_mask: int = 0
    to_random: int = 0
    kept: int = 0
    random_special: int = 0

    def add(self, length, positions, original, masked, mask_id, specials, expected) -> None:
        self.rows += 1
        self.off_count += len(positions) != expected
        self.masks += len(positions)
        self.eos_masked += (length - 1) in positions
        self.spans.update(min(n, 4) for n in span_lengths(positions))
        for p in positions:
            if masked[p] == mask_id:
                self.to_mask += 1
            elif masked[p] == original[p]:
                self.kept += 1
            else:
                self.to_random += 1
                self.random_special += masked[p] in specials

    def count(self, key: str) -> tuple[int, int]:
        """``(k, n)``: how many of how many (spans of a length among spans, rows with </s> masked among rows,
        masked positions replaced some way among masked positions, special tokens among random ones)."""
        if key.startswith("span"):
            return self.spans[int(key[-1])], sum(self.spans.values())
        if key == "eos_masked":
            return self.eos_masked, self.rows
        if key == "random_special":
            return self.random_special, self.to_random
        return getattr(self, key), self.masks


def masking_draws(dataset, spec, tokenizer, lengths, seed: int) -> tuple[MaskStats, MaskStats]:
    """Mask the same rows (random ordinary tokens between <s> and </s>, the given lengths) with the reference's
    TextMaskingGenerator and with cclm's mask_tokens; collect the statistics of both."""
    import torch

    from cclm.data.masking import mask_tokens

    specials = set(tokenizer.all_special_ids)
    ordinary = [i for i in range(len(tokenizer)) if i not in specials]
    rng = random.Random(seed)
    rows = [
        [tokenizer.cls_token_id] + rng.choices(ordinary, k=n - 2) + [tokenizer.sep_token_id] for n in lengths
    ]
    gen = dataset.mask_generator
    expected = [n_pred(n, gen.mask_prob, gen.mask_max) for n in lengths]
    mask_id = tokenizer.mask_token_id

    ref_stats = MaskStats()
    token_id = {token: i for i, token in gen.id2token.items()}
    random.seed(seed)  # the reference draws from Python's global random
    for row, want in zip(rows, expected):
        masked_tokens, positions = gen([gen.id2token[i] for i in row])
        masked = [token_id[t] for t in masked_tokens]
        ref_stats.add(len(row), positions, row, masked, mask_id, specials, want)

    width = max(lengths)
    ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows])
    attention = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    masked, labels = mask_tokens(ids, spec, torch.Generator().manual_seed(seed), attention_mask=attention)
    ours = MaskStats()
    for row, want, row_labels, row_masked in zip(rows, expected, labels.tolist(), masked.tolist()):
        positions = [p for p, label in enumerate(row_labels) if label != IGNORE_INDEX]
        ours.add(len(row), positions, row, row_masked, mask_id, specials, want)
    return ref_stats, ours


SHARES = (
    ("span1", "share of masked spans of length 1"),
    ("span2", "share of masked spans of length 2"),
    ("span3", "share of masked spans of length 3"),
    ("span4", "share of masked spans of length >= 4"),
    ("eos_masked", "share of rows with `</s>` masked"),
    ("to_mask", "masked positions -> `<mask>`"),
    ("to_random", "masked positions -> a random token"),
    ("kept", "masked positions -> kept"),
)
SPECIALS_NOTE = (
    "the reference draws random replacements from the whole vocabulary, its 5 special tokens included "
    "(get_random_word); cclm from the ordinary tokens only. With XLM-R's 250,002 tokens that is 2 in 100,000 "
    "replacements; with this tiny vocabulary it shows"
)


def share_row(title: str, ref: tuple[int, int], ours: tuple[int, int], sigmas: float = SIGMAS) -> Row:
    """Two shares k/n compared within ``sigmas`` standard errors of their difference (pooled binomial)."""
    a, b = ref[0] / max(1, ref[1]), ours[0] / max(1, ours[1])
    pooled = (ref[0] + ours[0]) / max(1, ref[1] + ours[1])
    error = math.sqrt(pooled * (1 - pooled) * (1 / max(1, ref[1]) + 1 / max(1, ours[1])))
    return Row(title, a, b, abs(a - b), sigmas * error)


def masking_rows(datasets: dict, specs: dict, tokenizer, seed: int) -> list[Row]:
    """Masking statistics of each view: the reference dataset's mask generator against cclm's spec."""
    rows = []
    for name, dataset in datasets.items():
        rng = random.Random(seed + 1)
        lengths = [rng.randint(2, dataset.max_tokens) for _ in range(MASKING_ROWS)]
        ref, ours = masking_draws(dataset, specs[name], tokenizer, lengths, seed)
        label = f"{name} view masking ({MASKING_ROWS} rows, lengths 2..{dataset.max_tokens})"
        rows.append(
            Row(
                f"{label}: rows whose mask count != min(max_masks, max(1, round(0.4 n)))",
                float(ref.off_count),
                float(ours.off_count),
                float(max(ref.off_count, ours.off_count)),
                0.0,
            )
        )
        a, b = ref.masks / ref.rows, ours.masks / ours.rows
        rows.append(Row(f"{label}: masks per row", a, b, abs(a - b), 1e-9))
        rows += [share_row(f"{label}: {title}", ref.count(key), ours.count(key)) for key, title in SHARES]
        special = share_row(
            f"{label}: random replacements that are special tokens",
            ref.count("random_special"),
            ours.count("random_special"),
        )
        special.tol, special.note = None, SPECIALS_NOTE
        rows.append(special)
    return rows


# ------------------------------------------------------------------------------------------------ losses
class ScriptedMultinomial:
    """Stands in for ``torch.multinomial(weights, 1)``: each row of ``weights`` (1-D: one row; 2-D: one per
    row) takes the inverse-CDF pick of the next of ``uniforms``, so two samplers fed the same uniforms in the
    same order draw the same indices from the same distributions. Records every normalised row and pick."""

    def __init__(self, uniforms: list[float]):
        self.uniforms = list(uniforms)
        self.next = 0
        self.rows: list = []
        self.picks: list[int] = []

    def __call__(self, weights, num_samples=1, replacement=False, *, generator=None, out=None):
        import torch

        if num_samples != 1:
            raise NotImplementedError("only one sample per row is scripted")
        w = weights.detach().double().reshape(-1, weights.shape[-1])
        picks = []
        for row in w / w.sum(dim=1, keepdim=True):
            u = torch.tensor([self.uniforms[self.next]], dtype=torch.float64)
            self.next += 1
            cdf = torch.cumsum(row, 0)
            picks.append(int(torch.searchsorted(cdf, u * cdf[-1]).clamp_max(len(row) - 1)))
            self.rows.append(row)
        self.picks += picks
        result = torch.tensor(picks, dtype=torch.long, device=weights.device)[:, None]
        return result[0] if weights.ndim == 1 else result


@contextlib.contextmanager
def scripted_multinomial(uniforms: list[float]):
    import torch

    sampler, original = ScriptedMultinomial(uniforms), torch.multinomial
    torch.multinomial = sampler
    try:
        yield sampler
    finally:
        torch.multinomial = original


def run_reference(model, uniforms, **inputs) -> tuple[dict, ScriptedMultinomial]:
    import torch

    with torch.no_grad(), scripted_multinomial(uniforms) as sampler:
        losses = model(**inputs)
    return {k: float(v) for k, v in losses.items()}, sampler


def run_cclm(model, batch, view, uniforms) -> tuple[dict, ScriptedMultinomial]:
    import torch

    with torch.no_grad(), scripted_multinomial(uniforms) as sampler:
        losses = model(batch, view)
    return {k: float(v) for k, v in losses.items()}, sampler


SAMPLING_NOTE = (
    "the reference adds 1e-5 to every softmax weight before zeroing the positive (models/xvlm.py "
    "get_matching_loss); cclm samples the softmax over the negatives as it is"
)


def sampler_rows(
    view: str, ref: ScriptedMultinomial, ours: ScriptedMultinomial, note: str = SAMPLING_NOTE
) -> list[Row]:
    same = sum(a == b for a, b in zip(ref.picks, ours.picks))
    rows = [
        Row(
            f"{view}: hard negatives drawn, indices that differ",
            f"{len(ref.picks)} draws",
            f"{len(ours.picks)} draws",
            float(max(len(ref.picks), len(ours.picks)) - same),
            0.0,
        )
    ]
    if len(ref.rows) == len(ours.rows):
        diff = max(float((a - b).abs().max()) for a, b in zip(ref.rows, ours.rows))
        rows.append(
            Row(
                f"{view}: hard-negative sampling distributions, max abs diff",
                "softmax + 1e-5",
                "softmax",
                diff,
                LOSS_TOL,
                note,
            )
        )
    return rows


def feature_rows(view: str, ref_model, cclm_model, inputs: dict, batch: dict) -> list[Row]:
    """The ITC/TTC features of both models (localises a loss difference)."""
    import torch

    rows = []
    with torch.no_grad():
        ref_text = ref_model.get_features(
            text_embeds=ref_model.get_text_embeds(inputs["text_ids"], inputs["text_atts"])
        )
        ours_text = cclm_model.encode_text(batch["text_ids"], batch["text_mask"])[1]
        pairs = [("text features (query side)", ref_text, ours_text)]
        if view == "image":
            ref_image = ref_model.get_features(image_embeds=ref_model.get_vision_embeds(inputs["image"])[0])
            pairs.append(("image features", ref_image, cclm_model.encode_image(batch["images"])[1]))
        elif view == "region":
            ref_regions, _, ref_whole = ref_model.get_vision_embeds(
                inputs["image"], image_atts=inputs["image_atts"], idx_to_group_img=inputs["idx_to_group_img"]
            )
            _, our_regions, our_whole = cclm_model.encode_regions(
                batch["images"], batch["idx_to_group_img"], batch["image_atts"]
            )
            pairs.append(
                ("pooled region features", ref_model.get_features(image_embeds=ref_regions), our_regions)
            )
            ref_text = ref_model.get_text_embeds(inputs["text_ids"], inputs["text_atts"])
            ref_box = ref_model.predict_bbox(ref_whole, ref_text, inputs["text_atts"])
            our_text = cclm_model.encode_text(batch["text_ids"], batch["text_mask"])[0]
            our_box = cclm_model.predict_boxes(our_text, batch["text_mask"], our_whole)
            pairs.append(("box predicted over the whole image (cxcywh)", ref_box, our_box))
        else:
            ref_other = ref_model.get_features(
                text_embeds=ref_model.get_text_embeds(inputs["text_ids_2"], inputs["text_atts_2"])
            )
            pairs.append(
                (
                    "text features (other side)",
                    ref_other,
                    cclm_model.encode_text(batch["other_ids"], batch["other_mask"])[1],
                )
            )
    for title, a, b in pairs:
        rows.append(Row(f"{view} view: {title}, max abs diff", "", "", float((a - b).abs().max()), LOSS_TOL))
    return rows


def reference_normalize(root: Path):
    """The ``transforms.Normalize`` of the reference's image transforms, read from its dataset/__init__.py."""
    from torchvision import transforms

    source = (root / "dataset" / "__init__.py").read_text()
    found = re.search(r"transforms\.Normalize\((\([^)]*\)),\s*(\([^)]*\))\)", source)
    if not found:
        raise ReferenceDirError(f"{root}/dataset/__init__.py: no transforms.Normalize((mean), (std)) found")
    mean, std = (ast.literal_eval(group) for group in found.groups())
    return transforms.Normalize(mean, std)


def image_inputs(root: Path, seed: int, batch_size: int):
    """Random 28 px images upsampled to 224 px as uint8 (cclm normalises them itself), and what the reference's
    transform ends with for each: ``ToTensor()`` of the PIL image, then its ``Normalize``."""
    import numpy as np
    import torch
    from PIL import Image
    from torchvision import transforms

    generator = torch.Generator().manual_seed(seed)
    size = SWIN["image_res"]
    small = torch.randint(0, 256, (batch_size, 3, 28, 28), generator=generator, dtype=torch.uint8)
    images = torch.nn.functional.interpolate(small.float(), size=(size, size), mode="bilinear")
    images = images.round().clamp(0, 255).to(torch.uint8)
    to_tensor, normalize = transforms.ToTensor(), reference_normalize(root)
    pil = [Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy())) for image in images]
    return images, torch.stack([normalize(to_tensor(p)) for p in pil])


def inner_pads(text_ids_masked, text_atts, pad_id: int) -> int:
    """How many ``<pad>`` ids sit at attended positions of a masked batch (the reference's random replacement
    draws from the whole vocabulary, ``<pad>`` included)."""
    return int(((text_ids_masked == pad_id) & (text_atts == 1)).sum())


def masked_reference_batch(dataset, texts: list[str], max_draws: int = 100) -> tuple[tuple, tuple | None]:
    """The reference's masked batch of ``texts`` (its preprocess and collate_fn), drawn again while its random
    replacement has put ``<pad>`` inside a text; returns it and the first batch so rejected (or None)."""
    pad_id = dataset.pad_token_id
    rejected = None
    for _ in range(max_draws):
        batch = reference_batch(dataset, texts)
        if not inner_pads(batch[2], batch[1], pad_id):
            return batch, rejected
        rejected = rejected or batch
    raise RuntimeError(f"{max_draws} masked batches in a row put <pad> inside a text")


def image_view_pair(masked: tuple, images: tuple) -> tuple[dict, dict]:
    """The keyword arguments of the reference's forward for a masked caption batch and its images, and the
    same batch in cclm's layout."""
    import torch

    text_ids, text_atts, ids_masked, masked_pos, masked_ids = masked
    uint8_images, float_images = images
    inputs = dict(
        image=float_images,
        text_ids=text_ids,
        text_atts=text_atts,
        text_ids_masked=ids_masked,
        masked_pos=masked_pos,
        masked_ids=masked_ids,
    )
    mlm_ids, mlm_labels = reference_mlm_to_cclm(ids_masked, masked_pos, masked_ids)
    batch = dict(
        images=uint8_images,
        text_ids=text_ids,
        text_mask=text_atts,
        mlm_ids=mlm_ids,
        mlm_labels=mlm_labels,
        group_ids=torch.arange(len(text_ids)),
    )
    return inputs, batch


def text_view_pair(masked: tuple, other: tuple) -> tuple[dict, dict]:
    """The same for parallel pairs: side A (masked) and side B (``other``: its text_ids, text_atts)."""
    import torch

    text_ids, text_atts, ids_masked, masked_pos, masked_ids = masked
    inputs = dict(
        image=None,
        text_ids=text_ids,
        text_atts=text_atts,
        text_ids_masked=ids_masked,
        masked_pos=masked_pos,
        masked_ids=masked_ids,
        text_ids_2=other[0],
        text_atts_2=other[1],
    )
    mlm_ids, mlm_labels = reference_mlm_to_cclm(ids_masked, masked_pos, masked_ids)
    batch = dict(
        text_ids=text_ids,
        text_mask=text_atts,
        mlm_ids=mlm_ids,
        mlm_labels=mlm_labels,
        other_ids=other[0],
        other_mask=other[1],
        group_ids=torch.arange(len(text_ids)),
    )
    return inputs, batch


REGION_IMAGES = (
    3  # the captions of a region batch point at these many images; the first caption of each is its
)
# whole-image caption


def region_view_pair(masked: tuple, images: tuple, seed: int) -> tuple[dict, dict]:
    """A region batch in both layouts: the masked captions over ``REGION_IMAGES`` images, each caption after
    the first ``REGION_IMAGES`` (whole-image captions) with a random box and its patch mask on the final Swin
    grid (cclm's ``patch_masks``, given to both models alike)."""
    import torch

    from cclm.data.regions import patch_masks
    from cclm.model.boxes import box_xyxy_to_cxcywh

    n = len(masked[0])
    generator = torch.Generator().manual_seed(seed)
    corner = torch.rand(n, 2, generator=generator) * 0.6
    boxes = torch.cat([corner, corner + 0.1 + 0.3 * torch.rand(n, 2, generator=generator)], dim=1)
    is_image = torch.arange(n) < REGION_IMAGES
    boxes[is_image] = torch.tensor([0.0, 0.0, 1.0, 1.0])
    grid = SWIN["image_res"] // 32  # patch 4, three patch mergings
    atts = patch_masks(boxes, grid, grid) | is_image[:, None]
    idx = torch.arange(n) % REGION_IMAGES
    inputs, batch = image_view_pair(masked, tuple(part[:REGION_IMAGES] for part in images))
    inputs.update(
        image_atts=atts.long(),
        idx_to_group_img=idx,
        target_bbox=box_xyxy_to_cxcywh(boxes),
        is_image=is_image.long(),
        ret_bbox_loss=True,
    )
    batch.update(idx_to_group_img=idx, boxes=boxes, is_image=is_image, image_atts=atts)
    return inputs, batch


def view_inputs(view: str, root: Path, dataset, seed: int):
    """``(inputs, batch)`` of a view, and the same for the first rejected masked batch (or None). The parallel
    pairs are side A = the first text, side B = the second, as ParaTextDataset yields a pair it did not swap."""
    random.seed(seed)  # the reference masks with Python's global random
    if view in ("image", "region"):
        masked, rejected = masked_reference_batch(dataset, CAPTIONS)
        images = image_inputs(root, seed, len(CAPTIONS))
        if view == "image":
            make = functools.partial(image_view_pair, images=images)
        else:
            make = functools.partial(region_view_pair, images=images, seed=seed)
    else:
        masked, rejected = masked_reference_batch(dataset, [p[0] for p in PAIRS])
        other = reference_batch(dataset, [p[1] for p in PAIRS])[:2]
        make = functools.partial(text_view_pair, other=other)
    return make(masked), (make(rejected) if rejected else None)


@contextlib.contextmanager
def positions_by_index(cclm_model):
    """Diagnosis only: cclm's text embeddings with position ids numbered by index (the reference's way) instead
    of HF XLM-R's numbering from the ids, in which a ``<pad>`` id takes no position."""
    import torch

    embeddings = cclm_model.text.embeddings
    original = embeddings.forward
    first = cclm_model.encoder_config.pad_token_id + 1

    def forward(input_ids=None, **kwargs):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device) + first
        kwargs.setdefault("position_ids", positions[None].expand_as(input_ids))
        return original(input_ids=input_ids, **kwargs)

    embeddings.forward = forward
    try:
        yield
    finally:
        del embeddings.forward


LOSS_KEYS = {
    "image": ("itc", "itm", "mlm"),
    "text": ("ttc", "ttm", "mlm"),
    "region": ("itc", "itm", "mlm", "bbox", "giou"),
}


def compare_view(view: str, ref_model, cclm_model, pair: tuple[dict, dict], rejected, uniforms) -> list[Row]:
    """Features, hard negatives and the three losses of one view, both models on the same inputs."""
    inputs, batch = pair
    ref_losses, ref_sampler = run_reference(ref_model, uniforms, **inputs)
    our_losses, our_sampler = run_cclm(cclm_model, batch, view, uniforms)
    rows = feature_rows(view, ref_model, cclm_model, inputs, batch)
    rows += sampler_rows(
        f"{view} view", ref_sampler, our_sampler, TTM_NOTE if view == "text" else SAMPLING_NOTE
    )
    for key in LOSS_KEYS[view]:
        a, c = ref_losses[f"loss_{key}"], our_losses[key]
        rows.append(Row(f"{view} view: {key.upper()} loss", a, c, abs(a - c), LOSS_TOL))
    if view == "text" and abs(ref_losses["loss_ttm"] - our_losses["ttm"]) > LOSS_TOL:
        rows += swapped_ttm_rows(cclm_model, batch, uniforms, ref_losses["loss_ttm"], ref_sampler)
    if rejected is not None:
        rows += inner_pad_rows(view, ref_model, cclm_model, rejected, uniforms)
    return rows


def inner_pad_rows(view: str, ref_model, cclm_model, rejected: tuple[dict, dict], uniforms) -> list[Row]:
    """Diagnosis of a masked batch with ``<pad>`` inside a text: its MLM loss on both sides, and on cclm's side
    again with positions numbered by index."""
    inputs, batch = rejected
    ref_mlm = run_reference(ref_model, uniforms, **inputs)[0]["loss_mlm"]
    ours = run_cclm(cclm_model, batch, view, uniforms)[0]["mlm"]
    with positions_by_index(cclm_model):
        by_index = run_cclm(cclm_model, batch, view, uniforms)[0]["mlm"]
    count = inner_pads(inputs["text_ids_masked"], inputs["text_atts"], cclm_model.encoder_config.pad_token_id)
    return [
        Row(
            f"{view} view: MLM loss of a masked batch with {count} `<pad>` inside a text (diagnosis)",
            ref_mlm,
            ours,
            abs(ref_mlm - ours),
            None,
            PAD_NOTE,
        ),
        Row(
            f"{view} view: the same, cclm positions numbered by index (diagnosis)",
            ref_mlm,
            by_index,
            abs(ref_mlm - by_index),
            None,
        ),
    ]


PAD_NOTE = (
    "the reference's random replacement (get_random_word) draws from the whole vocabulary, so it can put "
    "`<pad>` inside a text; cclm's never does (ordinary tokens only). cclm numbers text positions from the ids "
    "(HF XLM-R: a `<pad>` id takes no position and shifts the tokens after it), the reference by index, so on "
    "such a batch the MLM inputs differ from that token on (the next row: numbered by index, cclm matches). "
    "The tool therefore draws the reference's masking again until no `<pad>` lands inside a text and compares "
    "the losses on that batch. With XLM-R's vocabulary this is 1 in 250,002 random replacements"
)


def swapped_ttm_rows(cclm_model, batch: dict, uniforms, ref_ttm: float, ref_sampler) -> list[Row]:
    """Diagnosis of a TTM difference: cclm's TTM with the pair's sides swapped (side B as the fusion query,
    side A as its memory), without MLM."""
    swapped = dict(
        text_ids=batch["other_ids"],
        text_mask=batch["other_mask"],
        other_ids=batch["text_ids"],
        other_mask=batch["text_mask"],
        group_ids=batch["group_ids"],
    )
    losses, sampler = run_cclm(cclm_model, swapped, "text", uniforms)
    rows = sampler_rows("text view, cclm sides swapped (diagnosis)", ref_sampler, sampler)
    rows.append(
        Row(
            "text view: TTM loss, cclm with the sides swapped (diagnosis)",
            ref_ttm,
            losses["ttm"],
            abs(ref_ttm - losses["ttm"]),
            None,
            TTM_NOTE,
        )
    )
    return rows


TTM_NOTE = (
    "the reference's TTM, get_matching_loss(text_embeds, text_atts, text_feat, text_embeds_2, ...) "
    "(models/model_pretrain_cclm.py:99), passes side A where the image goes, so its fusion encoder reads side B "
    "as the query over side A's tokens and draws the first hard negatives from sim(B, A); its MLM masks side A "
    "over side B. cclm's TTM does the same (cross_view.py, text view); were they to differ, the diagnosis rows "
    "below would show cclm with the sides swapped"
)


def loss_rows(root: Path, ref_model, cclm_model, datasets, seed: int) -> list[Row]:
    import torch

    # the uniform numbers both samplers consume: two draws per row and view
    generator = torch.Generator().manual_seed(seed)
    uniforms = torch.rand(4 * len(CAPTIONS), generator=generator, dtype=torch.float64).tolist()
    rows = []
    for view in ("image", "text", "region"):
        pair, rejected = view_inputs(view, root, datasets["image" if view == "region" else view], seed)
        rows += compare_view(view, ref_model, cclm_model, pair, rejected, uniforms)
    return rows


# -------------------------------------------------------------------------------------------------- main
def run(root: Path, seed: int) -> tuple[list[Row], list[str]]:
    import torch

    from cclm.data.collate import Collator
    from cclm.data.tokenize import load_tokenizer

    warnings.filterwarnings("ignore", category=UserWarning)  # the reference's old torch/timm calls
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.manual_seed(seed)
    random.seed(seed)
    shims = install_shims()
    ref = import_reference(root)
    shims += patch_reference_classes(ref)
    with tempfile.TemporaryDirectory(prefix="cclm_compare_") as tmp:
        work = Path(tmp)
        cfg = reference_config(root, work)
        folder = write_tokenizer(work)
        tokenizer = load_tokenizer(str(folder))
        write_text_encoder(folder, len(tokenizer))
        write_vision_encoder(ref, cfg)
        datasets = reference_datasets(ref, cfg, work)
        caps, normalizer, specs = cclm_settings(tokenizer)
        collator = Collator(tokenizer, caps, specs, normalizer)
        rows = data_rows(ref, datasets, collator, normalizer, caps, specs)
        rows += masking_rows(datasets, specs, tokenizer, seed)
        ref_model = build_reference_model(ref, cfg, seed, shims)
        cclm_model, report = convert_to_cclm(ref_model)
        accounted = report.consumed + sum(len(keys) for keys in report.dropped.values())
        rows.append(
            Row(
                "converter (strict): reference tensors, and those consumed or dropped with a reason",
                float(report.source_tensors),
                float(accounted),
                float(abs(report.source_tensors - accounted)),
                0.0,
            )
        )
        with single_process_group(work):
            rows += loss_rows(root, ref_model, cclm_model, datasets, seed)
    return rows, shims


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tools/compare_reference.py",
        description="Compare cclm's data processing and losses with the CCLM reference code (zengyan-97/CCLM).",
    )
    parser.add_argument(
        "--reference-dir", required=True, help="a clone of https://github.com/zengyan-97/CCLM"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the report here (.json: machine-readable; else the text)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        root = check_reference_dir(args.reference_dir)
    except ReferenceDirError as err:
        print(f"compare_reference: {err}", file=sys.stderr)
        return 2
    try:
        rows, shims = run(root, args.seed)
    except ReferenceDirError as err:
        print(f"compare_reference: {err}", file=sys.stderr)
        return 2
    failed = [r for r in rows if r.status == "FAIL"]
    header = [
        f"reference: {root} (commit {reference_commit(root)}); cclm: {REPO}; seed {args.seed}",
        "shims applied to run the reference with this environment's libraries:",
        *[f"  - {shim}" for shim in shims or ["none"]],
        "",
    ]
    verdict = f"{len(failed)} of {len(rows)} rows FAIL" if failed else f"all {len(rows)} rows OK"
    text = "\n".join(header) + format_table(rows) + f"\n\n{verdict}\n"
    print(text)
    if args.out:
        out = Path(args.out)
        if out.suffix == ".json":
            payload = {
                "reference_dir": str(root),
                "reference_commit": reference_commit(root),
                "seed": args.seed,
                "shims": shims,
                "rows": [{**asdict(r), "status": r.status} for r in rows],
                "ok": not failed,
            }
            out.write_text(json.dumps(payload, indent=1, default=str))
        else:
            out.write_text(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
