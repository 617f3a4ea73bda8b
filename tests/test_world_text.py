"""The synthetic world's text, pinned: every sentence every grammar can say, byte for byte. The demo's tokenizer,
its training data and its results table depend on this exact text, so a change here must be deliberate."""

from __future__ import annotations

import hashlib
import itertools
import random

import pytest

from data_prep.world.build import build_world
from data_prep.world.grammar import COLOURS, COUNTS, POSITIONS, RELATIONS, SHAPES, SIZES, grammar
from data_prep.world.scenes import ALL_LANGUAGES, sample_scene

OBJECTS = list(itertools.product(COLOURS, SHAPES))


def every_sentence(lang: str) -> list[str]:
    """Each sentence type over its whole attribute space, then the colour words."""
    g = grammar(lang)
    out = [g.single(s, c, sh, p) for s, (c, sh), p in itertools.product(SIZES, OBJECTS, POSITIONS)]
    out += [g.count(n, c, sh) for n, (c, sh) in itertools.product(COUNTS, OBJECTS)]
    out += [g.relation(a, r, b) for a, r, b in itertools.product(OBJECTS, RELATIONS, OBJECTS) if a != b]
    out += [g.exists(n, c, sh) for n, (c, sh) in itertools.product((1, *COUNTS), OBJECTS)]
    out += [g.neutral(c, sh) for c, sh in OBJECTS]
    out += ["|".join(g.colour_words(c)) for c in COLOURS]
    return out


DIGESTS = {
    "en": "3000adf539203c69de60775ebcb6526605d867275939df2a2521205273e5ca7b",
    "de": "18af9f1c292a555bb8f571f4d6a366035bc0ae8275aaa8b03773ed859d3499b9",
    "fr": "6cbb747b8b99d6863279679e282fdf105727ee92767879485ef83a33c4817876",
    "es": "ccdbadd8eaa06c14ecba3ff47774407466accb50bb538a5ca8d67121a6541e57",
    "ja": "7000df88dd15be0a016e41e65e4030944ad011acdecf54846276ff895c5d9917",
    "zh": "016ec28a242505e7662acee60718980e7897c0350e6e9cfaaf50025c3512e706",
}


@pytest.mark.parametrize("lang", ALL_LANGUAGES)
def test_every_sentence_of_every_grammar_is_unchanged(lang):
    sentences = every_sentence(lang)
    assert len(sentences) == 240 + 48 + 1104 + 72 + 24 + 6
    digest = hashlib.sha256("\n".join(sentences).encode()).hexdigest()
    assert digest == DIGESTS[lang]


# The first three scenes drawn from seed 7: one of each kind (single, count, relation).
CAPTIONS = {
    "en": [
        "a big red circle at the bottom",
        "two red circles",
        "a green circle to the left of a purple star",
    ],
    "de": [
        "ein großer roter Kreis unten",
        "zwei rote Kreise",
        "ein grüner Kreis links von einem violetten Stern",
    ],
    "fr": [
        "un grand cercle rouge en bas",
        "deux cercles rouges",
        "un cercle vert à gauche d'une étoile violette",
    ],
    "es": [
        "un círculo rojo grande abajo",
        "dos círculos rojos",
        "un círculo verde a la izquierda de una estrella morada",
    ],
    "ja": ["下に大きい赤い丸", "赤い丸が二つ", "紫の星の左に緑の丸"],
    "zh": ["下面有一个大的红色圆形", "两个红色的圆形", "紫色星形的左边有一个绿色圆形"],
}


@pytest.mark.parametrize("lang", ALL_LANGUAGES)
def test_seeded_scenes_have_the_pinned_captions(lang):
    rng = random.Random(7)
    assert [sample_scene(rng).caption(lang) for _ in range(3)] == CAPTIONS[lang]


def test_a_built_world_has_the_pinned_text(tmp_path):
    """Training corpus, held-out captions and XVNLI sentences of a small world in all six languages."""
    world = tmp_path / "w"
    build_world(
        world, num_images=20, num_parallel=20, heldout_images=5, xvnli_images=5, image_size=16, seed=2
    )
    files = [
        "text/corpus.txt",
        *sorted(world.glob("heldout/*/*.jsonl")),
        *sorted(world.glob("xvnli/*/*/*.jsonl")),
    ]
    assert len(files) == 1 + 6 + 6 * 3
    digest = hashlib.sha256(b"".join((world / f).read_bytes() for f in files)).hexdigest()
    assert digest == "fdf94c7c8df2fb8714234ee1877f51643894b5dd7b7ce9cbdb9dc9302dae3538"
