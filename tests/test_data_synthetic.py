"""The synthetic world: captions follow the drawn scene in every language, parallel pairs align, held-out sets
are disjoint from training, and the files have the documented layout."""

from __future__ import annotations

import hashlib
import json
import random
import tarfile

import numpy as np
import pytest

from data_prep.world.build import build_world
from data_prep.world.grammar import COLOURS, SHAPES, grammar
from data_prep.world.scenes import ALL_LANGUAGES, RGB, Scene, render, sample_scene


def test_captions_name_the_drawn_colour_in_every_language():
    rng = random.Random(0)
    for _ in range(60):
        scene = sample_scene(rng)
        pixels = np.asarray(render(scene, 64)).astype(int)
        for item in scene.items:  # the drawn colour is where the caption says an object is
            centre = pixels[int(item.y * 64), int(item.x * 64)]
            assert np.abs(centre - np.array(RGB[item.colour])).max() < 40
        for lang in ALL_LANGUAGES:
            text = scene.caption(lang)
            for item in scene.items:
                assert any(word in text for word in grammar(lang).colour_words(item.colour)), (lang, text)
            absent = [c for c in COLOURS if c not in {i.colour for i in scene.items}]
            for colour in absent:
                assert not any(
                    w in text.split() for w in grammar(lang).colour_words(colour) if lang not in ("ja", "zh")
                )


def test_grammars_agree_in_gender_case_and_word_order():
    assert grammar("de").single("big", "red", "square", "left") == "ein großes rotes Quadrat links"
    assert grammar("de").relation(("red", "circle"), "left_of", ("blue", "triangle")) == (
        "ein roter Kreis links von einem blauen Dreieck"
    )
    assert grammar("de").exists(1, "green", "star") == "es gibt einen grünen Stern"
    assert grammar("fr").single("small", "green", "star", "right") == "une petite étoile verte à droite"
    assert grammar("fr").relation(("red", "circle"), "above", ("blue", "star")) == (
        "un cercle rouge au-dessus d'une étoile bleue"
    )
    assert grammar("fr").neutral("purple", "star") == "l'étoile violette est en bois"
    assert grammar("es").count(3, "red", "star") == "tres estrellas rojas"
    assert grammar("ja").relation(("red", "circle"), "left_of", ("blue", "square")) == "青い四角の左に赤い丸"
    assert grammar("zh").count(2, "red", "circle") == "两个红色的圆形"
    with pytest.raises(ValueError, match="no grammar"):
        grammar("xx")


def _tar_members(folder):
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                yield member.name, tar.extractfile(member).read()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world") / "w"
    info = build_world(
        out,
        num_images=120,
        parallel_langs=["de", "ja"],
        num_parallel=60,
        heldout_images=40,
        xvnli_images=20,
        image_size=32,
        seed=3,
    )
    return out, info


def test_world_layout_and_manifests(world):
    out, info = world
    manifest = json.loads((out / "image_caption" / "manifest.json").read_text())
    sizes = json.loads((out / "image_caption" / "sizes.json").read_text())
    assert manifest["samples"] == sum(sizes.values()) == 120 and manifest["languages"] == {"en": 120}
    assert json.loads((out / "parallel" / "manifest.json").read_text())["samples"] == 120
    assert info["heldout_langs"] == ["de", "en", "ja"]
    assert (out / "text" / "corpus.txt").read_text().count("\n") == 120 + 2 * 120


def test_parallel_pairs_align(world):
    out, _ = world
    pairs = [json.loads(data) for name, data in _tar_members(out / "parallel")]
    assert {p["tgt_lang"] for p in pairs} == {"de", "ja"} and all(p["src_lang"] == "en" for p in pairs)
    for pair in pairs:
        for colour in COLOURS:
            in_src = colour in pair["src"].split()
            in_tgt = any(w in pair["tgt"] for w in grammar(pair["tgt_lang"]).colour_words(colour))
            assert in_src == in_tgt, pair


def test_heldout_sets_are_disjoint_from_training_and_well_formed(world):
    out, _ = world
    train_images = {
        hashlib.sha1(d).hexdigest() for n, d in _tar_members(out / "image_caption") if n.endswith("jpg")
    }
    for lang in ("de", "en", "ja"):
        folder = out / "heldout" / lang
        lines = [json.loads(line) for line in (folder / "retrieval.jsonl").read_text().splitlines()]
        assert len(lines) == 40
        captions = [line["captions"][lang][0] for line in lines]
        assert len(set(captions)) == 40  # every query has one right answer
        for line in lines:
            data = (folder / line["image"]).read_bytes()
            assert hashlib.sha1(data).hexdigest() not in train_images
    xvnli = [json.loads(line) for line in (out / "xvnli/annotations/de/test.jsonl").read_text().splitlines()]
    assert {x["gold_label"] for x in xvnli} == {"entailment", "neutral", "contradiction"}
    for x in xvnli:
        assert (out / "xvnli" / "images" / f"{x['Flikr30kID']}.jpg").exists()
        assert x["sentence2"] and x["pairID"]


def test_entailment_hypotheses_are_true_and_contradictions_false():
    from data_prep.world.scenes import hypotheses

    rng = random.Random(1)
    for _ in range(100):
        scene: Scene = sample_scene(rng)
        counts = scene.object_counts()
        for label, spec in hypotheses(scene, rng):
            if spec[0] != "exists":
                continue
            _, n, colour, shape = spec
            holds = counts.get((colour, shape), 0) == n
            assert holds == (label == "entailment"), (scene.caption("en"), label, spec)


def test_world_rejects_bad_options(tmp_path):
    with pytest.raises(ValueError, match="no grammar"):
        build_world(tmp_path / "a", num_images=5, caption_langs=["en", "qq"])
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("")
    with pytest.raises(FileExistsError):
        build_world(tmp_path / "b", num_images=5)


def test_world_does_not_depend_on_the_number_of_drawing_processes(tmp_path):
    kw = dict(
        num_images=30, parallel_langs=["fr"], num_parallel=10, heldout_images=5, xvnli_images=3, image_size=24
    )
    build_world(tmp_path / "a", **kw)
    build_world(tmp_path / "b", num_workers=2, **kw)
    assert dict(_tar_members(tmp_path / "a" / "image_caption")) == dict(
        _tar_members(tmp_path / "b" / "image_caption")
    )
    for name in ("heldout/en/images", "heldout/fr/images"):
        a = {p.name: p.read_bytes() for p in (tmp_path / "a" / name).iterdir()}
        b = {p.name: p.read_bytes() for p in (tmp_path / "b" / name).iterdir()}
        assert a and a == b, name


def test_parallel_phrases_name_one_object_as_region_descriptions_do_and_leave_the_rest_alone(tmp_path):
    kw = dict(num_images=12, parallel_langs=["de", "ja"], num_parallel=8, heldout_images=4, xvnli_images=2,
              image_size=24, seed=4, regions=True, region_langs=["en"])  # fmt: skip
    build_world(tmp_path / "plain", **kw)
    info = build_world(tmp_path / "phrases", parallel_phrases=5, **kw)
    plain = dict(_tar_members(tmp_path / "plain" / "parallel"))
    with_phrases = dict(_tar_members(tmp_path / "phrases" / "parallel"))
    assert {k: v for k, v in with_phrases.items() if k in plain} == plain  # the sentences are unchanged
    phrases = [json.loads(v) for k, v in with_phrases.items() if k not in plain]
    assert len(phrases) == 2 * 5 and info["parallel_pairs"] == 2 * 8 + 2 * 5 and info["parallel_phrases"] == 5
    forms = {
        (grammar("en").thing(c, s, z), lang, grammar(lang).thing(c, s, z))
        for c in COLOURS for s in SHAPES for z in (None, "big", "small") for lang in ("de", "ja")
    }  # fmt: skip
    assert all((p["src"], p["tgt_lang"], p["tgt"]) in forms for p in phrases), phrases
    # the held-out region descriptions are phrases of this kind
    described = [json.loads(line)["text"] for line in (tmp_path / "phrases" / "heldout" / "de" / "grounding.jsonl")
                 .read_text().splitlines()]  # fmt: skip
    thing_forms = {f[2] for f in forms if f[1] == "de"}
    assert any(text in thing_forms for text in described)
    # the images and captions do not change
    assert dict(_tar_members(tmp_path / "plain" / "image_caption")) == dict(
        _tar_members(tmp_path / "phrases" / "image_caption")
    )
