"""A caption or sentence made only of invisible characters (zero-width spaces and joiners, a byte-order mark,
bidirectional marks, control characters, exotic spaces) is empty: the training readers skip it and count it as
``empty_caption`` / ``empty_text``, as they do a blank one, instead of training on a text that tokenises to nothing
or to <unk>. Text with something visible in it is kept as written."""

from __future__ import annotations

import json
import random

import pytest

from cclm.data.examples import caption_choices, parallel_example, visible_text
from cclm.data.regions import parse_regions
from cclm.data.skips import SkipSample
from tests.test_prep_converters import image_folder, prep, raw_json

__all__ = ["image_folder"]  # the fixture, shared with test_prep_converters

INVISIBLE = [
    "\u200b",  # zero-width space
    "\u200b\u200c\u200d",  # zero-width space, non-joiner, joiner
    "\ufeff",  # byte-order mark
    " \u200e\u200f ",  # left-to-right and right-to-left marks between spaces
    "\u2060\u00ad",  # word joiner, soft hyphen
    "\x00\x07",  # control characters
    "\u3000\u2028",  # ideographic space, line separator
]


@pytest.mark.parametrize("text", INVISIBLE)
def test_an_invisible_caption_is_skipped_as_empty(text):
    with pytest.raises(SkipSample) as skipped:
        caption_choices({"captions": {"en": text}}, frozenset())
    assert skipped.value.reason == "empty_caption"
    # beside a real caption it is dropped and the real one drawn
    assert caption_choices({"captions": {"en": [text, "a red circle"]}}, frozenset()) == [
        ("en", "a red circle")
    ]


@pytest.mark.parametrize("side", ["src", "tgt"])
@pytest.mark.parametrize("text", INVISIBLE)
def test_an_invisible_side_of_a_pair_is_skipped_as_empty(text, side):
    pair = {"src": "a red circle", "src_lang": "en", "tgt": "ein roter Kreis", "tgt_lang": "de", side: text}
    sample = {"__key__": "p1", "json": json.dumps(pair).encode()}
    with pytest.raises(SkipSample) as skipped:
        parallel_example(sample, frozenset(), swap=False, rng=random.Random(0))
    assert skipped.value.reason == "empty_text" and side in skipped.value.detail


def test_an_invisible_region_caption_or_attribute_is_dropped():
    meta = {
        "regions": [
            {"box": [0, 0, 10, 10], "captions": {"en": "\u200b\u200b"}},
            {"box": [0, 0, 10, 10], "captions": {"en": "a circle"}, "attributes": {"en": ["\ufeff", "red"]}},
        ]
    }
    regions, dropped = parse_regions(meta, frozenset())
    assert dropped == {"region_empty_caption": 1}
    assert [r.captions for r in regions] == [(("en", "a circle"),)]
    assert regions[0].attributes == (("en", "red"),)


def test_visible_text_keeps_what_shows_as_written():
    assert visible_text("  a\u200bb \n") == "a\u200bb"  # a zero-width space inside a word stays
    assert visible_text("日本語") == "日本語"
    assert visible_text("\u200b🙂") == "\u200b🙂"
    assert visible_text(None) == "" and visible_text(3) == ""


def test_the_converters_skip_invisible_captions_and_sentences_as_empty(tmp_path, image_folder):
    """``cclm prep`` counts them as the training readers do, so the shards hold no caption that shows nothing."""
    lines = [
        {"image": "sub/im5.jpg", "caption": {"en": ["five", "\u200b\u200d"], "de": "\ufeff"}},
        {"image": "sub/im5.jpg", "caption": "\u2060\u200e", "image_id": "only-invisible"},
    ]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(x) for x in lines), encoding="utf-8")
    out = tmp_path / "ic"
    assert (
        prep("cclm-jsonl", "--input", tmp_path / "c.jsonl", "--image-root", image_folder, "--out", out) == 0
    )
    assert [meta["captions"] for meta in raw_json(out).values()] == [{"en": ["five"]}]
    assert json.loads((out / "manifest.json").read_text())["skipped"] == {"empty_caption": 1}

    (tmp_path / "p.tsv").write_text("hello\thallo\n\u200b\tWelt\nworld\t\ufeff\u200c\n", encoding="utf-8")
    out = tmp_path / "pt"
    args = ["--input", tmp_path / "p.tsv", "--src-lang", "en", "--tgt-lang", "de", "--out", out]
    assert prep("parallel-tsv", *args) == 0
    assert json.loads((out / "manifest.json").read_text())["skipped"] == {"empty_text": 2}
