"""The region stream of PretrainData (data.regions, CCLM-4M).

Specification: region batches take the place of image batches at the configured rate, as a pure function of
(seed, step), for every schedule; a region batch holds at most max_images images, batch_size targets with their
boxes and tokenised, masked texts in the allowed languages; every region a sample cannot use is counted; a stopped
and resumed run gets exactly the batches of an uninterrupted one; the batches train the model's region view; a
config the region path cannot use fails naming its key. With parallel_with_regions (the cross-lingual consistency
objective) a region batch also carries the text stream's next batch, resumed as exactly."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from cclm.config import ConfigError, DataConfig, ViewSchedule, from_dict
from cclm.data.pipeline import PARALLEL_PAIR_KEYS, PretrainData
from cclm.data.shards import VIEW_IMAGE_CAPTION, ShardSink
from cclm.runtime.trainer import Trainer
from tests.test_data_pipeline import (
    assert_same,
    drain,
    jpeg,
    make_image,
    run_steps,
    write_image_shards,
    write_parallel_shards,
)

pytestmark = pytest.mark.usefixtures("one_thread")
REGION_LANGS = ["en", "de", "ja"]
STEPS = 2000


def region_meta(i: int) -> dict:
    """Image i (48 x 40): a whole-image caption on even images, two good regions, one in Japanese only, and on
    every third image a region with a box outside the image (a bad box)."""
    regions = [
        {"box": [2, 3, 20, 22], "captions": {"en": f"left thing {i}", "de": f"linkes Ding {i}"}},
        {"box": [25, 10, 46, 38], "captions": {"en": f"right thing {i}"}, "attributes": {"en": ["big"]}},
        {"box": [10, 5, 30, 30], "captions": {"ja": f"真ん中 {i}"}},
    ]
    if i % 3 == 0:
        regions.append({"box": [5, 5, 4, 9], "captions": {"en": "backwards box"}})
    meta = {"regions": regions, "image_size": [48, 40]}
    if i % 2 == 0:
        meta["captions"] = {"en": f"picture {i}"}
    return meta


def write_region_shards(folder, n=18, per_shard=4) -> None:
    with ShardSink(folder, VIEW_IMAGE_CAPTION, max_samples=per_shard) as sink:
        for i in range(n):
            sink.write(
                f"reg{i:04d}",
                {"jpg": jpeg(make_image(i)), "json": json.dumps(region_meta(i)).encode()},
                REGION_LANGS,
            )
        sink.close()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("region_shards")
    write_image_shards(root / "ic")
    write_parallel_shards(root / "pt")
    write_region_shards(root / "rg")
    return root


def config(root, text=True, **regions) -> DataConfig:
    cfg = {
        "num_workers": regions.pop("num_workers", 0),
        "sample_shuffle_buffer": 8,
        "image_caption": {"shards": str(root / "ic"), "batch_size": 4},
        "regions": {
            "shards": str(root / "rg"),
            "batch_size": 6,
            "max_images": 3,
            "max_regions": 3,
            **regions,
        },
    }
    if text:
        cfg["parallel_text"] = {"shards": str(root / "pt"), "batch_size": 3}
    return from_dict(DataConfig, cfg)


def test_region_steps_replace_image_steps_at_the_configured_rate(shards, tiny_tokenizer):
    cfg = config(shards, prob=0.3)
    data = PretrainData(cfg, tiny_tokenizer, 32, image_size=16, seed=3)
    views = [data.view_for_step(s) for s in range(STEPS)]
    again = PretrainData(cfg, tiny_tokenizer, 32, image_size=16, seed=3)
    assert views == [again.view_for_step(s) for s in range(STEPS)]
    image_steps = views.count("image") + views.count("region")
    assert 0.45 < image_steps / len(views) < 0.55  # the image/text draw is unchanged (equal weights)
    assert 0.26 < views.count("region") / image_steps < 0.34
    assert data.views == ("image", "text")  # what a schedule counts: a region step is an image step
    without = PretrainData(config(shards, prob=0.3), tiny_tokenizer, 32, image_size=16, seed=3)
    without.regions = None
    assert [v if v != "region" else "image" for v in views] == [
        without.view_for_step(s) for s in range(STEPS)
    ]
    summed = [data.views_for_step(s) for s in range(STEPS)]
    assert all(s[1] == "text" and s[0] in ("image", "region") for s in summed)
    assert 0.26 < sum(s[0] == "region" for s in summed) / len(summed) < 0.34
    # the trainer's sum schedule takes the source's views of each step (region steps included)
    trainer = SimpleNamespace(loop=SimpleNamespace(view_schedule=ViewSchedule.sum), source=data)
    assert [Trainer.views_for_step(trainer, s) for s in range(STEPS)] == summed


def test_a_region_batch_holds_its_images_once_with_boxes_and_masked_texts(shards, tiny_tokenizer):
    data = PretrainData(config(shards, languages=["en", "de"]), tiny_tokenizer, 32, image_size=16, epochs=1)
    batches = drain(data, "region")
    assert len(batches) == 6  # 18 images, 3 a batch
    for batch in batches:
        n = len(batch["texts"])  # 6, or all targets of the 3 images when fewer (a crop may cut a region out)
        assert 3 <= n <= 6 and batch["images"].shape[1:] == (3, 16, 16)
        assert sorted(set(batch["idx_to_group_img"].tolist())) == list(range(batch["images"].shape[0]))
        assert batch["text_ids"].shape[0] == n and batch["mlm_labels"].shape == batch["text_ids"].shape
        assert (batch["mlm_labels"] != -100).any()
        assert batch["boxes"].shape == (n, 4) and (batch["boxes"] >= 0).all() and (batch["boxes"] <= 1).all()
        assert (batch["boxes"][:, 2:] > batch["boxes"][:, :2]).all()
        whole = torch.tensor([t.startswith("picture") for t in batch["texts"]])
        assert torch.equal(batch["is_image"], whole)
        assert set(batch["langs"]) <= {"en", "de"} and not any("真ん中" in t for t in batch["texts"])
    # every read sample's unusable regions are counted: 6 bad boxes, 18 Japanese-only regions
    assert data.skip_counts() == {"region_bad_box": 6, "region_filtered_language": 18}


@pytest.mark.parametrize("num_workers,pairs", [(0, False), (2, False), (2, True)])
def test_resume_with_the_region_stream_is_exact(shards, tiny_tokenizer, num_workers, pairs):
    """Also with parallel pairs on region batches (xlc): the text stream serves both, resumed as one."""
    cfg = config(shards, prob=0.5, num_workers=num_workers)
    total, cut = 30, 13

    def build() -> PretrainData:
        return PretrainData(cfg, tiny_tokenizer, 32, image_size=16, seed=5, parallel_with_regions=pairs)

    full = build()
    reference = run_steps(full, range(total))
    full.close()
    first = build()
    head = run_steps(first, range(cut))
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    resumed = build()
    resumed.load_state_dict(state)
    tail = run_steps(resumed, range(cut, total))
    resumed.close()
    assert_same(head + tail, reference)
    assert {v for v, _ in reference} == {"image", "text", "region"}
    assert state["views"]["region"]["batches"] == sum(v == "region" for v, _ in reference[:cut])


def test_with_pairs_each_region_batch_carries_the_text_streams_next_batch(shards, tiny_tokenizer):
    """parallel_with_regions: a region batch is the same region batch plus the next parallel-text batch (sides A
    and B as parallel_ids / parallel_other_ids); text steps then take the batches after it."""
    cfg = config(shards, prob=0.5)
    plain = PretrainData(cfg, tiny_tokenizer, 32, image_size=16, seed=2)
    paired = PretrainData(cfg, tiny_tokenizer, 32, image_size=16, seed=2, parallel_with_regions=True)
    texts = [plain.next_batch("text") for _ in range(4)]
    for i in range(2):
        want, got = plain.next_batch("region"), paired.next_batch("region")
        assert torch.equal(got["text_ids"], want["text_ids"]) and torch.equal(got["boxes"], want["boxes"])
        for key, source in PARALLEL_PAIR_KEYS.items():
            assert torch.equal(got[key], texts[i][source]), key
    assert torch.equal(paired.next_batch("text")["other_ids"], texts[2]["other_ids"])
    assert paired.state_dict()["views"]["text"]["batches"] == 3


def test_a_text_stream_of_weight_zero_takes_no_steps_but_serves_the_pairs(shards, tiny_tokenizer):
    cfg = config(shards, prob=1.0)
    cfg.parallel_text.weight = 0.0
    data = PretrainData(cfg, tiny_tokenizer, 32, image_size=16, parallel_with_regions=True)
    assert data.views == ("image",)
    assert {data.view_for_step(s) for s in range(200)} == {"region"}
    assert "parallel_other_ids" in data.next_batch("region")
    cfg.image_caption.weight = -1.0
    with pytest.raises(ValueError, match="data.image_caption.weight=-1"):
        PretrainData(cfg, tiny_tokenizer, 32, image_size=16)


def test_pairs_on_region_batches_need_both_streams(shards, tiny_tokenizer):
    with pytest.raises(ConfigError, match="data.parallel_text"):
        PretrainData(config(shards, text=False), tiny_tokenizer, 32, parallel_with_regions=True)
    no_regions = config(shards)
    no_regions.regions = None
    with pytest.raises(ConfigError, match="data.regions"):
        PretrainData(no_regions, tiny_tokenizer, 32, parallel_with_regions=True)


def test_region_batches_train_the_models_region_view(shards, tiny_tokenizer, tiny_model_cfg):
    from cclm.model import CrossViewModel

    tiny_model_cfg.objectives.bbox = True
    model = CrossViewModel(tiny_model_cfg, load_pretrained=False)
    data = PretrainData(config(shards, text=False), tiny_tokenizer, 32, image_size=32)
    batch = data.next_batch("region")
    out = model({k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}, "region")
    assert {"itc", "itm", "mlm", "bbox", "giou"} <= set(out) and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert model.box_head.mlp[0].weight.grad.abs().sum() > 0


def test_region_configs_the_path_cannot_use_fail_naming_the_key(shards, tiny_tokenizer):
    with pytest.raises(ConfigError, match="data.regions.prob"):
        PretrainData(config(shards, prob=0.0), tiny_tokenizer, 32)
    with pytest.raises(ConfigError, match="data.regions.max_images"):
        PretrainData(config(shards, max_images=0), tiny_tokenizer, 32)
    no_images = config(shards)
    no_images.image_caption = None
    with pytest.raises(ConfigError, match="data.image_caption"):
        PretrainData(no_images, tiny_tokenizer, 32)
    missing = config(shards)
    missing.regions.shards = str(shards / "nowhere")
    with pytest.raises(FileNotFoundError, match="data.regions.shards"):
        PretrainData(missing, tiny_tokenizer, 32)


def test_data_randaugment_changes_region_pixels_only_never_their_boxes(shards, tiny_tokenizer):
    """With data.randaugment, region crops get the reference's box-safe ops (no pixel moves): the same crops,
    flips, targets and boxes, other pixels. An op that moves pixels is refused."""
    plain = drain(
        PretrainData(config(shards, text=False), tiny_tokenizer, 32, image_size=16, epochs=1), "region"
    )
    augmented_cfg = config(shards, text=False)
    augmented_cfg.randaugment = True
    augmented = drain(PretrainData(augmented_cfg, tiny_tokenizer, 32, image_size=16, epochs=1), "region")
    for a, b in zip(plain, augmented):
        assert a["texts"] == b["texts"] and torch.equal(a["boxes"], b["boxes"])
        assert torch.equal(a["idx_to_group_img"], b["idx_to_group_img"])
    assert any(not torch.equal(a["images"], b["images"]) for a, b in zip(plain, augmented))
    from cclm.data.regions import RegionTransform
    from cclm.data.transforms import RandAugment

    with pytest.raises(ValueError, match="TranslateX"):
        RegionTransform(16, randaugment=RandAugment(2, 7, op_names=("Brightness", "TranslateX")))


def test_a_negative_consistency_weight_is_refused_before_anything_starts(tmp_path):
    from cclm.config import PretrainConfig, load_config
    from cclm.train.pretrain import Pretraining

    from .pretrain_runs import REPO

    cfg = load_config(
        PretrainConfig,
        REPO / "configs" / "pretrain" / "demo.yaml",
        [
            "model.objectives.xlc_weight=-1",
            "data.image_caption.shards=x",
            "data.parallel_text.shards=y",
            "model.text.tokenizer=z",  # demo.yaml leaves it to fill in (???)
            f"output_dir={tmp_path / 'run'}",
        ],  # fmt: skip
    )
    with pytest.raises(ConfigError, match="model.objectives.xlc_weight must be >= 0"):
        Pretraining(cfg)
    assert not (tmp_path / "run").exists()
