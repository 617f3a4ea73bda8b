"""The demo's tokenizer: ``train_tokenizer(split_cjk=True)`` makes every CJK character a piece of its own (as BERT's
tokenizer does), keeps text without CJK characters as before, and decodes back to the text."""

from __future__ import annotations

import random
import unicodedata

import pytest

from cclm.data.tokenize import load_tokenizer, train_tokenizer
from data_prep.world.scenes import ALL_LANGUAGES, sample_scene


def _is_han(ch: str) -> bool:
    return unicodedata.name(ch, "").startswith("CJK UNIFIED IDEOGRAPH")


@pytest.fixture(scope="module")
def world_text() -> dict[str, list[str]]:
    rng = random.Random(0)
    scenes = [sample_scene(rng) for _ in range(300)]
    return {lang: [scene.caption(lang) for scene in scenes] for lang in ALL_LANGUAGES}


@pytest.fixture(scope="module")
def split_tokenizer(world_text, tmp_path_factory):
    corpus = [text for texts in world_text.values() for text in texts]
    folder = tmp_path_factory.mktemp("tok_split_cjk")
    train_tokenizer(corpus, folder, vocab_size=400, model="bpe", split_cjk=True)
    return load_tokenizer(str(folder))  # what the demo's training and evaluation load


@pytest.mark.parametrize("lang", ["ja", "zh"])
def test_cjk_characters_are_pieces_of_their_own(split_tokenizer, world_text, lang):
    for text in world_text[lang][:50]:
        pieces = split_tokenizer.tokenize(text)
        for piece in pieces:
            if any(_is_han(ch) for ch in piece):
                assert len(piece) == 1, (text, pieces)  # no "▁" glued to it, no neighbour merged into it
        assert "".join(pieces).lstrip("▁") == text  # nothing dropped, no <unk>


def test_a_character_is_the_same_piece_at_the_start_and_inside(split_tokenizer):
    # "赤い丸" starts one caption and ends another: 赤 must not become a different piece ("▁赤") at the start.
    first = split_tokenizer.tokenize("赤い丸")
    inner = split_tokenizer.tokenize("青い四角の左に赤い丸")
    assert first[0] == "▁" and "赤" in first and "赤" in inner


@pytest.mark.parametrize(
    "text",
    [
        "左に小さい黄色い星",
        "青い四角の左に赤い丸",
        "两个红色的圆形",
        "蓝色正方形的左边有一个红色圆形",
        "a 赤い circle 星 b",
    ],
)
def test_round_trip(split_tokenizer, text):
    ids = split_tokenizer(text)["input_ids"]
    assert split_tokenizer.decode(ids, skip_special_tokens=True) == text


def test_text_without_cjk_is_pre_tokenised_as_before(world_text, tmp_path):
    latin = [text for lang in ("en", "de", "fr", "es") for text in world_text[lang]]
    plain = train_tokenizer(latin, tmp_path / "plain", vocab_size=300, model="bpe")
    split = train_tokenizer(latin, tmp_path / "split", vocab_size=300, model="bpe", split_cjk=True)
    assert plain.get_vocab() == split.get_vocab()
    for text in latin[:200]:
        assert plain.tokenize(text) == split.tokenize(text)


def test_default_is_unchanged(tmp_path):
    tokenizer = train_tokenizer(["a red circle", "左に赤い丸"] * 20, tmp_path / "tok", vocab_size=60)
    assert type(tokenizer.backend_tokenizer.pre_tokenizer).__name__ == "Metaspace"
    pre_tokens = tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str("左に赤い丸 a")
    assert [piece for piece, _ in pre_tokens] == ["▁左に赤い丸", "▁a"]  # one Metaspace word, as before


@pytest.mark.parametrize("model", ["unigram", "bpe"])
def test_the_same_corpus_gives_the_same_tokenizer(world_text, tmp_path, model):
    """Unigram's trainer numbered pieces of equal score in hash-map order and carried float noise from its
    parallel sums: the same corpus gave other ids from run to run (tests that depend on them were flaky)."""
    corpus = [text for texts in world_text.values() for text in texts]
    files = []
    for run in range(4):
        train_tokenizer(corpus, tmp_path / str(run), vocab_size=300, model=model)
        files.append((tmp_path / str(run) / "tokenizer.json").read_bytes())
    assert all(f == files[0] for f in files[1:])
