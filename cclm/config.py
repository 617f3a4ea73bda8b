"""Typed configuration: OmegaConf structured configs built from dataclasses.

A run's config is composed in this order, later wins:
  1. the dataclass defaults;
  2. ``defaults:`` of the YAML file, a mapping ``group: name`` resolved to ``configs/<group>/<name>.yaml``
     (e.g. ``defaults: {model: tiny}``), or to a path when the name ends in ``.yaml``;
  3. the YAML file's own keys;
  4. command-line ``key=value`` overrides (dotted keys, YAML values), each key once; ``null`` for an entry of a
     mapping removes it (``data.test.ar=null`` drops Arabic).
A list key also takes one value or a comma list (``languages=de``, ``languages=de,fr``).
An unknown key, a value of the wrong type, or a list or a value where a section or a mapping belongs fails at load
time with a :class:`ConfigError` naming the full key (and the file) and, for unknown keys, the closest valid key.
Values out of range (a batch of 0, a negative weight decay) are refused by the ``check_*`` functions below, which
the workflows call before they touch data, process group or output folder.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from cclm.errors import UserError


def _config_root() -> Path:
    """The shipped configs: ``$CCLM_CONFIG_DIR``, else the source checkout's ``configs/``, else the copy an
    installed package puts under ``<prefix>/share/cclm/configs`` (setup.cfg ``data_files``)."""
    candidates = [
        Path(os.environ["CCLM_CONFIG_DIR"]) if os.environ.get("CCLM_CONFIG_DIR") else None,
        Path(__file__).resolve().parent.parent / "configs",
        Path(sys.prefix) / "share" / "cclm" / "configs",
    ]
    for candidate in candidates:
        if candidate is not None and (candidate / "model").is_dir():
            return candidate
    return candidates[1]


CONFIG_ROOT = _config_root()


class ConfigError(UserError, ValueError):
    """A configuration that cannot be used; the message names the offending key."""


# ------------------------------------------------------------------------------------------------ modes
# Every mode string is an Enum: OmegaConf checks it when the config is loaded (a typo fails naming the key and
# the allowed values). The str mix-in keeps comparisons with plain strings and JSON dumps working.
class Mode(str, Enum):
    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class RankTies(Mode):
    against = "against"  # a non-gold candidate scoring the same as the gold one ranks above it (strict)
    # equal scores in candidate order (a stable argsort); IGLUE's np.argsort(-scores) is not stable, its order on
    # exact ties unspecified: the two agree wherever the gold candidate ties nothing
    index = "index"


class Precision(Mode):
    auto = "auto"  # bf16 on a GPU that supports it, fp32 elsewhere
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class AttnImplementation(Mode):
    sdpa = "sdpa"
    eager = "eager"


# "global" is a Python keyword, hence the functional form.
Negatives = Mode("Negatives", {"local": "local", "global": "global"})
Negatives.__doc__ = "Where ITM/TTM hard negatives come from: this rank's batch or every rank's."


class ViewSchedule(Mode):
    alternate = "alternate"  # one optimizer step per view, the view drawn per step by the streams' weights
    interleave = "interleave"  # parallel text, then image-caption, strictly in turn (the CCLM reference)
    sum = "sum"  # both views summed in one step (X2-VLM)


class ScheduleCounting(Mode):
    updates = "updates"  # the schedule advances once per optimizer update; warm-up factor (u + 1) / warmup
    # once per iteration (one update of each view), warm-up factor i / warmup: the reference's LambdaLR
    iterations = "iterations"


class DecayRule(Mode):
    shape = "shape"  # matrices decay; biases, norms, the temperature and position tables do not
    reference = "reference"  # the reference's name rule (optim.py): all but names holding bias/LayerNorm/norm


class MaskRule(Mode):
    bernoulli = "bernoulli"  # each maskable token with probability mask_prob (BERT)
    count = "count"  # exactly min(max_masks, max(1, round(mask_prob x length))) positions (the reference)


class TextNormalize(Mode):
    none = "none"  # the tokenizer's own normalisation only: case and punctuation kept
    pre_caption = "pre_caption"  # the reference's: lower-case, punctuation to spaces, max_words words


class PositionIds(Mode):
    xlmr = "xlmr"  # the pretrained encoder's own numbering (XLM-R: positions from padding_idx + 1)
    # position i uses row i of the pretrained table (the reference's BertModel over XLM-R weights)
    reference = "reference"


class ContrastiveGrad(Mode):
    exact = "exact"  # the gradient of the global contrastive loss (open_clip)
    # the reference's all-gather backward: the local slice only, so after averaging 1/world of exact
    reference = "reference"


class OptimizerName(Mode):
    adamw = "adamw"


class ScheduleName(Mode):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class Protocol(Mode):
    zero_shot = "zero_shot"
    few_shot = "few_shot"
    translate_test = "translate_test"


class TaskName(Mode):
    xvnli = "xvnli"
    xgqa = "xgqa"
    marvl = "marvl"
    nlvr2 = "nlvr2"
    xflickrco = "xflickrco"
    flickr30k = "flickr30k"
    wit = "wit"
    multi30k = "multi30k"  # retrieval fine-tuning, the reference's JSON layout (cclm.tasks.retrieval_json)
    mscoco = "mscoco"
    easy_vqa = "easy_vqa"


class TaskHeadStyle(Mode):
    iglue = "iglue"  # IGLUE/VOLTA-style classifiers (answer classifier; two fused images concatenated)
    # the reference's: a generative answer decoder ranking the answer list (xGQA); fusion layers that
    # cross-attend to each of the two images in turn (MaRVL/NLVR2)
    cclm = "cclm"


class HeadInit(Mode):  # fine-tuning: how new task heads start
    normal = "normal"  # Linear weights normal(0, initializer_range), zero biases (the encoder's own init)
    # nn.Linear's own init (kaiming-uniform weights, uniform biases), as the reference's heads
    torch_default = "torch_default"


class DuplicateImages(Mode):
    # IGLUE's evaluation: images keyed on wit_ix (the lines that show one picture share it)
    iglue = "iglue"
    # the CCLM reference's: lines sharing an image file are one image with several captions
    merge = "merge"


class NoGoldLabel(Mode):  # XVNLI dev/test records labelled "-" (no annotator consensus)
    iglue = "iglue"  # kept and scored as wrong: IGLUE's denominator (1,164 records per test file)
    drop = "drop"  # left out, as the CCLM reference (1,150)


class SharedTestImages(Mode):  # few-shot: a training image path that the language's test file also names
    note = "note"  # warned about and listed in the run's row (MaRVL zh 10 and 10x2: 5 and 7 shared names)
    refuse = "refuse"  # the sweep stops before anything trains


class SelectOn(Mode):
    dev = "dev"  # few-shot: the learning rate and step are selected on the dev set (default)
    # the reference's few-shot configs select on the target-language TEST file: only to compare with the
    # published few-shot numbers; results are labelled as selected on test
    test = "test"


class StudentPart(Mode):
    text = "text"
    fusion = "fusion"
    head = "head"


class ClsLoss(Mode):  # cViL: how the student's fused [CLS] is pulled to the teacher's
    mse = "mse"
    cosine = "cosine"  # 1 - cosine similarity


class TagSourceName(Mode):  # cViL object tags (cclm.recipes.object_tags)
    easy_vqa_detector = "easy_vqa_detector"
    annotations = "annotations"


class UnlistedShards(Mode):
    warn = "warn"  # read a shard that no manifest.json lists, with a warning naming it
    refuse = "refuse"  # fail naming it (a converter that died part-way leaves such shards)


class RetrievalFormat(Mode):
    lines = "lines"
    json = "json"
    id_tsv = "id_tsv"
    xm3600 = "xm3600"
    demo_world = "demo_world"
    python = "python"  # a reader of your own: ``loader: MODULE:FUNCTION``


# ---------------------------------------------------------------------------------------------------- model
@dataclass
class VisionConfig:
    # open_clip model name ("ViT-B-16", "ViT-L-14", "swin_base_patch4_window7_224"-style timm configs, or
    # "hf-hub:org/repo" / "local-dir:/path"). Ignored when `tower` is given.
    name: str = "ViT-B-16"
    # open_clip pretrained tag ("openai", "laion2b_s34b_b88k") or a local checkpoint path; None = random init.
    pretrained: str | None = None
    # open_clip CLIPVisionCfg fields for a custom, randomly initialised tower (e.g. the tiny test model).
    tower: dict[str, Any] = field(default_factory=dict)
    image_size: int = 224


@dataclass
class TextConfig:
    # HF hub name or local folder of an XLM-R-style encoder; None = random init from `encoder`.
    name_or_path: str | None = None
    # XLMRobertaConfig fields: the whole config for random init, or overrides for a pretrained one.
    encoder: dict[str, Any] = field(default_factory=dict)
    # HF tokenizer (hub name or folder); None = same as name_or_path.
    tokenizer: str | None = None
    # Which pretrained encoder layers fill the text-only stack and the fusion stack (with cross-attention).
    # The defaults take layers 0-5 and 6-11. The CCLM reference takes every other layer of xlm-roberta-large:
    # text [1,3,5,7,9,11], fusion [13,15,...,23] (models/xvlm.py, `mapper`).
    text_layers: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5])
    fusion_layers: list[int] = field(default_factory=lambda: [6, 7, 8, 9, 10, 11])
    max_length: int = 40
    # Text normalisation before tokenising, saved with the model: pretraining, fine-tuning, evaluation, search
    # and inference all apply the one the model was trained with (cclm.data.normalize).
    normalize: TextNormalize = TextNormalize.none
    max_words: int = 0  # pre_caption: keep the first N whitespace words (0 = all)
    # How the pretrained position table is read when training starts from name_or_path (a saved cclm model
    # keeps the table as it was trained, whatever this says).
    position_ids: PositionIds = PositionIds.xlmr


@dataclass
class ObjectiveConfig:
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    mlm_weight: float = 1.0
    # Contrastive loss over features gathered from all ranks (with gradient). local_loss: each rank scores its
    # own rows against all columns (open_clip's memory-saving option); the averaged gradient is the same.
    gather_features: bool = True
    local_loss: bool = False
    # Hard negatives for ITM/TTM drawn from this rank's batch ("local") or from all ranks ("global").
    itm_negatives: Negatives = Negatives("local")
    contrastive_grad: ContrastiveGrad = ContrastiveGrad.exact
    # The temperature is clamped in place to [temp_min, temp_max] before each forward (as the reference).
    temp_min: float = 0.001
    temp_max: float = 0.5
    # The box head on the fused [CLS] (the reference's bbox_head, CCLM-4M), trained with L1 + GIoU on region
    # batches (data.regions) and used by grounding (cclm ground).
    bbox: bool = False
    # Cross-lingual consistency (a cclm extension, off in the reference recipe; docs/regions.md): each region
    # batch also carries a batch of parallel pairs, each pair put over one of the batch's images, and the fused
    # [CLS] of side B is pulled to the stop-gradient fused [CLS] of side A by MSE with this weight (sides as for
    # text steps: data.swap_parallel swaps them at random). Needs data.regions and data.parallel_text.
    xlc_weight: float = 0.0


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 256
    temp: float = 0.07
    # The HF text/fusion layers' attention implementation.
    attn_implementation: AttnImplementation = AttnImplementation.sdpa
    # torch.compile the vision, text and fusion layers when training (cclm.runtime.compile): for long GPU runs
    # under ZeRO 0-2, after `make bench-gpu` shows a gain; off on CPU (minutes of compiling, no gain measured).
    compile: bool = False
    objectives: ObjectiveConfig = field(default_factory=ObjectiveConfig)


# ----------------------------------------------------------------------------------------------------- data
@dataclass
class MaskingConfig:
    rule: MaskRule = MaskRule.bernoulli
    mask_prob: float = 0.4
    mask_token_frac: float = 0.8  # of the chosen positions, replaced by <mask>
    random_token_frac: float = 0.1  # replaced by a random token; the rest keep the original token
    max_masks: int | None = None  # cap per sequence (a uniform subset of the chosen positions is kept)
    span: bool = False  # whole spans (geometric lengths) instead of independent tokens
    span_mean_length: float = 3.0
    # rule=count: a chosen position starts an n-gram of 2..skipgram_size tokens with this probability
    skipgram_prob: float = 0.0
    skipgram_size: int = 3


@dataclass
class StreamConfig:
    # Brace-expandable shard pattern(s), local paths, "pipe:" commands or fsspec URLs; several joined by "::".
    shards: str = MISSING
    # Weight of this stream in the mixture (batches of this view per batch of the other).
    weight: float = 1.0
    batch_size: int = 32
    # Languages to read; empty = all. Captions in other languages are skipped (counted).
    languages: list[str] = field(default_factory=list)
    # Token cap and MLM mask cap of this view (None: model.text.max_length, data.masking.max_masks).
    max_length: int | None = None
    max_masks: int | None = None


@dataclass
class RegionsConfig:
    """Region batches of multi-grained pretraining (the reference's ``regions:`` block, CCLM-4M; docs/regions.md).
    Values are checked by :func:`check_regions_config`."""

    # Region shards (image-caption shards whose samples carry ``regions``), as StreamConfig.shards.
    shards: str = MISSING
    prob: float = 0.5  # an image step is a region batch with this probability (Pretrain.py: 0.5)
    batch_size: int = 128  # region-text pairs per batch, drawn from the targets of max_images images
    max_images: int = 48  # images per region batch, each encoded once
    max_regions: int = 5  # targets per image (the whole-image caption counts as one)
    min_perc_in_image: float = 0.5  # a region is a target only when more than this fraction is in the crop
    hflip: bool = True
    careful_hflip: bool = True  # no flip when any caption of the image names a side
    languages: list[str] = field(default_factory=list)  # region captions to read; empty = all
    # an attribute may come from another language than its caption (the reference: true)
    code_switch: bool = False
    # token cap (None: the image-caption stream's); region texts are masked as captions (its max_masks)
    max_length: int | None = None


def check_regions_config(regions: Any, key: str = "data.regions") -> None:
    """Fail naming the key of the first value a region stream cannot use."""
    if not 0 < regions.prob <= 1:
        raise ConfigError(f"config key '{key}.prob' must be in (0, 1], got {regions.prob}")
    for name in ("batch_size", "max_images", "max_regions"):
        if getattr(regions, name) < 1:
            raise ConfigError(f"config key '{key}.{name}' must be >= 1, got {getattr(regions, name)}")
    if not 0 <= regions.min_perc_in_image < 1:
        raise ConfigError(
            f"config key '{key}.min_perc_in_image' must be in [0, 1), got {regions.min_perc_in_image}"
        )
    if regions.max_length is not None and regions.max_length < 3:
        raise ConfigError(f"config key '{key}.max_length' must be >= 3 (or null), got {regions.max_length}")


@dataclass
class DataConfig:
    image_caption: StreamConfig | None = None
    parallel_text: StreamConfig | None = None
    regions: RegionsConfig | None = None  # region batches (CCLM-4M); None = off
    num_workers: int = 2
    shard_shuffle: bool = True
    sample_shuffle_buffer: int = 1000
    # Resampled mode draws shards with replacement (infinite stream, for multi-node runs).
    resampled: bool = False
    randaugment: bool = False
    randaugment_ops: int = 2  # operations per image
    randaugment_magnitude: int = 7  # of 10 (the reference's RandomAugment(2, 7))
    hflip: bool = True
    # no flip for a caption that says left or right (the reference flips every image-caption pair)
    hflip_careful: bool = True
    crop_scale_min: float = 0.5
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    # Randomly swap source/target of parallel pairs so both directions are learned.
    swap_parallel: bool = True
    # Shards that no manifest.json beside them lists (an unfinished conversion): warn and read, or refuse.
    unlisted_shards: UnlistedShards = UnlistedShards.warn


# ---------------------------------------------------------------------------------------------------- train
@dataclass
class OptimizerConfig:
    name: OptimizerName = OptimizerName.adamw
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    # Learning-rate multiplier for parameters that are newly initialised (cross-attention, heads, projections).
    new_param_lr_mult: float = 1.0
    decay_rule: DecayRule = DecayRule.shape


@dataclass
class SchedulerConfig:
    name: ScheduleName = ScheduleName.cosine
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0: this fraction of the run warms up
    min_lr_ratio: float = 0.0  # in [0, 1]: the decay ends at this fraction of the learning rate
    counting: ScheduleCounting = ScheduleCounting.updates


@dataclass
class TrainConfig:
    max_steps: int = 1000
    # > 0: the run's length instead of max_steps, as the reference counts it: epochs x ceil(N / (batch x
    # world)) iterations, N the image-caption samples in the shards' manifests (or dataset_size when > 0).
    epochs: float = 0.0
    dataset_size: int = 0
    seed: int = 42
    log_every: int = 10
    save_every: int = 500
    eval_every: int = 0  # 0 = no periodic evaluation
    keep_last: int = 3  # complete checkpoints kept; 0 = every one
    grad_clip: float = 1.0  # max gradient norm; 0 = no clipping
    grad_accum: int = 1
    # "alternate": one optimizer step per view (CCLM); "sum": both views summed in one step (X2-VLM).
    view_schedule: ViewSchedule = ViewSchedule.alternate
    activation_checkpointing: bool = False
    # A rank that has not finished a step this long ends the job (every rank exits naming it); also the
    # timeout of collectives. A step slower than stall_factor x the running median logs which rank is behind.
    collective_timeout_s: float = 1800.0
    stall_factor: float = 20.0
    # SIGUSR1 and the time limit are acted on within about this many seconds (and at log steps): keep it well
    # under the --signal lead of a SLURM job
    stop_check_s: float = 30.0
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass
class DeepSpeedConfig:
    # None = take it from `config_file`, else ZeRO stage 0 / precision auto.
    zero_stage: int | None = None
    precision: Precision | None = None  # auto = bf16 on a GPU with bf16, fp32 elsewhere
    offload_optimizer: bool = False
    offload_params: bool = False
    # Raw DeepSpeed JSON file merged under the generated config (keys above win); without "optimizer" or
    # "scheduler" sections (cclm builds those from train.optimizer / train.scheduler).
    config_file: str | None = None


@dataclass
class EvalConfig:
    k_test: int = 128
    batch_size: int = 64
    rerank: bool = True  # ITM re-ranking of the top-k (False: ITC only)
    itc_weight_in_rerank: float = 0.0  # score = itm + w * itc for the re-ranked candidates
    # name -> folder of held-out retrieval sets used for periodic evaluation during pretraining
    datasets: dict[str, str] = field(default_factory=dict)
    rerank_batch_size: int = 256  # (image, caption) pairs per ITM forward, pooled across queries
    num_workers: int = 0  # image-loading workers
    precision: Precision = Precision.auto  # auto: bf16 autocast on GPU, fp32 on CPU
    periodic_rerank: bool = False  # periodic evaluation during pretraining: ITC only unless True (slower)
    ties: RankTies = (
        RankTies.against
    )  # equal scores (duplicate captions): the configs of IGLUE sets use index
    languages: list[str] = field(
        default_factory=list
    )  # periodic evaluation: languages to score (empty = all)


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "output"
    resume: str | None = None  # None, "auto", or a checkpoint folder
    # A fresh run (no resume) into an output_dir holding a run is refused unless True: the old run is moved
    # aside to <output_dir>.old-<time>, never deleted.
    overwrite: bool = False
    # Continued pretraining: a cclm model folder, a released model's name or hf-hub:ORG/NAME (`cclm pretrain`
    # fetches it once) whose weights start the run (its model config must match `model`; parameters it lacks,
    # e.g. a box head, start fresh and are logged). Optimizer and data start anew.
    init_from: str | None = None


# ------------------------------------------------------------------------------------------------ retrieval
@dataclass
class RetrievalDataConfig:
    """A retrieval benchmark's files (read by :mod:`cclm.evaluation.datasets`)."""

    format: RetrievalFormat = MISSING
    root: str = MISSING  # folder of the annotation files; relative file names below resolve against it
    image_root: str | None = None  # folder of the images (default: root)
    languages: list[str] = field(default_factory=list)  # empty = every language the files provide
    images_file: str | None = None  # lines: one image path (relative to image_root) per line
    captions: dict[str, list[str]] = field(default_factory=dict)  # lines / json / id_tsv: lang -> file(s)
    split_file: str | None = None  # id_tsv: image ids of the split, one per line (default: every id)
    image_template: str = "{id}.jpg"  # id_tsv: image path from its id; {coco_split} = train2014/val2014
    folds: int = 1  # report the mean over this many consecutive image folds (MSCOCO 1k: 5)
    max_images: int = 0  # > 0: first N images only (smoke runs; never for reported numbers)
    loader: str | None = None  # format python: MODULE:FUNCTION, called as FUNCTION(data_cfg, lang)
    options: dict[str, Any] = field(default_factory=dict)  # extra arguments of a python loader


@dataclass
class RetrievalRunConfig:
    """``cclm evaluate retrieval``: one benchmark, one model."""

    name: str = "retrieval"  # names the results files
    checkpoint: str = MISSING  # model folder (CrossViewModel.save_pretrained)
    tokenizer: str | None = None  # default: the checkpoint folder
    languages: list[str] = field(default_factory=list)  # shortcut for data.languages
    english_name: str = "en"  # excluded from the "mean (non-English)" row
    data: RetrievalDataConfig = field(default_factory=RetrievalDataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    image_size: int = 0  # 0 = the model's training resolution
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    output_dir: str = "results/retrieval"
    # <output_dir>/<name>.json of another model is refused; true moves it to <name>.old-<time>.json
    overwrite: bool = False


# ------------------------------------------------------------------------------------------------- finetune
@dataclass
class FinetuneDataConfig:
    # Folder of the task's annotation files (IGLUE: its datasets/ folder as laid out upstream); YAML paths
    # interpolate it. The same key as a retrieval benchmark's ``data.root`` (``cclm evaluate retrieval``).
    root: str = "data/iglue"
    train: list[str] = field(default_factory=list)  # English training files (zero-shot)
    dev: list[str] = field(default_factory=list)  # English dev files: model selection, never test
    test: dict[str, str] = field(default_factory=dict)  # language -> test file, in IGLUE's column order
    translate_test: dict[str, str] = field(default_factory=dict)  # language -> machine-translated test file
    few_shot_train: dict[str, str] = field(default_factory=dict)  # language -> train_<N> file
    few_shot_dev: dict[str, str] = field(default_factory=dict)  # language -> dev file (default: `dev`)
    label_vocab: str | None = None  # xGQA: trainval_ans2label.json
    # Image folders by name, as users download them (flickr30k, coco, gqa, marvl, nlvr2, wit).
    image_roots: dict[str, str] = field(default_factory=dict)
    # Read at most this many examples per file (0 = all); for smoke runs, never for reported numbers.
    max_examples: int = 0
    # > 0: model selection reads the first N examples (retrieval: images) of each dev file (data.dev,
    # few_shot_dev), as IGLUE's few-shot MaRVL runs stop their unshuffled dev loader early; 0 = all
    dev_max_examples: int = 0
    # Retrieval tasks (WIT, xFlickr&CO): what lines that share an image are.
    duplicate_images: DuplicateImages = DuplicateImages.iglue
    # XVNLI's dev/test records without a gold label ("-"): scored as wrong (IGLUE) or dropped (the reference)
    no_gold_label: NoGoldLabel = NoGoldLabel.iglue
    # few-shot: a training image path that the language's test file also names (noted in the row, or refused)
    shared_test_images: SharedTestImages = SharedTestImages.note
    # Training-image augmentation (the reference fine-tunes with crop 0.5-1, flip, RandomAugment(2, 7)).
    augment: bool = False
    crop_scale_min: float = 0.5
    hflip: bool = True
    # no flip when the text names a side (or the label: xGQA's answers); false: the reference's flips (every image
    # with p 1/2; xGQA: not when the question or answer holds "left" or "right")
    hflip_careful: bool = True
    randaugment: bool = True  # with augment
    # > 0: token cap of the task's texts (the reference uses 80 for some tasks); 0 = the model's max_length
    max_length: int = 0


@dataclass
class FinetuneTrainConfig:
    epochs: int = 10
    max_steps: int = 0  # > 0 stops earlier than `epochs`
    batch_size: int = 32
    # few-shot: the batch size of each shot count ("1": 2, "10x2": 32, as IGLUE scales it); others: batch_size
    batch_size_by_shots: dict[str, int] = field(default_factory=dict)
    lr: float = 2e-5
    lr_sweep: list[float] = field(default_factory=lambda: [1e-5, 5e-5, 1e-4])  # few-shot: best on dev wins
    head_lr_mult: float = 5.0  # the newly initialised task head learns faster
    weight_decay: float = 0.01
    # which parameters decay: shape (matrices) or reference (by name: also the temperature and heads' LayerNorms)
    decay_rule: DecayRule = DecayRule.shape
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    select_on: SelectOn = SelectOn.dev
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0  # 0 = no clipping
    eval_every: int = 0  # steps between dev evaluations; 0 = once per epoch
    log_every: int = 10
    save_every: int = 0  # > 0: a checkpoint every N steps (resume=auto continues from the newest)
    keep_last: int = 2  # 0 = every checkpoint
    seed: int = 42
    device: str = "auto"  # auto (this process's GPU, else CPU) | cpu | cuda | cuda:N
    num_workers: int = 0
    time_limit_minutes: float = 0.0  # > 0 stops training after this much wall time
    threads: int = 0  # torch CPU threads (0 = torch default); small models on a busy CPU run best with 1
    collective_timeout_s: float = 1800.0  # as TrainConfig
    stall_factor: float = 20.0


@dataclass
class FinetuneEvalConfig:
    batch_size: int = 64
    k_test: int = 128  # retrieval: ITC candidates re-ranked by ITM; answer decoder: answers scored in full
    # answer decoder (head: cclm): add the first token's log-probability a second time, as the reference's
    # rank_answer (ALBEF's) does; off = the answer's log-likelihood
    first_token_twice: bool = False


@dataclass
class DomainPretrainConfig:
    """The CCLM reference's NLVR domain pretraining (``NLVR_pretrain.py``, ``NLVR_multilingual_pretrain_O1.yaml``)
    of MaRVL / NLVR2 with ``head: cclm``: text assignment (:class:`cclm.tasks.nlvr_fusion.TextAssignment`) on
    image-caption shards before fine-tuning, at the pretrained model's image size (the reference: 224 px, then
    fine-tuning at 384). Off unless ``steps`` > 0."""

    # the reference: 2 epochs of CC3M with UC2's translations (2,838,361 pairs) at 1,024 per step = 5,544 steps
    steps: int = 0
    lr: float = 3e-5  # optimizer: {lr: 3e-5, weight_decay: 0.01, lr_mult: 2}; weight decay and betas: train.*
    head_lr_mult: float = 2.0  # the text-assignment head
    warmup_ratio: float = 0.1
    log_every: int = 50
    # the shards: data.image_caption (the pretraining layout, batch_size 128 per GPU in the reference; max_length 40)
    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class FinetuneConfig:
    task: TaskName = MISSING
    protocol: Protocol = Protocol.zero_shot
    # only these languages' test / translate-test / few-shot files (empty = every language the config names)
    languages: list[str] = field(default_factory=list)
    # cclm model folder to fine-tune from (zero-shot), or a released model's name / hf-hub:ORG/NAME (`cclm finetune`
    # fetches it once); None = random init from `model`
    pretrained: str | None = None
    checkpoint: str | None = None  # fine-tuned task model folder (few-shot start, evaluation)
    model: str | None = None  # model config yaml for a random init when `pretrained` is None
    tokenizer: str | None = None  # random init only: tokenizer folder; None = train one on the training texts
    model_overrides: list[str] = field(default_factory=list)  # random init only: key=value on the model yaml
    # > 0: fine-tune and evaluate at this image size; the vision tower's position tables are interpolated (the
    # reference fine-tunes at 384 px, Swin windows 7 -> 12). 0 = the pretrained model's size.
    image_size: int = 0
    window_size: int = 0  # Swin: the window at image_size (0 = scaled with the image: 7 at 224 -> 12 at 384)
    head: TaskHeadStyle = TaskHeadStyle.iglue
    # how new heads start (task classifiers, the NLVR text-assignment head); torch_default: the reference's
    head_init: HeadInit = HeadInit.normal
    output_dir: str = "output/finetune"
    resume: str | None = None  # "auto": continue from the newest checkpoint of output_dir (train.save_every)
    overwrite: bool = False  # as PretrainConfig
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    eval: FinetuneEvalConfig = field(default_factory=FinetuneEvalConfig)
    # ZeRO stage and precision of training (precision also sets evaluation's autocast).
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    domain_pretrain: DomainPretrainConfig = field(default_factory=DomainPretrainConfig)


# -------------------------------------------------------------------------------------------------- recipes
@dataclass
class ClipConfig:
    # open_clip model name ("ViT-B-32", "hf-hub:org/repo", "local-dir:/path"); with `model_cfg` only a label.
    name: str = "ViT-B-32"
    # open_clip pretrained tag ("openai", "laion2b_s34b_b79k") or a local checkpoint file (.safetensors/.pt).
    pretrained: str | None = None
    # A full open_clip model config ({embed_dim, vision_cfg, text_cfg}) for a custom CLIP; empty = `name`.
    model_cfg: dict[str, Any] = field(default_factory=dict)
    # open_clip tokenizer name for the English path; None = the model's own (SimpleTokenizer for model_cfg).
    tokenizer: str | None = None


@dataclass
class MLAEmbeddingConfig:
    tokenizer: str = MISSING  # HF multilingual tokenizer (hub name or folder)
    # HF model whose input word embeddings initialise the table (e.g. "bert-base-multilingual-cased").
    init_from: str | None = None
    dim: int = 0  # table width for a random init; 0 = the CLIP text width (ignored with init_from)
    max_length: int = 64  # token cap of non-English text (also capped at the CLIP context length)


class AcquirerActivation(Mode):  # MLA acquirers: the hidden activation
    relu = "relu"  # as MLA's released code (Linear -> ReLU -> Linear)
    gelu = "gelu"


class ClipPart(Mode):  # MLA's English fine-tuning: which CLIP towers train
    text = "text"
    vision = "vision"


@dataclass
class MLAAdapterConfig:
    bottleneck: int = 64  # the acquirer's hidden width (MLA's released code: 256 for ViT-B/32's 512)
    shared: bool = True  # one acquirer set for all new languages; False = one set per language
    activation: AcquirerActivation = AcquirerActivation.relu
    layer_norm: bool = False  # a LayerNorm before the down-projection (not in MLA's released code)


@dataclass
class MLAStageConfig:
    steps: int = 1000
    lr: float | None = None  # None = train.optimizer.lr


@dataclass
class MLANltConfig(MLAStageConfig):
    """Stage 1, Native Language Transfer: translation -> the frozen English text feature."""

    mse_weight: float = 1.0
    layerwise_weight: float = 0.0  # MSE of every block's pooled state too (0 = off)
    infonce_weight: float = 0.0  # plus a contrastive term between translations and English features


@dataclass
class MLALeConfig(MLAStageConfig):
    """Stage 2, Language Exposure: target-language captions vs frozen image features (InfoNCE)."""

    train_embedding: bool = False  # the multilingual embedding trains here too (False: acquirers only)


@dataclass
class MLAFinetuneEnConfig(MLAStageConfig):
    """Downstream stage 1: the CLIP itself fine-tuned on the English captions of the retrieval data."""

    steps: int = 0  # 0 = off
    trainable: list[ClipPart] = field(default_factory=lambda: [ClipPart.text, ClipPart.vision])


@dataclass
class MLAFinetuneAllConfig(MLAStageConfig):
    """Downstream stage 2: the acquirers on every new language's captions, over the English-fine-tuned CLIP."""

    steps: int = 0  # 0 = off
    train_embedding: bool = False  # as le.train_embedding


@dataclass
class MLAFinetuneConfig:
    # Image-caption shards of the retrieval training set (Multi30K in the paper), captions keyed by language.
    data: StreamConfig | None = None
    en: MLAFinetuneEnConfig = field(default_factory=MLAFinetuneEnConfig)
    all: MLAFinetuneAllConfig = field(default_factory=MLAFinetuneAllConfig)


@dataclass
class EnglishClipConfig:
    """``cclm recipe english-clip``: fit the CLIP of ``clip.model_cfg`` from scratch on English captions
    (``data.image_caption``) and write it to ``clip.pretrained`` (the synthetic world's starting point)."""

    steps: int = 300
    lr: float = 2.0e-3
    batch_size: int = 64
    weight_decay: float = 0.05


@dataclass
class RecipeEvalConfig:
    # name -> folder of held-out retrieval sets (demo_world format: <folder>/<lang>/retrieval.jsonl)
    retrieval: dict[str, str] = field(default_factory=dict)
    batch_size: int = 64


@dataclass
class MLARecipeConfig:
    clip: ClipConfig = field(default_factory=ClipConfig)
    embedding: MLAEmbeddingConfig = field(default_factory=MLAEmbeddingConfig)
    adapters: MLAAdapterConfig = field(default_factory=MLAAdapterConfig)
    source_language: str = "en"  # the language the CLIP knows
    languages: list[str] = MISSING  # new languages to acquire
    nlt: MLANltConfig = field(default_factory=MLANltConfig)
    le: MLALeConfig = field(default_factory=MLALeConfig)
    finetune: MLAFinetuneConfig = field(default_factory=MLAFinetuneConfig)  # downstream retrieval stages
    english_clip: EnglishClipConfig = field(default_factory=EnglishClipConfig)
    # torch CPU threads: 0 = OMP_NUM_THREADS if set, else half the cores up to 8 (a shared machine stays usable)
    threads: int = 0
    # parallel_text (source <-> new languages) feeds stage 1, image_caption (new-language captions) stage 2.
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)  # optimizer/schedule/logging; steps per stage
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: RecipeEvalConfig = field(default_factory=RecipeEvalConfig)
    output_dir: str = "output/mla"
    overwrite: bool = False  # a stage folder holding a run is refused unless True (then moved aside)
    # "auto": continue an interrupted run, each stage from the newest checkpoint of its folder (train.save_every)
    resume: str | None = None
    world: str = "data/world"  # a data root that YAML paths may interpolate as ${world}


@dataclass
class CViLDataConfig:
    task: TaskName = TaskName.xvnli  # a classification task (xvnli, xgqa, marvl, easy_vqa)
    train: str = MISSING  # the English training file the teacher was fine-tuned on (distillation inputs)
    # language -> the same training file translated (aligned with `train` by example id): parallel sentences
    parallel: dict[str, str] = field(default_factory=dict)
    test: dict[str, str] = field(default_factory=dict)  # language -> test file (English scores the teacher)
    image_roots: dict[str, str] = field(default_factory=dict)
    label_vocab: str | None = None  # xGQA: trainval_ans2label.json
    max_examples: int = 0  # > 0: first N examples per file (smoke runs only)


@dataclass
class CViLDistillConfig:
    temperature: float = 2.0
    kl_weight: float = 1.0  # KL(teacher || student) on task logits at `temperature` (x T^2)
    cls_weight: float = 1.0  # weight of the fused-[CLS] term
    cls_loss: ClsLoss = ClsLoss.mse  # the fused-[CLS] term: MSE or 1 - cosine
    epochs: int = 10  # passes over the parallel sentences (learning rate: train.optimizer.lr)
    steps: int = 0  # > 0: this many steps instead of `epochs`
    batch_size: int = 32
    # Student parts that train; the vision side is always the teacher's, frozen.
    trainable: list[StudentPart] = field(
        default_factory=lambda: [StudentPart.text, StudentPart.fusion, StudentPart.head]
    )


@dataclass
class CViLRecipeConfig:
    teacher: str = MISSING  # fine-tuned English task folder (cclm finetune output: <output_dir>/model)
    # Student text side: None = start from the teacher; else a cclm model folder (e.g. multilingual pretrained)
    student_init: str | None = None
    languages: list[str] = MISSING  # target languages
    data: CViLDataConfig = field(default_factory=CViLDataConfig)
    distill: CViLDistillConfig = field(default_factory=CViLDistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)  # seed, logging, checkpoints, optimizer details
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    output_dir: str = "output/cvil"
    overwrite: bool = False  # as the MLA recipe
    resume: str | None = None  # as the MLA recipe
    world: str = "data/world"  # a data root that YAML paths may interpolate as ${world}


@dataclass
class ObjectTagsConfig:
    """OSCAR+-style object tags appended to the text input (``question </s></s> tags``)."""

    enabled: bool = False
    source: TagSourceName = TagSourceName.easy_vqa_detector
    file: str | None = None  # source=annotations: JSONL {"image": ..., "tags": [...]}
    lexicon: str | None = None  # JSON {lang: {english tag: translation}}; None: easy-VQA's grammar


@dataclass
class CViLVQADataConfig:
    task: TaskName = TaskName.easy_vqa  # a single-image classification task (easy_vqa, xgqa)
    train: str = "train"  # English training file (teacher fine-tuning, distillation inputs)
    dev: str = "dev"  # English dev file (teacher model selection)
    parallel: dict[str, str] = field(default_factory=dict)  # lang -> `train` translated (aligned by id)
    # lang -> VQA data with answers (target_finetune)
    target_train: dict[str, str] = field(default_factory=dict)
    test: dict[str, str] = field(default_factory=dict)  # lang -> test file
    # lang -> the lang test file translated into English; easy_vqa without one: its grammar translates back
    translate_test: dict[str, str] = field(default_factory=dict)
    image_roots: dict[str, str] = field(default_factory=dict)
    label_vocab: str | None = None
    max_examples: int = 0  # > 0: first N examples per file (smoke runs only)
    train_examples: int = 0  # > 0: a seeded random subset of N training questions (teacher, distillation)
    test_examples: int = 0  # > 0: a seeded random subset of N questions per test file


@dataclass
class CViLTeacherFinetuneConfig:
    """The English teacher fine-tuned by the recipe when `teacher` is null (random init from `model`)."""

    model: str = "tiny"  # a model yaml under configs/model/ or a path
    model_overrides: list[str] = field(default_factory=list)
    vocab_size: int = 1000  # its tokenizer, trained on the English training questions (and tags)
    # bpe counts word frequencies: whole words from a few hundred distinct sentences, where unigram keeps ~100
    # pieces (letters) and long questions no longer fit model.text.max_length
    tokenizer_model: str = "bpe"  # or unigram
    steps: int = 300
    batch_size: int = 64
    lr: float = 5.0e-4
    head_lr_mult: float = 2.0
    warmup_ratio: float = 0.02
    eval_every: int = 0  # 0: at the end only


@dataclass
class CViLStudentConfig:
    tokenizer: str | None = None  # None: trained on the target-language training questions (and tags)
    vocab_size: int = 1000
    tokenizer_model: str = "bpe"  # or unigram (see teacher_finetune.tokenizer_model)


@dataclass
class CViLTargetFinetuneConfig:
    """Optional supervised step on target-language VQA data (`data.target_train`) after distillation."""

    enabled: bool = False
    steps: int = 100
    lr: float | None = None  # None: train.optimizer.lr
    trainable: list[StudentPart] = field(
        default_factory=lambda: [StudentPart.text, StudentPart.fusion, StudentPart.head]
    )


@dataclass
class CViLVQARecipeConfig:
    # English VQA task folder (cclm finetune / an earlier run's <output_dir>/teacher); null: fine-tune one here
    teacher: str | None = None
    languages: list[str] = MISSING  # target languages
    data: CViLVQADataConfig = field(default_factory=CViLVQADataConfig)
    object_tags: ObjectTagsConfig = field(default_factory=ObjectTagsConfig)
    teacher_finetune: CViLTeacherFinetuneConfig = field(default_factory=CViLTeacherFinetuneConfig)
    student: CViLStudentConfig = field(default_factory=CViLStudentConfig)
    distill: CViLDistillConfig = field(default_factory=CViLDistillConfig)
    target_finetune: CViLTargetFinetuneConfig = field(default_factory=CViLTargetFinetuneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)  # seed, logging, checkpoints, optimizer details
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    output_dir: str = "output/cvil_vqa"
    overwrite: bool = False
    resume: str | None = None  # as the MLA recipe (the teacher fine-tuning stage too)
    world: str = "data/world"


# -------------------------------------------------------------------------------------------- value checks
# Values OmegaConf's types let through but a run cannot use (a batch of 0, a negative weight decay): each check
# fails naming the key, and runs before any data, process group or output folder is touched.
def _require(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' must be {rule}, got {value}")


def check_betas(betas: Any, key: str) -> None:
    """AdamW's two coefficients, each in [0, 1) (``key=0.9`` arrives as the one-item list [0.9])."""
    values = list(betas)
    if len(values) != 2 or not all(0 <= b < 1 for b in values):
        raise ConfigError(
            f"config key '{key}' must hold two values in [0, 1) (e.g. '{key}=[0.9,0.98]'), got {values}"
        )


def check_optimizer_config(opt: Any, key: str = "train.optimizer") -> None:
    _require(opt.lr >= 0, f"{key}.lr", ">= 0", opt.lr)
    _require(opt.weight_decay >= 0, f"{key}.weight_decay", ">= 0", opt.weight_decay)
    check_betas(opt.betas, f"{key}.betas")
    _require(opt.eps >= 0, f"{key}.eps", ">= 0", opt.eps)
    _require(opt.new_param_lr_mult >= 0, f"{key}.new_param_lr_mult", ">= 0", opt.new_param_lr_mult)


def check_scheduler_config(sched: Any, key: str = "train.scheduler") -> None:
    """Out-of-range values fail; a warm-up as long as the run is a warning once the run's length is known
    (:func:`cclm.runtime.schedule.warn_if_warmup_covers_run`)."""
    _require(
        sched.warmup_steps >= 0,
        f"{key}.warmup_steps",
        f">= 0 (0: {key}.warmup_ratio sets it)",
        sched.warmup_steps,
    )
    _require(sched.warmup_ratio >= 0, f"{key}.warmup_ratio", ">= 0", sched.warmup_ratio)
    _require(0 <= sched.min_lr_ratio <= 1, f"{key}.min_lr_ratio", "in [0, 1]", sched.min_lr_ratio)


def check_train_config(train: Any, key: str = "train") -> None:
    """A :class:`TrainConfig`'s values (the length and saving keys that a workflow needs positive are its own
    to check: recipes take ``save_every: 0`` as no checkpoints)."""
    _require(train.epochs >= 0, f"{key}.epochs", ">= 0 (0: max_steps sets the length)", train.epochs)
    _require(train.dataset_size >= 0, f"{key}.dataset_size", ">= 0", train.dataset_size)
    _require(train.eval_every >= 0, f"{key}.eval_every", ">= 0 (0: no periodic evaluation)", train.eval_every)
    _require(train.keep_last >= 0, f"{key}.keep_last", ">= 0 (0: every checkpoint is kept)", train.keep_last)
    _require(train.grad_clip >= 0, f"{key}.grad_clip", ">= 0 (0: no clipping)", train.grad_clip)
    _require(train.grad_accum >= 1, f"{key}.grad_accum", ">= 1", train.grad_accum)
    for name in ("collective_timeout_s", "stop_check_s"):
        _require(getattr(train, name) > 0, f"{key}.{name}", "> 0", getattr(train, name))
    _require(
        train.stall_factor > 1, f"{key}.stall_factor", "> 1 (x the median step time)", train.stall_factor
    )
    check_optimizer_config(train.optimizer, f"{key}.optimizer")
    check_scheduler_config(train.scheduler, f"{key}.scheduler")


def check_data_config(data: Any, key: str = "data") -> None:
    """The loader and stream values of a :class:`DataConfig` (DataLoader and DeepSpeed would only refuse them
    once the run has started)."""
    _require(data.num_workers >= 0, f"{key}.num_workers", ">= 0 (0: batches are read in the training process)",
             data.num_workers)  # fmt: skip
    _require(
        data.sample_shuffle_buffer >= 0, f"{key}.sample_shuffle_buffer", ">= 0", data.sample_shuffle_buffer
    )
    for name in ("image_caption", "parallel_text"):
        stream = getattr(data, name)
        if stream is not None:
            _require(stream.batch_size >= 1, f"{key}.{name}.batch_size", ">= 1", stream.batch_size)
            _require(stream.weight >= 0, f"{key}.{name}.weight", ">= 0", stream.weight)
    if data.regions is not None:
        check_regions_config(data.regions, f"{key}.regions")


def check_objectives_config(model: Any, key: str = "model") -> None:
    """The loss weights and the temperature's range of a :class:`ModelConfig`."""
    objectives = model.objectives
    for name in ("itc_weight", "itm_weight", "mlm_weight", "xlc_weight"):
        value = getattr(objectives, name)
        _require(value >= 0, f"{key}.objectives.{name}", ">= 0", value)
    _require(objectives.temp_min > 0, f"{key}.objectives.temp_min", "> 0", objectives.temp_min)
    if objectives.temp_min > objectives.temp_max:
        raise ConfigError(
            f"config key '{key}.objectives.temp_min' ({objectives.temp_min}) must be <= "
            f"'{key}.objectives.temp_max' ({objectives.temp_max})"
        )
    _require(model.temp > 0, f"{key}.temp", "> 0", model.temp)


def check_eval_config(eval_cfg: Any, key: str = "eval") -> None:
    for name in ("batch_size", "rerank_batch_size"):
        _require(getattr(eval_cfg, name) >= 1, f"{key}.{name}", ">= 1", getattr(eval_cfg, name))
    # k_test is how many ITC candidates ITM re-scores: 0 is meaningful (ITC-only ranks) only without re-ranking.
    if eval_cfg.rerank:
        _require(eval_cfg.k_test >= 1, f"{key}.k_test", ">= 1 when re-ranking", eval_cfg.k_test)
    else:
        _require(eval_cfg.k_test >= 0, f"{key}.k_test", ">= 0", eval_cfg.k_test)
    _require(eval_cfg.num_workers >= 0, f"{key}.num_workers", ">= 0", eval_cfg.num_workers)


def check_pretrain_values(cfg: Any) -> None:
    """Every value of a :class:`PretrainConfig` that the run checks before it starts."""
    check_objectives_config(cfg.model, "model")
    check_data_config(cfg.data, "data")
    check_train_config(cfg.train, "train")
    check_deepspeed_config(cfg.deepspeed, "deepspeed")
    check_eval_config(cfg.eval, "eval")


def check_finetune_train_config(train: Any, key: str = "train") -> None:
    """A :class:`FinetuneTrainConfig`'s values; a warm-up ratio of 1 or more is a warning (the caller's)."""
    for name in ("epochs", "max_steps", "eval_every", "save_every", "keep_last", "num_workers", "threads"):
        _require(getattr(train, name) >= 0, f"{key}.{name}", ">= 0", getattr(train, name))
    if train.epochs == 0 and train.max_steps == 0:
        raise ConfigError(
            f"config keys '{key}.epochs' and '{key}.max_steps' are both 0: there is no step to train"
        )
    _require(train.batch_size >= 1, f"{key}.batch_size", ">= 1", train.batch_size)
    for shots, size in train.batch_size_by_shots.items():
        _require(size >= 1, f"{key}.batch_size_by_shots.{shots}", ">= 1", size)
    _require(train.log_every >= 1, f"{key}.log_every", ">= 1", train.log_every)
    _require(train.lr >= 0, f"{key}.lr", ">= 0", train.lr)
    if any(lr < 0 for lr in train.lr_sweep):
        raise ConfigError(f"config key '{key}.lr_sweep' must hold values >= 0, got {list(train.lr_sweep)}")
    for name in ("head_lr_mult", "weight_decay", "warmup_ratio", "time_limit_minutes"):
        _require(getattr(train, name) >= 0, f"{key}.{name}", ">= 0", getattr(train, name))
    _require(train.grad_clip >= 0, f"{key}.grad_clip", ">= 0 (0: no clipping)", train.grad_clip)
    check_betas(train.betas, f"{key}.betas")
    _require(train.collective_timeout_s > 0, f"{key}.collective_timeout_s", "> 0", train.collective_timeout_s)
    _require(
        train.stall_factor > 1, f"{key}.stall_factor", "> 1 (x the median step time)", train.stall_factor
    )


def check_deepspeed_config(ds: Any, key: str = "deepspeed") -> None:
    """A :class:`DeepSpeedConfig`'s ZeRO stage (a stage that a ``config_file`` gives is checked with the file)."""
    if ds.zero_stage is not None:
        _require(ds.zero_stage in (0, 1, 2, 3), f"{key}.zero_stage", "0, 1, 2 or 3", ds.zero_stage)


def check_finetune_values(cfg: Any, training: bool = True) -> None:
    """The values of a :class:`FinetuneConfig` that evaluation uses, and with ``training`` those of training
    (``train``, ``domain_pretrain``)."""
    _require(
        cfg.data.max_examples >= 0, "data.max_examples", ">= 0 (0: every example)", cfg.data.max_examples
    )
    _require(cfg.data.max_length >= 0, "data.max_length", ">= 0 (0: the model's)", cfg.data.max_length)
    _require(
        cfg.data.dev_max_examples >= 0,
        "data.dev_max_examples",
        ">= 0 (0: every example)",
        cfg.data.dev_max_examples,
    )
    _require(cfg.eval.batch_size >= 1, "eval.batch_size", ">= 1", cfg.eval.batch_size)
    _require(cfg.eval.k_test >= 1, "eval.k_test", ">= 1", cfg.eval.k_test)
    if not training:
        return
    check_finetune_train_config(cfg.train, "train")
    check_deepspeed_config(cfg.deepspeed, "deepspeed")
    stage = cfg.domain_pretrain
    _require(stage.steps >= 0, "domain_pretrain.steps", ">= 0 (0: off)", stage.steps)
    if stage.steps > 0:
        for name in ("lr", "head_lr_mult", "warmup_ratio"):
            _require(getattr(stage, name) >= 0, f"domain_pretrain.{name}", ">= 0", getattr(stage, name))
        _require(stage.log_every >= 1, "domain_pretrain.log_every", ">= 1", stage.log_every)
        check_data_config(stage.data, "domain_pretrain.data")


# ------------------------------------------------------------------------------------------------- loading
def _nested(schema: Any, f) -> Any:
    """The dataclass a field of ``schema`` holds (its default, or the type of an optional section that defaults
    to None, e.g. ``data.regions``), else None."""
    default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
    if is_dataclass(default):
        return default
    hint = typing.get_type_hints(schema if isinstance(schema, type) else type(schema)).get(f.name)
    return next((t for t in typing.get_args(hint) if is_dataclass(t)), None)


def _valid_keys(schema: Any, prefix: str = "") -> list[str]:
    keys = []
    if is_dataclass(schema):
        for f in fields(schema):
            keys.append(f"{prefix}{f.name}")
            nested = _nested(schema, f)
            if nested is not None:
                keys.extend(_valid_keys(nested, f"{prefix}{f.name}."))
    return keys


def _section_keys(schema: Any, prefix: str = "") -> set[str]:
    """The keys of ``schema`` that are sections (nested dataclasses), which are never a typo's answer."""
    sections = set()
    if is_dataclass(schema):
        for f in fields(schema):
            nested = _nested(schema, f)
            if nested is not None:
                sections.add(f"{prefix}{f.name}")
                sections |= _section_keys(nested, f"{prefix}{f.name}.")
    return sections


# Names other tools (and cclm's own fine-tuning configs) use for a setting that a schema spells differently.
LEAF_SYNONYMS = {"learning_rate": "lr", "batch": "batch_size", "bs": "batch_size", "warmup": "warmup_steps"}
SUGGESTIONS_SHOWN = 4


def suggest_keys(key: str, schema: Any) -> list[str]:
    """The valid keys a mistyped ``key`` most likely meant: those with the same last part (or its usual synonym),
    the ones in the same section first (``train.warmup_steps`` -> ``train.scheduler.warmup_steps``); else the
    closest spellings of the whole key, then of its last part. A key's own section is never the answer."""
    sections = _section_keys(schema)
    settings = [k for k in _valid_keys(schema) if k not in sections]
    leaf = key.rsplit(".", 1)[-1]
    wanted = {leaf, LEAF_SYNONYMS.get(leaf, leaf)}
    same_leaf = [k for k in settings if k.rsplit(".", 1)[-1] in wanted]
    if same_leaf:
        top = key.split(".", 1)[0] + "."
        return sorted(same_leaf, key=lambda k: (not k.startswith(top), k.count("."), k))[:SUGGESTIONS_SHOWN]
    candidates = settings + sorted(sec for sec in sections if not key.startswith(sec + "."))
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if close:
        return close
    return [c for c in settings if difflib.get_close_matches(leaf, [c.rsplit(".", 1)[-1]], cutoff=0.75)][:1]


def _explain(err: OmegaConfBaseException, schema: Any, override_key: str | None = None) -> ConfigError:
    """One line for OmegaConf's error; ``override_key``: the key of the override being merged (a merge error
    does not name it)."""
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or override_key or "?"
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        close = suggest_keys(str(key), schema)
        hint = ""
        if len(close) == 1:
            hint = f" (did you mean '{close[0]}'?)"
        elif close:
            hint = " (did you mean one of: " + ", ".join(close) + "?)"
        renamed = RENAMED_KEYS.get(str(key))
        if renamed:
            hint = f" (renamed to '{renamed}')"
        return ConfigError(f"unknown config key '{key}'{hint}")
    if isinstance(err, ValidationError):
        enum = _enum_of(schema, str(key))
        if enum is not None:  # a mode string: name the mode, the value and the choices
            parts = str(key).split(".")
            what = parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]
            value = getattr(err, "value", None) if hasattr(err, "value") else None
            shown = f" '{value}'" if value is not None else ""
            choices = ", ".join(m.value for m in enum)
            return ConfigError(f"config key '{key}': unknown {what}{shown}, expected one of: {choices}")
        if str(key) in _section_keys(schema):
            inner = next(k for k in _valid_keys(schema) if k.startswith(f"{key}."))
            return ConfigError(
                f"config key '{key}' is a section, not a value: set its keys, e.g. {inner}=..."
            )
        return ConfigError(f"invalid value for config key '{key}': {_first_line(err.msg or str(err))}")
    return ConfigError(f"config error at '{key}': {_first_line(str(err))}")


# Keys that an earlier release spelled differently: their error names the new key.
RENAMED_KEYS = {"data.iglue_dir": "data.root"}


def _first_line(message: str) -> str:
    """OmegaConf appends the full key and the node's types on lines of their own; the key is named already."""
    return message.strip().splitlines()[0] if message.strip() else message


def _field_type(schema: Any, dotted: str) -> Any:
    """The declared type of a dotted key of a dataclass schema, through optional sections (None when the key is
    not a field, e.g. an entry of a mapping)."""
    node = schema
    for part in dotted.split("."):
        if not is_dataclass(node):
            return None
        hints = typing.get_type_hints(node if isinstance(node, type) else type(node))
        if part not in hints:
            return None
        node = hints[part]
        sections = [a for a in typing.get_args(node) if is_dataclass(a)]
        if sections:
            node = sections[0]  # Optional[Section] / Section | None
    return node


def _enum_of(schema: Any, dotted: str) -> type[Enum] | None:
    """The Enum type of a dotted key of a dataclass schema (None when the key is not a mode)."""
    node = _field_type(schema, dotted)
    args = [a for a in typing.get_args(node) if a is not type(None)]
    if args and not isinstance(node, type):
        node = args[0]  # Optional[X] / X | None
    return node if isinstance(node, type) and issubclass(node, Enum) else None


def _unwrap_optional(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return hint


def _shape_of_hint(hint: Any) -> str | None:
    """What a declared type takes: 'section' (a dataclass), 'mapping', 'list' or 'value'; None for Any or a
    union of several types (OmegaConf checks those)."""
    hint = _unwrap_optional(hint)
    if hint is Any or hint is None or typing.get_origin(hint) in (typing.Union, types.UnionType):
        return None
    if is_dataclass(hint):
        return "section"
    return {dict: "mapping", list: "list"}.get(typing.get_origin(hint), "value")


def _inner_hint(hint: Any, name: str | None = None) -> Any:
    """The declared type of field ``name`` of a section, of an entry of a mapping, or of an item of a list."""
    hint = _unwrap_optional(hint)
    if is_dataclass(hint):
        return typing.get_type_hints(hint).get(name)
    args = typing.get_args(hint)
    if typing.get_origin(hint) is dict:
        return args[1] if len(args) == 2 else Any
    if typing.get_origin(hint) is list:
        return args[0] if args else Any
    return None


def _shape_of_node(node: Any) -> str | None:
    """'mapping', 'list' or 'value' for a node of a config being read; None for a null, a ``???`` or an
    interpolation (OmegaConf checks those once merged)."""
    if node._is_none() or node._is_missing() or node._is_interpolation():
        return None
    if isinstance(node, DictConfig):
        return "mapping"
    return "list" if isinstance(node, ListConfig) else "value"


def _check_shapes(hint: Any, layer: DictConfig | ListConfig, prefix: str = "") -> None:
    """A list or a value where the schema (``hint``) has a section or a mapping, and a mapping or a list where it
    has a value, fail naming the key: OmegaConf raises a bare TypeError for a list merged over a mapping, and
    names no key for a value given to a section."""
    items = isinstance(layer, ListConfig)
    if items:
        children = [(prefix.rstrip("."), layer._get_node(i), _inner_hint(hint)) for i in range(len(layer))]
    else:
        children = [(f"{prefix}{k}", layer._get_node(k), _inner_hint(hint, str(k))) for k in layer.keys()]
    for key, node, inner in children:
        expected, given = _shape_of_hint(inner), _shape_of_node(node)
        if expected is None or given is None:
            continue
        if given != ("mapping" if expected == "section" else expected):
            raise ConfigError(_shape_error(key, expected, given, inner, node, items))
        if given != "value":
            _check_shapes(inner, node, f"{key}.")


def _shape_error(key: str, expected: str, given: str, hint: Any, node: Any, item: bool) -> str:
    shown = {"list": "a list", "mapping": "a mapping", "value": "a value"}[given]
    if item:
        return f"config key '{key}' must be a list of values, not a list holding {shown}"
    if expected == "section":
        first = fields(_unwrap_optional(hint))[0].name
        return f"config key '{key}' is a section, not {shown}: set its keys, e.g. {key}.{first}=..."
    if expected == "mapping":
        return f"config key '{key}' is a mapping, not {shown}: set its entries, e.g. {key}.NAME=..."
    if expected == "list":
        shown = f"the value {node._value()!r}" if given == "value" else shown
        return f"config key '{key}' must be a list (e.g. '{key}=[a,b]'), not {shown}"
    return f"config key '{key}' takes one value, not {shown}"


def _resolve_default(group: str, name: str, base_dir: Path) -> Path:
    if name.endswith((".yaml", ".yml")):
        path = Path(name)
        return path if path.is_absolute() else (base_dir / path)
    for root in (base_dir.parent, base_dir, CONFIG_ROOT):
        candidate = root / group / f"{name}.yaml"
        if candidate.exists():
            return candidate
    raise ConfigError(f"defaults: no config '{name}' for group '{group}' (looked in configs/{group}/)")


def _read_yaml(path: Path, schema: Any = None, prefix: str = "") -> DictConfig:
    """The file's keys over those of its ``defaults``; with ``schema``, the shape of every layer is checked
    (:func:`_check_shapes`) before the layers are merged. ``prefix``: where the file goes in the schema
    (``model.`` for ``defaults: {model: tiny}``)."""
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = OmegaConf.load(path)
    except Exception as err:  # yaml.YAMLError and friends: report the file, not a parser traceback
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping")
    layers = []
    defaults = raw.pop("defaults", None)
    if schema is not None:
        written = yaml.load(path.read_text(encoding="utf-8"), Loader=yaml.BaseLoader)
        if isinstance(written, dict):  # None for an empty or comment-only file
            written.pop("defaults", None)
            typed = OmegaConf.to_container(raw, resolve=False)
            raw = OmegaConf.create(_text_where_declared(_schema_at(schema, prefix), typed, written))
    if defaults is not None:
        if not isinstance(defaults, DictConfig):
            raise ConfigError(f"{path}: 'defaults' must be a mapping of group: name")
        for group, name in defaults.items():
            default = _resolve_default(str(group), str(name), path.parent)
            sub = _read_yaml(default, schema, f"{prefix}{group}.")
            node: DictConfig = OmegaConf.create({})
            OmegaConf.update(node, str(group), sub, merge=True)
            layers.append(node)
    if schema is not None:
        try:
            _check_shapes(_schema_at(schema, prefix), raw, prefix)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    return _merge_keeping_missing(*layers, raw) if layers else raw


def _merge_keeping_missing(base: DictConfig, *layers: DictConfig) -> DictConfig:
    """``layers`` merged over ``base``, a ``???`` of a layer included: OmegaConf's merge keeps the value below a
    ``???`` (``model.text.tokenizer: ???`` over a default of null stayed null, and the start-up check that names
    every value still to fill in left it out)."""
    merged = OmegaConf.merge(base, *layers)
    for layer in layers:
        for key in _missing_keys(layer):
            OmegaConf.update(merged, key, MISSING, merge=False)
    return merged


def _missing_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """The dotted keys set to ``???`` in a mapping read from a file (interpolations are not resolved: they may
    point at keys of other layers)."""
    keys = []
    for key in node.keys():
        child = node._get_node(key)
        if child._is_missing():
            keys.append(f"{prefix}{key}")
        elif isinstance(child, DictConfig) and not child._is_none() and not child._is_interpolation():
            keys += _missing_keys(child, f"{prefix}{key}.")
    return keys


def _schema_at(schema: Any, prefix: str) -> Any:
    """The declared type at ``prefix`` (``model.``) of ``schema``; ``schema`` itself for the root."""
    hint = schema
    for part in prefix.split(".")[:-1]:
        hint = _inner_hint(hint, part)
    return hint


def load_config(
    schema: type, path: str | os.PathLike | None = None, overrides: list[str] | None = None
) -> Any:
    """Build a typed config: dataclass defaults <- YAML file (with its defaults) <- ``key=value`` overrides.

    Returns the config as an instance-like OmegaConf object with the schema's type checking kept on.
    """
    base = OmegaConf.structured(schema)
    pairs = parse_overrides(overrides or [])
    try:
        merged = base
        if path is not None:
            merged = _merge_keeping_missing(merged, _read_yaml(Path(path), schema))
        for key, value in pairs:
            override = _parse_override(schema, key, value)
            _check_shapes(schema, override)
            try:
                if OmegaConf.select(override, key) is None and _drop_mapping_entry(merged, key):
                    continue
                merged = OmegaConf.merge(merged, override)
            except OmegaConfBaseException as err:
                raise _explain(err, schema, override_key=key) from None
        OmegaConf.to_container(merged, resolve=True, throw_on_missing=False)  # checks the interpolations
        _expand_home(merged)
    except OmegaConfBaseException as err:
        raise _explain(err, schema) from None
    return merged


# ----------------------------------------------------------------------------------------------- overrides
def parse_overrides(items: list[str]) -> list[tuple[str, str]]:
    """``key=value`` items as (key, value) pairs. A key given twice is refused, and so is what an unquoted brace
    pattern becomes once the shell has expanded it: ``k=a-{1..3}.tar`` arrives as ``k=a-1.tar k=a-2.tar
    k=a-3.tar`` (bash), or as ``k=a-1.tar a-2.tar a-3.tar``; either way only one value would be used."""
    pairs: list[tuple[str, str]] = []
    values: dict[str, list[str]] = {}
    loose: dict[str, str] = {}  # key -> the first path that followed its key=value item
    for item in items:
        if "=" not in item:
            if not (pairs and _looks_like_path(item) and _looks_like_path(pairs[-1][1])):
                raise ConfigError(f"override '{item}' must look like key=value")
            values[pairs[-1][0]].append(item)
            loose.setdefault(pairs[-1][0], item)
            continue
        key, value = item.split("=", 1)
        key = key.strip()
        if not DOTTED_KEY.match(key):
            raise ConfigError(
                f"override '{item}' must look like key=value, with a dotted key (train.max_steps=10)"
            )
        pairs.append((key, value))
        values.setdefault(key, []).append(value)
    for key, given in values.items():
        pattern = _brace_pattern(given) if len(given) > 1 and all(map(_looks_like_path, given)) else None
        # Two key=value items may as well be a key typed twice (out/a, out/b): say both.
        if pattern and len(given) == 2 and key not in loose:
            raise ConfigError(
                f"config key '{key}' is given 2 times ({key}={given[0]}, {key}={given[1]}): give it once (if "
                f"the shell expanded a brace pattern, quote it: '{key}={pattern}')"
            )
        if pattern:
            raise ConfigError(
                f"config key '{key}' has {len(given)} values: the shell expanded a brace pattern; quote it, "
                f"e.g. '{key}={pattern}'"
            )
        if key in loose:
            raise ConfigError(f"override '{loose[key]}' must look like key=value")
        if len(given) > 1:
            shown = ", ".join(f"{key}={v}" for v in given)
            raise ConfigError(f"config key '{key}' is given {len(given)} times ({shown}): give it once")
    return pairs


DOTTED_KEY = re.compile(r"^[A-Za-z_][\w-]*(\.[\w-]+)*$")


def _looks_like_path(text: str) -> bool:
    return "/" in text or os.sep in text or bool(re.search(r"\.[A-Za-z]\w*$", text)) or os.path.exists(text)


def _brace_pattern(values: list[str]) -> str | None:
    """The brace pattern that expands to ``values`` (``a-{1..3}.tar``); None when they share no prefix or suffix
    around distinct middles, so that no pattern made them."""
    if len(set(values)) < len(values):
        return None
    prefix = os.path.commonprefix(values).rstrip("0123456789")
    rest = [v[len(prefix) :] for v in values]
    suffix = os.path.commonprefix([r[::-1] for r in rest])[::-1].lstrip("0123456789")
    middles = [r[: len(r) - len(suffix)] for r in rest]
    if not (prefix or suffix):
        return None
    numbers = [int(m) for m in middles] if all(m.isdigit() for m in middles) else []
    if numbers and numbers == list(range(numbers[0], numbers[0] + len(numbers))):
        return f"{prefix}{{{middles[0]}..{middles[-1]}}}{suffix}"
    return f"{prefix}{{{','.join(middles)}}}{suffix}"


def _parse_override(schema: Any, key: str, value: str) -> DictConfig:
    """One ``key=value`` as a config to merge. A list key also takes the comma form (``languages=de,fr`` as
    ``languages=[de,fr]``, ``data.train=/x.jsonl`` as a one-item list); a value YAML cannot read is named."""
    if _expects_list(schema, key) and value.strip() and not value.lstrip().startswith(("[", "{", "$")):
        value = f"[{value}]"
    try:
        typed = OmegaConf.from_dotlist([f"{key}={value}"])
        written: Any = yaml.load(value, Loader=yaml.BaseLoader)  # every scalar as the text it was written as
    except yaml.YAMLError as err:
        what = getattr(err, "problem", None) or _first_line(str(err))
        raise ConfigError(f"override '{key}={value}' is not valid YAML: {what}") from None
    for part in reversed(key.split(".")):
        written = {part: written}
    return OmegaConf.create(_text_where_declared(schema, OmegaConf.to_container(typed), written))


MERGE_KEY = "<<"


def _text_where_declared(hint: Any, value: Any, written: Any) -> Any:
    """``value`` as YAML 1.1 typed it, with the text it was ``written`` as wherever the schema declares a string
    (a value, a list item, a mapping's key or entry): YAML reads ``no`` (Norwegian) as false, ``0100`` as 64,
    ``12:30`` as 750 and ``2024_11`` as 202411, and a string field would keep ``"False"`` or ``"64"``."""
    hint = _unwrap_optional(hint)
    if hint is str:
        return written if isinstance(value, (bool, int, float)) and isinstance(written, str) else value
    if isinstance(value, list) and isinstance(written, list) and len(value) == len(written):
        if typing.get_origin(hint) is not list:
            return value
        return [_text_where_declared(_inner_hint(hint), v, w) for v, w in zip(value, written, strict=True)]
    if not isinstance(value, dict) or not isinstance(written, dict) or MERGE_KEY in written:
        return value  # a YAML merge key: the written mapping is not the one read (kept as YAML read it)
    if is_dataclass(hint):
        return {
            k: _text_where_declared(_inner_hint(hint, str(k)), v, written.get(str(k)))
            for k, v in value.items()
        }
    if typing.get_origin(hint) is not dict or len(value) != len(written):
        return value
    text_keys = (typing.get_args(hint) or (str,))[0] is str
    out = {}
    # the same entries in the same order (no merge key): paired by position, as a key read as False has no name
    for (key, item), (written_key, written_item) in zip(value.items(), written.items(), strict=True):
        if text_keys and not isinstance(key, str) and isinstance(written_key, str):
            key = written_key  # a language code ``no:`` read as False
        out[key] = _text_where_declared(_inner_hint(hint), item, written_item)
    return out


def _expand_home(cfg: DictConfig | ListConfig) -> None:
    """Every string setting that starts with ``~/`` as the home path it names: the shell leaves ``~`` in
    ``output_dir=~/runs`` as it is, and a run would make a folder named ``~`` in the working directory."""
    for key in range(len(cfg)) if isinstance(cfg, ListConfig) else list(cfg.keys()):
        node = cfg._get_node(key)
        if isinstance(node, (DictConfig, ListConfig)):
            if not node._is_none() and not node._is_missing() and not node._is_interpolation():
                _expand_home(node)
        elif not node._is_missing():
            value = (
                node._value()
            )  # an interpolation's text (``~/runs/${name}``): expanded, still interpolated
            if isinstance(value, str) and value.startswith(("~/", "~" + os.sep)):
                cfg[key] = os.path.expanduser(value)


def _expects_list(schema: Any, key: str) -> bool:
    """Whether the schema declares ``key`` a list (``list[str]``, or optional), a field or a mapping's entry
    (``data.captions.de``)."""
    hint: Any = schema
    for part in key.split("."):
        hint = _inner_hint(hint, part)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
    return any(typing.get_origin(t) is list for t in (typing.get_args(hint) if optional else (hint,)))


def _drop_mapping_entry(cfg: DictConfig, key: str) -> bool:
    """``key=null`` where ``key`` is an entry of a mapping whose values cannot be null (``data.test.ar=null``)
    removes the entry; False when ``key`` is anything else (a field or an entry that takes null)."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if not isinstance(parent, DictConfig) or OmegaConf.get_type(parent) is not dict:
        return False
    element_type = parent._metadata.element_type
    if element_type is Any or type(None) in typing.get_args(element_type):
        return False
    if leaf not in parent:
        raise ConfigError(
            f"config key '{key}': '{parent_key}' has no entry '{leaf}' to drop (it has: {', '.join(parent)})"
        )
    del parent[leaf]
    return True


def require(cfg: Any, *keys: str) -> None:
    """Fail with the key's name when a mandatory value is missing (``???`` in OmegaConf)."""
    for key in keys:
        if OmegaConf.is_missing(cfg, key) if "." not in key else _is_missing_dotted(cfg, key):
            raise ConfigError(f"config key '{key}' must be set")


def require_complete(cfg: Any) -> None:
    """Fail naming every mandatory value (``???``) that is still unset, e.g. shard paths to fill in."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError("config keys must be set (they are ??? in the config): " + ", ".join(missing))


def _is_missing_dotted(cfg: Any, dotted: str) -> bool:
    parent, _, leaf = dotted.rpartition(".")
    node = OmegaConf.select(cfg, parent)
    return node is None or OmegaConf.is_missing(node, leaf)


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def from_dict(schema: type, data: dict) -> Any:
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(data))
    except OmegaConfBaseException as err:
        raise _explain(err, schema) from None
