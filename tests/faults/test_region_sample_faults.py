"""Faults of region samples at training time (cclm.data.regions): a box reaching a pixel past the decoded image
(Visual Genome / COCO rounding) is cut to it and used, one reaching further is counted as a dropped region
(``region_outside_image``), and an image stored at another size than its JSON's ``image_size`` is a counted skip
(``image_size_mismatch``), with a warning -- never silently wrong boxes or silently lost regions."""

from __future__ import annotations

import json
import logging
import random
from collections import Counter

import pytest
from PIL import Image

from cclm.config import DataConfig, from_dict
from cclm.data.pipeline import PretrainData
from cclm.data.regions import RegionTransform, region_example
from cclm.data.shards import VIEW_IMAGE_CAPTION, ShardSink
from cclm.data.skips import SkipSample
from tests.test_data_pipeline import drain, jpeg

pytestmark = pytest.mark.usefixtures("one_thread")
ANY_LANGUAGE = frozenset()
SQUARE = {"box": [10, 10, 60, 50], "captions": {"en": "a square"}}


def sample(meta: dict, size=(100, 80), key="s1") -> dict:
    img = Image.new("RGB", size, (200, 200, 200))
    return {"__key__": key, "jpg": jpeg(img), "json": json.dumps(meta).encode()}


def draws(meta: dict, size=(100, 80), n=60) -> tuple[Counter, Counter, list]:
    seen, dropped, boxes = Counter(), Counter(), []
    for seed in range(n):
        ex = region_example(
            sample(meta, size), RegionTransform(32, min_perc_in_image=0.0), ANY_LANGUAGE, random.Random(seed)
        )
        seen.update(t.text for t in ex["targets"])
        dropped.update(ex["dropped"])
        boxes += [t.box for t in ex["targets"]]
    return seen, dropped, boxes


def test_a_box_one_pixel_past_the_image_is_cut_to_it_and_used():
    edge = {"box": [70, 10, 101, 80.6], "captions": {"en": "the edge thing"}}
    seen, dropped, boxes = draws({"regions": [SQUARE, edge], "image_size": [100, 80]})
    assert seen["the edge thing"] > 0 and seen["a square"] > 0
    assert dropped == Counter()
    assert all(0 <= v <= 1 for box in boxes for v in box)


def test_a_box_further_past_the_image_is_counted_as_a_dropped_region():
    beyond = {"box": [70, 10, 105, 50], "captions": {"en": "beyond"}}
    seen, dropped, _ = draws({"regions": [SQUARE, beyond], "image_size": [100, 80]}, n=10)
    assert "beyond" not in seen and seen["a square"] == 10
    assert dropped == {"region_outside_image": 10}


@pytest.mark.parametrize(
    "size,recorded",
    [((50, 40), [100, 80]), ((100, 80), [100, 78]), ((100, 80), "100x80"), ((100, 80), [100, 0])],
)
def test_an_image_of_another_size_than_its_image_size_is_skipped(size, recorded):
    meta = {"regions": [SQUARE], "image_size": recorded}
    with pytest.raises(SkipSample) as err:
        region_example(sample(meta, size), RegionTransform(32), ANY_LANGUAGE, random.Random(0))
    assert err.value.reason == "image_size_mismatch" and "s1" in err.value.detail


@pytest.mark.parametrize("recorded", [[101, 79], [100, 80], None])
def test_an_image_within_a_pixel_of_its_image_size_or_without_one_is_used(recorded):
    meta = {"regions": [SQUARE]} | ({"image_size": recorded} if recorded else {})
    ex = region_example(sample(meta), RegionTransform(32), ANY_LANGUAGE, random.Random(0))
    assert [t.text for t in ex["targets"]] == ["a square"]


def test_the_region_stream_counts_and_warns_both(tmp_path, tiny_tokenizer, caplog):
    """Through PretrainData: the skip counts name both faults, and the warning is logged."""
    beyond = {"box": [70, 10, 120, 50], "captions": {"en": "beyond"}}
    with ShardSink(tmp_path / "rg", VIEW_IMAGE_CAPTION, max_samples=10) as sink:
        for i in range(6):
            meta = {"regions": [SQUARE, beyond], "image_size": [100, 80]}
            size = (50, 40) if i % 3 == 0 else (100, 80)  # two images stored at half their recorded size
            img = Image.new("RGB", size, (100 + i, 50, 50))
            sink.write(f"reg{i}", {"jpg": jpeg(img), "json": json.dumps(meta).encode()}, ["en"])
        sink.close()
    cfg = from_dict(
        DataConfig,
        {
            "num_workers": 0,
            "sample_shuffle_buffer": 2,
            "image_caption": {"shards": str(tmp_path / "rg"), "batch_size": 2},
            "regions": {"shards": str(tmp_path / "rg"), "batch_size": 4, "max_images": 2},
        },
    )
    data = PretrainData(cfg, tiny_tokenizer, 32, image_size=16, epochs=1)
    with caplog.at_level(logging.WARNING, logger="cclm.data"):
        batches = drain(data, "region")
    # 4 targets kept (a batch short of targets is filled with copies of them: same key)
    assert sum(len(set(b["keys"])) for b in batches) == 4 and not any(
        "beyond" in t for b in batches for t in b["texts"]
    )
    assert data.skip_counts() == {"image_size_mismatch": 2, "region_outside_image": 4}
    assert "image_size_mismatch" in caplog.text and "region_outside_image" in caplog.text


def test_a_region_text_holding_half_a_character_is_a_counted_bad_json_skip():
    raw = json.dumps({"regions": [SQUARE], "image_size": [100, 80]}).replace('"a square"', '"a \\ud83d"')
    bad = {**sample({}), "json": raw.encode()}
    with pytest.raises(SkipSample) as err:
        region_example(bad, RegionTransform(32, min_perc_in_image=0.0), ANY_LANGUAGE, random.Random(0))
    assert err.value.reason == "bad_json" and "lone UTF-16 surrogate" in str(err.value)
