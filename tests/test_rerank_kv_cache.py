"""Re-ranking with the memory side and the query side computed once: the cached fusion path gives the scores of
the full fusion stack (fp32, 1e-5), for image and text memories, padded queries and memories, every chunking of
the cached keys/values and every batching of the pairs; and the two-stage metrics do not change."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

import cclm
from cclm.evaluation.datasets import RetrievalSet
from cclm.evaluation.retrieval import Embeddings, embed_gallery, itm_scores, tokenize_texts, two_stage_ranks
from cclm.model import CrossViewModel

ATOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")


def random_model(cfg, fusion_layers: list[int]) -> CrossViewModel:
    cfg.text.text_layers = [0]
    cfg.text.fusion_layers = fusion_layers
    torch.manual_seed(0)
    return CrossViewModel(cfg).eval()


def padded(n: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random [n, length, 64] tokens and a 0/1 mask whose rows have different lengths (1 .. length)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(n, length, 64, generator=generator)
    lengths = torch.randint(1, length + 1, (n,), generator=generator)
    lengths[0] = length  # at least one row unpadded
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return tokens, mask


@pytest.mark.parametrize("fusion_layers", [[3], [2, 3], [1, 2, 3]])
@pytest.mark.parametrize("memory_kind", ["image", "text"])
@torch.inference_mode()
def test_cached_pairs_equal_the_full_fusion_stack(tiny_model_cfg, fusion_layers, memory_kind):
    model = random_model(tiny_model_cfg, fusion_layers)
    queries, query_mask = padded(5, 11, seed=1)
    if memory_kind == "image":
        memories = torch.randn(4, 17, 64, generator=torch.Generator().manual_seed(2))
        memory_mask = torch.ones(4, 17, dtype=torch.long)
    else:  # the text view: another language's padded tokens
        memories, memory_mask = padded(4, 9, seed=2)
    # every (query, memory) pair, each query and memory repeated across pairs
    query_rows = torch.arange(5).repeat_interleave(4)
    memory_rows = torch.arange(4).repeat(5)
    expected = model.fuse(
        queries[query_rows], query_mask[query_rows], memories[memory_rows], memory_mask[memory_rows]
    )
    prefix = model.query_prefix(queries, query_mask).select(query_rows)
    memory = model.memory_kv(memories, memory_mask).select(memory_rows)
    full = model.fusion.forward_cached(prefix, memory)
    valid = query_mask[query_rows].bool()  # padded positions are never read by anything downstream
    torch.testing.assert_close(full[valid], expected[valid], atol=ATOL, rtol=0)
    got = model.cached_itm_logits(prefix, memory)
    torch.testing.assert_close(got, model.itm_logits(expected), atol=ATOL, rtol=0)


def test_mismatched_pair_rows_are_refused(tiny_model_cfg):
    model = random_model(tiny_model_cfg, [2, 3])
    queries, mask = padded(3, 5, seed=0)
    with pytest.raises(ValueError, match="3 query rows for 2 memory rows"):
        model.cached_itm_logits(model.query_prefix(queries, mask), model.memory_kv(torch.randn(2, 17, 64)))


@pytest.fixture
def tiny_gallery(tiny_model_cfg, tiny_tokenizer):
    """A random model, 9 random images with 1-3 captions of 2-8 words each, and their embeddings."""
    model = random_model(tiny_model_cfg, [2, 3])
    rng, generator = random.Random(4), torch.Generator().manual_seed(4)
    words = "red blue green circle square triangle small big left right above".split()
    entries = []
    for i in range(9):
        image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=generator)
        captions = [" ".join(rng.choices(words, k=rng.randint(2, 8))) for _ in range(rng.randint(1, 3))]
        entries.append((image, f"img{i}", captions))
    rset = RetrievalSet.from_entries("random", "en", entries)
    ids = tokenize_texts(tiny_tokenizer, rset.texts, model.cfg.text.max_length)
    emb = embed_gallery(
        model, rset.images, ids, lambda x: x, tiny_tokenizer.pad_token_id, 4, "cpu", keep_tokens=True
    )
    return model, rset, emb


def all_pairs(emb: Embeddings) -> tuple[torch.Tensor, torch.Tensor]:
    n_images, n_texts = emb.image_feats.shape[0], emb.text_feats.shape[0]
    image_idx = torch.arange(n_images).repeat_interleave(n_texts)
    text_idx = torch.arange(n_texts).repeat(n_images)
    order = torch.randperm(len(image_idx), generator=torch.Generator().manual_seed(0))
    return image_idx[order], text_idx[order]  # unsorted, as pooled pairs of several queries are


@pytest.mark.parametrize("images_per_chunk", [1, 2, 4, 9])
@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_itm_scores_equal_without_the_cache_for_any_chunking_and_batching(
    tiny_gallery, images_per_chunk, batch_size
):
    model, _, emb = tiny_gallery
    image_idx, text_idx = all_pairs(emb)
    expected = itm_scores(model, emb, image_idx, text_idx, batch_size=13, kv_cache=False)
    per_image = 2 * len(model.fusion.layers) * emb.image_tokens[0].numel()  # keys + values, every layer
    chunk_sizes = []
    memory_kv = model.memory_kv

    def recording_memory_kv(memory, memory_mask=None):
        chunk_sizes.append(memory.shape[0])
        return memory_kv(memory, memory_mask)

    model.memory_kv = recording_memory_kv
    got = itm_scores(
        model, emb, image_idx, text_idx, batch_size, kv_cache_elements=images_per_chunk * per_image
    )
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    # bounded memory: never more than a chunk's keys/values at a time, each image's computed once
    assert max(chunk_sizes) == images_per_chunk and sum(chunk_sizes) == emb.image_feats.shape[0]
    probs = itm_scores(model, emb, image_idx, text_idx, batch_size, probability=True)
    expected_probs = itm_scores(model, emb, image_idx, text_idx, 13, probability=True, kv_cache=False)
    torch.testing.assert_close(probs, expected_probs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("rescore_all", [False, True])
@pytest.mark.parametrize("itc_weight", [0.0, 1.0])
def test_two_stage_metrics_are_identical_with_and_without_the_cache(tiny_gallery, rescore_all, itc_weight):
    model, rset, emb = tiny_gallery
    runs = [
        two_stage_ranks(
            model,
            emb,
            rset.txt2img,
            rset.img2txt,
            k=5,
            rerank_batch_size=6,
            itc_weight=itc_weight,
            rescore_all=rescore_all,
            kv_cache=kv_cache,
        )
        for kv_cache in (True, False)
    ]
    cached, uncached = runs
    assert torch.equal(cached.i2t_ranks, uncached.i2t_ranks)
    assert torch.equal(cached.t2i_ranks, uncached.t2i_ranks)
    assert cached.metrics == uncached.metrics


def test_api_rerank_equals_match_without_the_full_fusion_stack_per_pair(tiny_model_dir, monkeypatch):
    engine = cclm.load(tiny_model_dir, device="cpu")
    texts = ["a red circle above a blue square", "ein roter Kreis", "deux petits triangles verts à gauche"]
    images = [Image.new("RGB", (40, 40), colour) for colour in ("red", "green", "blue", "white")]
    candidates = torch.tensor([[0, 1, 2], [2, 1, 0], [1, 0, 2]])
    directions = ((texts, images), (images[:3], texts))  # text queries (image memories), image queries
    reranked = [engine.rerank(queries, gallery, candidates) for queries, gallery in directions]
    # The uncached reference: CCLM.match runs each pair through the whole fusion stack.
    for (queries, gallery), result in zip(directions, reranked):
        for query, scores, indices in zip(queries, result.scores, result.indices):
            items = [gallery[int(i)] for i in indices]
            probs = engine.match(items, [query]) if isinstance(query, str) else engine.match([query], items)
            torch.testing.assert_close(scores, probs, atol=ATOL, rtol=0)

    def no_full_fusion(*args, **kwargs):
        raise AssertionError("re-ranking ran the full fusion stack")

    monkeypatch.setattr(engine.model, "fuse", no_full_fusion)
    for (queries, gallery), result in zip(directions, reranked):
        assert torch.equal(engine.rerank(queries, gallery, candidates).indices, result.indices)


def test_api_rerank_keeps_the_candidate_order_among_equal_scores(tiny_model_dir):
    """The same image listed several times scores alike: those keep the order the candidates were given in, as
    the evaluation's ties rule does (a non-stable sort could put them in any order)."""
    engine = cclm.load(tiny_model_dir, device="cpu")
    red, blue = Image.new("RGB", (40, 40), "red"), Image.new("RGB", (40, 40), "blue")
    gallery = [red, blue] + [red] * 7
    candidates = torch.tensor([[8, 0, 2, 1, 7, 3, 6, 5, 4]])
    result = engine.rerank(["a red circle"], gallery, candidates)
    reds = [int(i) for i in result.indices[0] if gallery[int(i)] is red]
    assert reds == [8, 0, 2, 7, 3, 6, 5, 4]
