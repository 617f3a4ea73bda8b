"""The inference API (cclm.load / CCLM): it computes exactly what training computes, and a trained model
retrieves the right image for queries in two languages."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import cclm
from cclm.data.transforms import EvalTransform
from cclm.inference.api import CCLM, eval_transform
from cclm.model import CrossViewModel
from data_prep.world.grammar import COLOURS
from data_prep.world.scenes import RADIUS, Item, Scene, render

WORLD_SHAPES = ("circle", "square", "triangle", "star", "square", "circle")


def world() -> list[tuple[Scene, str, str]]:
    """Six single-object scenes of the synthetic world, one per colour: (scene, English caption, German caption)."""
    items = []
    for colour, shape in zip(COLOURS, WORLD_SHAPES):
        scene = Scene(
            "single", (Item(shape, colour, RADIUS["big"], 0.5, 0.5),), size="big", position="centre"
        )
        items.append((scene, scene.caption("en"), scene.caption("de")))
    return items


def shape_image(scene: Scene, rng: random.Random, size: int = 32) -> Image.Image:
    """The scene drawn by the synthetic world's renderer, its object moved a little at random."""
    item = scene.items[0]
    moved = replace(item, x=item.x + rng.uniform(-0.08, 0.08), y=item.y + rng.uniform(-0.08, 0.08))
    return render(replace(scene, items=(moved,)), size, supersample=2)


def test_load_returns_ready_model_with_tokenizer_and_transform(tiny_model_dir):
    engine = cclm.load(tiny_model_dir, device="cpu")
    assert isinstance(engine, CCLM)
    assert engine.dtype == torch.float32 and not engine.model.training
    assert engine.transform(Image.new("RGB", (50, 80))).shape == (3, 32, 32)
    assert engine.tokenizer.mask_token == "<mask>"


def test_encode_texts_equals_training_forward(tiny_model_dir):
    engine = cclm.load(tiny_model_dir, device="cpu")
    texts = ["a red circle above a blue square", "青い四角の上に赤い丸", "zwei kleine grüne Dreiecke links"]
    model = CrossViewModel.from_pretrained(tiny_model_dir).eval()
    enc = engine.tokenizer(texts, padding=True, return_tensors="pt")
    expected = model.encode_text(enc["input_ids"], enc["attention_mask"])[1]
    got = engine.encode_texts(texts, batch_size=2)  # batching and different padding must not matter
    torch.testing.assert_close(got, expected.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(3))


def test_encode_images_equals_training_forward(tiny_model_dir, tmp_path):
    engine = cclm.load(tiny_model_dir, device="cpu")
    rng = random.Random(0)
    images = [shape_image(scene, rng) for scene, *_ in world()[:3]]
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    model = CrossViewModel.from_pretrained(tiny_model_dir).eval()
    pixels = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images])
    expected = model.encode_image(pixels)[1].detach()
    torch.testing.assert_close(engine.encode_images(images, batch_size=2), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(engine.encode_images(paths), expected, atol=1e-5, rtol=1e-5)
    # files go through the data pipeline's evaluation transform, on their bytes
    jpeg = tmp_path / "scene.jpg"
    shape_image(world()[0][0], rng, size=80).save(jpeg, quality=90)
    pipeline_pixels = torch.from_numpy(EvalTransform(32)(jpeg.read_bytes()).copy()).permute(2, 0, 1)[None]
    expected_jpeg = model.encode_image(pipeline_pixels)[1].detach()
    torch.testing.assert_close(engine.encode_images([jpeg]), expected_jpeg, atol=1e-5, rtol=1e-5)
    # a larger, non-square image is resized whole to the square input (no crop)
    big = images[0].resize((64, 96))
    expected_big = model.encode_image(eval_transform(32)(big)[None])[1].detach()
    torch.testing.assert_close(engine.encode_images([big]), expected_big, atol=1e-5, rtol=1e-5)


def test_match_is_the_itm_probability_of_the_fused_pair(tiny_model_dir):
    engine = cclm.load(tiny_model_dir, device="cpu")
    rng = random.Random(0)
    items = world()[:2]
    images = [shape_image(scene, rng) for scene, *_ in items]
    texts = [en for _, en, _ in items]
    model = CrossViewModel.from_pretrained(tiny_model_dir).eval()
    enc = engine.tokenizer(texts, padding=True, return_tensors="pt")
    image_tokens = model.encode_image(engine.image_tensor(images))[0]
    text_tokens = model.encode_text(enc["input_ids"], enc["attention_mask"])[0]
    fused = model.fuse(text_tokens, enc["attention_mask"], image_tokens)
    expected = model.itm_logits(fused).softmax(-1)[:, 1].detach()
    torch.testing.assert_close(engine.match(images, texts), expected, atol=1e-5, rtol=1e-5)
    # one image against several texts is the same as the image repeated
    torch.testing.assert_close(engine.match(images[:1], texts), engine.match([images[0]] * 2, texts))
    with pytest.raises(ValueError, match="as many images as texts"):
        engine.match(images, texts + ["x"])


def per_query_rerank(engine, queries, gallery, k: int, rerank_k: int):
    """The re-ranking the API did before it pooled pairs across queries: each query's top ``rerank_k`` by ITC,
    scored with :meth:`CCLM.match` one query at a time and sorted by that probability."""
    text_queries = isinstance(queries[0], str)
    encode_queries, encode_gallery = (
        (engine.encode_texts, engine.encode_images)
        if text_queries
        else (engine.encode_images, engine.encode_texts)
    )
    similarity = encode_queries(queries) @ encode_gallery(gallery).t()
    candidates = similarity.topk(max(k, min(rerank_k, len(gallery))), dim=1).indices
    scores, indices = [], []
    for query, row in zip(queries, candidates):
        items = [gallery[int(i)] for i in row]
        probs = engine.match(items, [query]) if text_queries else engine.match([query], items)
        order = probs.argsort(descending=True)[:k]
        scores.append(probs[order])
        indices.append(row[order])
    return torch.stack(scores), torch.stack(indices)


def test_batched_rerank_equals_the_per_query_algorithm(tiny_model_dir):
    engine = cclm.load(tiny_model_dir, device="cpu")
    rng = random.Random(0)
    items = world()
    images = [shape_image(scene, rng) for scene, *_ in items]
    texts = [en for _, en, _ in items] + [de for _, _, de in items]
    for queries, gallery in ((texts, images), (images[:4], texts)):
        got = engine.retrieve(queries, gallery, k=3, rerank=True, rerank_k=5, batch_size=4)
        scores, indices = per_query_rerank(engine, queries, gallery, k=3, rerank_k=5)
        assert torch.equal(got.indices, indices)
        torch.testing.assert_close(got.scores, scores)


def test_bf16_inference_stays_close_to_fp32(tiny_model_dir):
    fp32 = cclm.load(tiny_model_dir, device="cpu", dtype="fp32")
    bf16 = cclm.load(tiny_model_dir, device="cpu", dtype="bf16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    texts = ["a red circle", "ein roter Kreis"]
    images = [shape_image(world()[0][0], random.Random(0))]
    for a, b in (
        (fp32.encode_texts(texts), bf16.encode_texts(texts)),
        (fp32.encode_images(images), bf16.encode_images(images)),
    ):
        assert b.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(a, b).min() > 0.98


def _train_on_shapes(model: CrossViewModel, tokenizer, steps: int = 120) -> None:
    """A short ITC + ITM run on 8 distinct coloured shapes, each with its English and its German caption."""
    rng = random.Random(0)
    items = world()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    threads = torch.get_num_threads()
    # a tiny model gains nothing from threads, and loses a lot to oversubscription on a shared 2-core machine
    torch.set_num_threads(1)
    try:
        _steps(model, optimizer, tokenizer, items, rng, steps)
    finally:
        torch.set_num_threads(threads)
    model.eval()


def _steps(model, optimizer, tokenizer, items, rng, steps):
    transform = eval_transform(32)
    enc = tokenizer([it[1] for it in items] + [it[2] for it in items], padding=True, return_tensors="pt")
    group_ids = torch.arange(len(items)).repeat(2)
    for _ in range(steps):
        images = torch.stack([transform(shape_image(scene, rng)) for scene, *_ in items])
        batch = {
            "images": images.repeat(2, 1, 1, 1),
            "text_ids": enc["input_ids"],
            "text_mask": enc["attention_mask"],
            "group_ids": group_ids,
        }
        loss = model(batch, "image")["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_retrieve_returns_the_gold_image_first_after_training(tmp_path, tiny_model_cfg):
    from cclm.data.tokenize import train_tokenizer

    items = world()
    tokenizer = train_tokenizer([t for it in items for t in it[1:]] * 10, tmp_path / "tok", vocab_size=120)
    tiny_model_cfg.text.encoder["vocab_size"] = len(tokenizer)
    model = CrossViewModel(tiny_model_cfg, load_pretrained=False)
    _train_on_shapes(model, tokenizer)
    model.save_pretrained(tmp_path / "trained")
    tokenizer.save_pretrained(str(tmp_path / "trained"))

    engine = cclm.load(tmp_path / "trained", device="cpu")
    # new random draws of each shape, never seen in training
    gallery = [shape_image(scene, random.Random(100 + i)) for i, (scene, *_) in enumerate(items)]
    queries = [it[1] for it in items] + [it[2] for it in items]
    gold = torch.arange(len(items)).repeat(2)
    top = engine.retrieve(queries, gallery, k=3)
    assert top.indices.shape == (12, 3) and (top.scores[:, :-1] >= top.scores[:, 1:]).all()
    recall_at_1 = (top.indices[:, 0] == gold).float().mean().item()
    assert recall_at_1 >= 0.75, f"R@1 {recall_at_1:.2f} (chance 0.17)"
    # precomputed gallery features give the same ranking
    feats = engine.encode_images(gallery)
    assert torch.equal(engine.retrieve(queries, feats, k=3).indices, top.indices)
    # ITM re-ranking scores the same candidates with match() and reorders them by that probability
    reranked = engine.retrieve(queries[:4], gallery, k=2, rerank=True, rerank_k=4)
    for q, (scores, indices) in enumerate(zip(reranked.scores, reranked.indices)):
        expected = engine.match([gallery[int(i)] for i in indices], [queries[q]])
        torch.testing.assert_close(scores, expected)
        assert scores[0] >= scores[1]
    with pytest.raises(ValueError, match="rerank=True needs the gallery items"):
        engine.retrieve(queries, feats, k=2, rerank=True)
    # image queries search a text gallery
    image_to_text = engine.retrieve(gallery, [it[1] for it in items], k=1)
    assert (image_to_text.indices[:, 0] == torch.arange(len(items))).float().mean() >= 0.75


def test_retrieve_reads_image_paths_as_image_queries_in_every_form(tiny_model_dir, tmp_path):
    """``model.retrieve(image_paths, captions)``: existing files given as ``str`` are images, as Path, PIL and
    uint8 tensors are; each form gives the same ranking of the captions."""
    engine = cclm.load(tiny_model_dir, device="cpu")
    rng = random.Random(3)
    scenes = world()
    pictures = [shape_image(scene, rng) for scene, *_ in scenes]
    paths = []
    for i, picture in enumerate(pictures):
        paths.append(tmp_path / f"{i}.png")
        picture.save(paths[-1])
    captions = [en for _, en, _ in scenes]
    expected = engine.retrieve(pictures, captions, k=3)
    tensors = [engine.transform(p) for p in pictures]
    for queries in ([str(p) for p in paths], paths, tensors):
        got = engine.retrieve(queries, captions, k=3)
        assert torch.equal(got.indices, expected.indices)
        torch.testing.assert_close(got.scores, expected.scores)
    # the other direction still reads strings as text and paths in the gallery as images
    back = engine.retrieve(captions, [str(p) for p in paths], k=2)
    assert torch.equal(back.indices, engine.retrieve(captions, pictures, k=2).indices)
    reranked = engine.retrieve([str(p) for p in paths[:2]], captions, k=2, rerank=True, rerank_k=4)
    for q, (scores, indices) in enumerate(zip(reranked.scores, reranked.indices)):
        torch.testing.assert_close(scores, engine.match([pictures[q]], [captions[int(i)] for i in indices]))


def test_retrieve_says_how_to_search_captions_when_the_image_paths_do_not_exist(tiny_model_dir, tmp_path):
    from cclm.data.images import MissingImageError

    engine = cclm.load(tiny_model_dir, device="cpu")
    captions = ["a small yellow star on the left", "a big red circle"]
    missing = [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")]
    with pytest.raises(
        ValueError, match="'a small yellow star on the left' is no image file.*pass the images as"
    ):
        engine.retrieve(missing, captions)
    with pytest.raises(MissingImageError, match="a.jpg"):  # said outright: the missing file is named
        engine.retrieve(missing, captions, query_type="image")
    Image.new("RGB", (8, 8)).save(tmp_path / "c.png")
    both = [str(tmp_path / "c.png")]
    with pytest.raises(ValueError, match="both the queries and the gallery are existing files"):
        engine.retrieve(both, both)
    with pytest.raises(
        MissingImageError, match=r"1 gallery images not found: .*a\.jpg"
    ):  # some paths missing
        engine.retrieve(captions, [str(tmp_path / "c.png"), missing[0]])
    with pytest.raises(ValueError, match="query_type must be one of"):
        engine.retrieve(captions, both, query_type="caption")
    # a text query that happens to name a file searches a gallery of images (here Path objects) as text
    assert engine.retrieve(both, [tmp_path / "c.png"]).scores.shape == (1, 1)
    # and is searchable as text when said so
    assert engine.retrieve(both, [Image.new("RGB", (8, 8))], query_type="text").indices.shape == (1, 1)
