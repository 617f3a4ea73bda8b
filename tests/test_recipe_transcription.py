"""The CCLM reference's recipe numbers, transcribed from zengyan-97/CCLM (a00c3c0), against what cclm builds from
``configs/pretrain/cclm_3m.yaml`` (docs/fidelity.md has the table with file:line for each).

The model is the tiny one (no XLM-R download) with the paper config's recipe keys; everything the recipe decides
-- layers, parameter groups, learning rates, decay, clip, masking, lengths, augmentation, temperature, schedule
length, order of the views -- is read from what cclm builds, not from the YAML."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from cclm.config import CONFIG_ROOT, DataConfig, ModelConfig, PretrainConfig, from_dict, load_config, to_dict
from cclm.data.masking import IGNORE_INDEX
from cclm.data.normalize import pre_caption
from cclm.data.pipeline import PretrainData
from cclm.data.shards import VIEW_IMAGE_CAPTION, VIEW_PARALLEL, ShardSink
from cclm.model import CrossViewModel
from cclm.runtime.engine import deepspeed_config
from cclm.runtime.optim import build_optimizer, multipliers
from cclm.runtime.schedule import build_scheduler, views_per_iteration
from cclm.runtime.trainer import LoopSettings
from cclm.train.run_length import max_steps_from_epochs
from tests.test_masking import reference_masked_positions

# ---------------------------------------------------------------------------------- the reference's numbers
REFERENCE = {
    # models/xvlm.py:234 mapper {1:0, 3:1, ..., 23:11}
    "text_layers": [1, 3, 5, 7, 9, 11],
    "fusion_layers": [13, 15, 17, 19, 21, 23],
    # configs/Pretrain_3m.yaml:95-97, optim.py:48
    "lr": 1e-4,
    "lr_mult": 2,
    "weight_decay": 0.01,
    "betas": (0.9, 0.98),
    "eps": 1e-8,
    "warmup": 2500,
    "epochs": 30,
    "clip": 1.0,
    # configs/Pretrain_3m.yaml:8, 13
    "train_dataset_size": 2_838_361,
    "batch_size": 128,
    "gpus": 8,
    # configs/Pretrain_3m.yaml:47-50, 78-85
    "caption_tokens": 40,
    "caption_max_masks": 12,
    "text_tokens": 64,
    "text_max_masks": 20,
    "mask_prob": 0.4,
    "skipgram_prb": 0.2,
    "skipgram_size": 3,
    # dataset/__init__.py:32-36
    "crop_scale": (0.2, 1.0),
    "randaugment": (2, 7),
    # configs/Pretrain_3m.yaml:75, models/model_pretrain_cclm.py:38
    "temp": 0.07,
    "temp_bounds": (0.001, 0.5),
}
# optim.py:17-26: a parameter whose name contains one of these does not decay
REFERENCE_NO_DECAY = (
    "bias",
    "LayerNorm.bias",
    "LayerNorm.weight",
    "norm.bias",
    "norm.weight",
    "norm1.bias",
    "norm1.weight",
    "norm2.bias",
    "norm2.weight",
)


def reference_lr_factor(step: int, warmup: int, total: int) -> float:
    """scheduler.py:15-21 (linear), stepped once per iteration (Pretrain.py:283)."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def reference_mask_count(n_tokens: int, cap: int) -> int:
    """dataset/pretrain_dataset_multilingual.py:62-63; ``n_tokens`` counts <s> and </s>."""
    return min(cap, max(1, int(round(n_tokens * REFERENCE["mask_prob"]))))


# ------------------------------------------------------------------------------------------------- cclm's
@pytest.fixture(scope="module")
def paper() -> PretrainConfig:
    return load_config(PretrainConfig, CONFIG_ROOT / "pretrain" / "cclm_3m.yaml")


def test_layers_swin_and_text_handling(paper):
    text = paper.model.text
    assert list(text.text_layers) == REFERENCE["text_layers"]
    assert list(text.fusion_layers) == REFERENCE["fusion_layers"]
    assert text.name_or_path == "xlm-roberta-large"
    assert str(text.position_ids) == "reference"  # BertModel numbering over XLM-R's table
    assert str(text.normalize) == "pre_caption"
    tower = paper.model.vision.tower
    assert tower["timm_model_name"] == "swin_base_patch4_window7_224.ms_in22k"  # config_swinB_224.json:2
    assert tower["timm_drop_path"] == 0.1  # models/xvlm.py:165
    assert paper.model.vision.image_size == 224
    assert paper.model.embed_dim == 256


def test_temperature_and_contrastive_gradient(paper, tiny_model_cfg):
    obj = paper.model.objectives
    assert paper.model.temp == REFERENCE["temp"]
    assert (obj.temp_min, obj.temp_max) == REFERENCE["temp_bounds"]
    assert str(obj.contrastive_grad) == "reference"
    assert obj.local_loss is False and str(obj.itm_negatives) == "local"
    model = _tiny_with_paper_recipe(paper, tiny_model_cfg)
    assert model.temp.item() == pytest.approx(REFERENCE["temp"])


def _tiny_with_paper_recipe(paper, tiny_model_cfg) -> CrossViewModel:
    data = to_dict(tiny_model_cfg)
    data["objectives"] = to_dict(paper.model.objectives)
    data["temp"] = paper.model.temp
    torch.manual_seed(0)
    return CrossViewModel(from_dict(ModelConfig, data), load_pretrained=False)


def test_parameter_groups_learning_rates_decay_and_clip(paper, tiny_model_cfg):
    """Four groups as optim.py:10-15: {decay, no decay} x {lr, lr x 2}; the new parameters (cross-attention,
    projections, ITM head, temperature) at x2; every lr of the reference at iterations 0, 1,250, 2,500 and the
    last, for both updates of the iteration."""
    train = paper.train
    opt = train.optimizer
    assert (opt.lr, opt.weight_decay, tuple(opt.betas), opt.eps) == (
        REFERENCE["lr"],
        REFERENCE["weight_decay"],
        REFERENCE["betas"],
        REFERENCE["eps"],
    )
    model = _tiny_with_paper_recipe(paper, tiny_model_cfg)
    optimizer = build_optimizer(
        model,
        lr=opt.lr,
        weight_decay=opt.weight_decay,
        betas=tuple(opt.betas),
        eps=opt.eps,
        lr_mults=multipliers(model.new_parameter_names(), opt.new_param_lr_mult),
        decay_rule=opt.decay_rule,
    )
    name_of = {id(p): n for n, p in model.named_parameters()}
    new = set(model.new_parameter_names())
    assert {"temp", "itm_head.net.0.weight", "vision_proj.weight", "text_proj.weight"} <= new
    assert any(".crossattention." in n for n in new)
    groups = optimizer.param_groups
    assert len(groups) == 4
    for group in groups:
        for p in group["params"]:
            name = name_of[id(p)]
            decays = not any(nd in name for nd in REFERENCE_NO_DECAY)
            assert group["weight_decay"] == (REFERENCE["weight_decay"] if decays else 0.0), name
            assert group["lr_mult"] == (REFERENCE["lr_mult"] if name in new else 1), name
    temp_group = next(g for g in groups if any(name_of[id(p)] == "temp" for p in g["params"]))
    assert temp_group["weight_decay"] == 0.01 and temp_group["lr_mult"] == 2  # the reference decays temp

    views = ("image", "text")
    per_iteration = views_per_iteration(train.view_schedule, views)
    assert per_iteration == 2
    max_steps = max_steps_from_epochs(
        train.epochs,
        REFERENCE["train_dataset_size"],
        REFERENCE["batch_size"],
        REFERENCE["gpus"],
        per_iteration,
    )
    iterations = REFERENCE["epochs"] * math.ceil(
        REFERENCE["train_dataset_size"] / (REFERENCE["batch_size"] * REFERENCE["gpus"])
    )
    assert max_steps == 2 * iterations == 166_320
    scheduler = build_scheduler(optimizer, train.scheduler, max_steps, views_per_iteration=per_iteration)
    bases = [g["initial_lr"] for g in groups]
    for iteration in (0, 1250, 2500, iterations - 1):
        factor = reference_lr_factor(iteration, REFERENCE["warmup"], iterations)
        for update in (2 * iteration, 2 * iteration + 1):
            for base, lr_lambda, group in zip(bases, scheduler.lr_lambdas, groups, strict=True):
                expected = REFERENCE["lr"] * (REFERENCE["lr_mult"] if group["lr_mult"] == 2 else 1) * factor
                assert base * lr_lambda(update) == pytest.approx(expected, rel=1e-9, abs=1e-15)

    loop = LoopSettings.from_train_config(train, max_steps=max_steps)
    assert loop.grad_clip == REFERENCE["clip"]
    ds = deepspeed_config(
        paper.deepspeed, REFERENCE["batch_size"], REFERENCE["gpus"], grad_clip=loop.grad_clip
    )
    assert ds["gradient_clipping"] == REFERENCE["clip"]
    assert ds["train_batch_size"] == REFERENCE["batch_size"] * REFERENCE["gpus"]


# --------------------------------------------------------------------------------------------------- data
SENTENCES = [
    "A man, riding a horse on the beach!",
    "Two dogs play with a red ball in the park near the old stone bridge at sunset.",
    "Ein Mann fährt Fahrrad.",
    "一只猫坐在窗台上看着外面的雨。",
    "Le chat (noir) dort sur le canapé -- tranquillement.",
    " ".join(["word"] * 70),  # longer than both token caps
]


def _image(i: int) -> bytes:
    import io

    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def paper_data(tmp_path_factory, paper, tiny_tokenizer) -> PretrainData:
    root = tmp_path_factory.mktemp("paper_shards")
    with ShardSink(root / "ic", VIEW_IMAGE_CAPTION, max_samples=100) as sink:
        for i, text in enumerate(SENTENCES * 4):
            meta = json.dumps({"captions": {"en": text}}).encode()
            sink.write(f"img{i:04d}", {"jpg": _image(i), "json": meta}, ["en"])
        sink.close()  # publishes the shards; leaving the block without close() discards them
    with ShardSink(root / "pt", VIEW_PARALLEL, max_samples=100) as sink:
        for i, text in enumerate(SENTENCES * 4):
            pair = {"src": text, "tgt": text, "src_lang": "en", "tgt_lang": "de"}
            sink.write(f"pair{i:04d}", {"json": json.dumps(pair).encode()}, ["en", "de"])
        sink.close()
    data_cfg = to_dict(paper.data)
    data_cfg["image_caption"].update(shards=str(root / "ic" / "shard-000000.tar"), batch_size=len(SENTENCES))
    data_cfg["parallel_text"].update(shards=str(root / "pt" / "shard-000000.tar"), batch_size=len(SENTENCES))
    data_cfg.update(num_workers=0, resampled=False, sample_shuffle_buffer=1)
    from cclm.data.normalize import normalizer_for

    data = PretrainData(
        from_dict(DataConfig, data_cfg),
        tiny_tokenizer,
        paper.model.text.max_length,
        image_size=paper.model.vision.image_size,
        normalizer=normalizer_for(paper.model.text),
        view_schedule=paper.train.view_schedule,
    )
    yield data
    data.close()


def test_lengths_caps_and_order_of_the_views(paper_data):
    assert paper_data.max_lengths == {"image": REFERENCE["caption_tokens"], "text": REFERENCE["text_tokens"]}
    assert paper_data.masking["image"].max_masks == REFERENCE["caption_max_masks"]
    assert paper_data.masking["text"].max_masks == REFERENCE["text_max_masks"]
    for spec in paper_data.masking.values():
        assert str(spec.rule) == "count"
        assert (spec.mask_prob, spec.skipgram_prob, spec.skipgram_size) == (
            REFERENCE["mask_prob"],
            REFERENCE["skipgram_prb"],
            REFERENCE["skipgram_size"],
        )
        assert (spec.mask_token_frac, spec.random_token_frac) == (0.8, 0.1)
    # Pretrain.py:257-279: each iteration is a parallel-text step, then an image-caption step
    assert [paper_data.view_for_step(s) for s in range(4)] == ["text", "image", "text", "image"]


def test_masked_counts_follow_the_reference_rule_on_real_batches(paper_data):
    for view, cap_key, tokens_key in (
        ("text", "text_max_masks", "text_tokens"),
        ("image", "caption_max_masks", "caption_tokens"),
    ):
        batch = paper_data.next_batch(view)
        lengths = batch["text_mask"].sum(dim=1)
        assert int(lengths.max()) == REFERENCE[tokens_key]  # the 70-word sentence is cut at the token cap
        masked = (batch["mlm_labels"] != IGNORE_INDEX).sum(dim=1)
        for n, m in zip(lengths.tolist(), masked.tolist(), strict=True):
            assert m == reference_mask_count(n, REFERENCE[cap_key]), (view, n, m)
        # dataset/utils.py pre_caption before tokenising: the ids are those of the normalised text
        tokenizer = paper_data._collator.tokenizer
        for text, row, n in zip(batch["texts"], batch["text_ids"], lengths.tolist(), strict=True):
            expected = tokenizer(pre_caption(text, 64), truncation=True, max_length=REFERENCE[tokens_key])
            assert row[:n].tolist() == expected["input_ids"]


def test_augmentation_is_the_reference_pretrain_transform(paper_data):
    transform = paper_data._transform
    assert tuple(transform.scale) == REFERENCE["crop_scale"]
    assert transform.hflip and not transform.hflip_careful
    assert transform.randaugment
    policy = transform._randaugment
    assert (policy.ops, policy.magnitude, policy.prob) == (*REFERENCE["randaugment"], 0.5)
    assert set(policy.op_names) == {  # dataset/__init__.py:35-36
        "Identity",
        "AutoContrast",
        "Equalize",
        "Brightness",
        "Sharpness",
        "ShearX",
        "ShearY",
        "TranslateX",
        "TranslateY",
        "Rotate",
    }


def test_random_token_share_and_span_lengths_on_a_fixed_sentence_set(paper_data, tiny_tokenizer):
    """Over many draws on the same sentences: 80/10/10 replacement, and the share of masked positions that sit
    in runs longer than one token matches the reference algorithm run on the same lengths."""
    from cclm.data.masking import mask_tokens

    spec = paper_data.masking["text"]
    enc = tiny_tokenizer(SENTENCES, padding="longest", truncation=True, max_length=64, return_tensors="pt")
    ids, attention = enc["input_ids"], enc["attention_mask"]
    ours_runs, ref_runs = [], []
    rng = random.Random(0)
    for seed in range(300):
        masked, labels = mask_tokens(ids, spec, torch.Generator().manual_seed(seed), attention_mask=attention)
        for row, n in zip(labels, attention.sum(dim=1).tolist(), strict=True):
            ours_runs.append(_multi_token_share((row != IGNORE_INDEX).nonzero().flatten().tolist()))
            ref_runs.append(_multi_token_share(_reference_positions(n, REFERENCE["text_max_masks"], rng)))
    assert abs(np.mean(ours_runs) - np.mean(ref_runs)) < 0.03


def _multi_token_share(positions: list[int]) -> float:
    chosen = set(positions)
    return sum((p - 1 in chosen) or (p + 1 in chosen) for p in chosen) / max(1, len(chosen))


def _reference_positions(n_tokens: int, cap: int, rng: random.Random) -> list[int]:
    """dataset/pretrain_dataset_multilingual.py:61-120 (no whole-word masking), with the paper's settings."""
    return reference_masked_positions(
        n_tokens, REFERENCE["mask_prob"], cap, REFERENCE["skipgram_prb"], REFERENCE["skipgram_size"], rng
    )
