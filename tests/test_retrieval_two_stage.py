"""Two-stage retrieval: block-wise ITC, ITM re-ranking of the top-k, and the multi-rank split."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from cclm.evaluation.datasets import RetrievalSet
from cclm.evaluation.retrieval import (
    Embeddings,
    embed_gallery,
    gold_matrix,
    itc_topk,
    itm_metrics,
    ranks_from_scores,
    tokenize_texts,
    two_stage_ranks,
)
from cclm.evaluation.run import run_retrieval
from cclm.model import CrossViewModel

SETTINGS = {"k_test": 6, "batch_size": 4, "rerank_batch_size": 9}
WORDS = ["red", "blue", "green", "circle", "square", "triangle", "small", "big", "left", "right", "above"]
pytestmark = pytest.mark.usefixtures("one_thread")


def make_set(n_images: int, seed: int = 0) -> RetrievalSet:
    rng = np.random.default_rng(seed)
    images = [torch.from_numpy(rng.integers(0, 256, (3, 32, 32), dtype=np.uint8)) for _ in range(n_images)]
    entries = []
    for i, image in enumerate(images):
        captions = [" ".join(rng.choice(WORDS, size=rng.integers(2, 9))) for _ in range(rng.integers(1, 4))]
        entries.append((image, f"img{i}", captions))
    return RetrievalSet.from_entries("random", "en", entries)


@pytest.fixture
def tiny_model(tiny_model_cfg):
    return CrossViewModel(tiny_model_cfg).eval()


def gallery(model, rset, tokenizer) -> Embeddings:
    ids = tokenize_texts(tokenizer, rset.texts, model.cfg.text.max_length)
    return embed_gallery(
        model, rset.images, ids, lambda x: x, tokenizer.pad_token_id, 7, "cpu", keep_tokens=True
    )


@torch.inference_mode()
def full_itm_matrix(model, emb: Embeddings) -> torch.Tensor:
    """Every (image, caption) pair through the fusion stack on its own, caption at its own length."""
    n_images, n_texts = emb.image_feats.shape[0], emb.text_feats.shape[0]
    scores = torch.empty(n_images, n_texts)
    for t in range(n_texts):
        length = int(emb.text_masks[t].sum())
        tokens = emb.text_tokens[t : t + 1, :length].expand(n_images, -1, -1)
        mask = emb.text_masks[t : t + 1, :length].expand(n_images, -1)
        fused = model.fuse(tokens, mask, emb.image_tokens)
        scores[:, t] = model.itm_logits(fused)[:, 1]
    return scores


def test_blockwise_topk_equals_dense():
    torch.manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(37, 16), dim=-1)
    candidates = torch.nn.functional.normalize(torch.randn(53, 16), dim=-1)
    gold = gold_matrix([[q % 53, (q * 7) % 53] for q in range(37)], 53)
    dense = queries @ candidates.t()
    gold_mask = torch.zeros_like(dense, dtype=torch.bool).scatter_(1, gold, True)
    dense_top = dense.topk(10, dim=1)
    for block_elements in (1, 53 * 4, 10**9):  # one row per block, 4 rows, everything at once
        top = itc_topk(queries, candidates, gold, k=10, block_elements=block_elements)
        assert torch.equal(top.indices, dense_top.indices)
        assert torch.allclose(top.scores, dense_top.values)
        assert torch.equal(top.itc_ranks, ranks_from_scores(dense, gold_mask))


@pytest.mark.parametrize("itc_weight", [0.0, 1.0])
def test_two_stage_with_k_equal_n_is_full_itm_ranking(tiny_model, tiny_tokenizer, itc_weight):
    rset = make_set(14)
    emb = gallery(tiny_model, rset, tiny_tokenizer)
    itm = full_itm_matrix(tiny_model, emb)
    itc = emb.image_feats @ emb.text_feats.t()
    dense = itm + itc_weight * itc
    expected = itm_metrics(dense, dense.t(), rset.txt2img, rset.img2txt)
    n = max(len(rset.images), len(rset.texts))
    out = two_stage_ranks(
        tiny_model, emb, rset.txt2img, rset.img2txt, k=n, rerank_batch_size=5, itc_weight=itc_weight
    )
    assert out.metrics == pytest.approx(expected)
    everything = two_stage_ranks(
        tiny_model, emb, rset.txt2img, rset.img2txt, k=5, rescore_all=True, itc_weight=itc_weight
    )
    top5 = two_stage_ranks(tiny_model, emb, rset.txt2img, rset.img2txt, k=5, itc_weight=itc_weight)
    assert torch.equal(everything.i2t_ranks, top5.i2t_ranks) and torch.equal(
        everything.t2i_ranks, top5.t2i_ranks
    )
    # Same per-query ranks too, not only the same averages.
    i2t_gold = torch.zeros_like(dense, dtype=torch.bool)
    for i, texts in enumerate(rset.img2txt):
        i2t_gold[i, texts] = True
    assert torch.equal(out.i2t_ranks, ranks_from_scores(dense, i2t_gold))
    assert torch.equal(out.t2i_ranks, ranks_from_scores(dense.t(), i2t_gold.t()))
    # Re-ranking changes the ranking: ITM is not the same order as ITC.
    itc_only = two_stage_ranks(tiny_model, emb, rset.txt2img, rset.img2txt, k=n, do_rerank=False)
    assert itc_only.metrics == pytest.approx(itm_metrics(itc, itc.t(), rset.txt2img, rset.img2txt))


class OracleMatcher(torch.nn.Module):
    """A stand-in model whose ITM head knows the answer: text token value == image token value. It has only the
    full fusion stack (``fuse``), so it re-ranks with ``kv_cache=False``."""

    def fuse(self, tokens, mask, memory, memory_mask=None):
        match = (tokens[:, 0, 0] == memory[:, 0, 0]).float()
        return torch.stack([match, -match], dim=1)[:, None, :]

    def itm_logits(self, fused):
        return torch.stack([-fused[:, 0, 0], fused[:, 0, 0]], dim=1)


def test_small_k_gold_outside_top_k_is_a_miss():
    n_images, k = 30, 5
    torch.manual_seed(1)
    txt2img = [i // 2 for i in range(2 * n_images)]  # 2 captions per image
    img2txt = [[2 * i, 2 * i + 1] for i in range(n_images)]
    image_feats = torch.nn.functional.normalize(torch.randn(n_images, 8), dim=-1)
    text_feats = torch.nn.functional.normalize(torch.randn(2 * n_images, 8), dim=-1)
    emb = Embeddings(
        image_feats=image_feats,
        text_feats=text_feats,
        image_tokens=torch.arange(n_images, dtype=torch.float)[:, None, None].expand(-1, 3, 4).clone(),
        text_tokens=torch.tensor(txt2img, dtype=torch.float)[:, None, None].expand(-1, 2, 4).clone(),
        text_masks=torch.ones(2 * n_images, 2, dtype=torch.long),
    )
    itc = image_feats @ text_feats.t()
    out = two_stage_ranks(OracleMatcher(), emb, txt2img, img2txt, k=k, rerank_batch_size=7, kv_cache=False)

    def itc_rank(row: torch.Tensor, gold: list[int]) -> int:
        order = torch.argsort(row, descending=True).tolist()
        return min(order.index(g) for g in gold) + 1

    i2t_itc = [itc_rank(itc[i], img2txt[i]) for i in range(n_images)]
    t2i_itc = [itc_rank(itc[:, t], [txt2img[t]]) for t in range(len(txt2img))]
    # The oracle puts the gold first whenever it is among the k re-scored candidates; a gold outside the top-k
    # is never re-scored and stays below all k of them, at its ITC rank -- however well ITM would have scored it.
    assert out.i2t_ranks.tolist() == [1 if r <= k else r for r in i2t_itc]
    assert out.t2i_ranks.tolist() == [1 if r <= k else r for r in t2i_itc]
    inside = sum(r <= k for r in i2t_itc)
    assert 0 < inside < n_images  # non-trivial: some golds inside, some outside the top-k
    assert out.metrics["txt_r1"] == pytest.approx(100.0 * inside / n_images)
    assert out.metrics["txt_r5"] == out.metrics["txt_r1"]  # outside the top-5: a miss at R@5 too


def _two_rank_worker(rank: int, world: int, init_file: str, model_dir: str, tok_dir: str, out_file: str):
    import torch.distributed as dist

    from cclm.data.tokenize import load_tokenizer

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = CrossViewModel.from_pretrained(model_dir)
        out = run_retrieval(model, make_set(11, seed=3), load_tokenizer(tok_dir), 32, **SETTINGS)
        if rank == 0:
            payload = {"metrics": out.metrics, "i2t": out.i2t_ranks.tolist(), "t2i": out.t2i_ranks.tolist()}
            with open(out_file, "w") as handle:
                json.dump(payload, handle)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_give_the_same_metrics_as_one(tiny_model, tiny_tokenizer, tmp_path):
    model_dir, tok_dir = tmp_path / "model", tmp_path / "tok"
    tiny_model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(str(tok_dir))
    single = run_retrieval(
        CrossViewModel.from_pretrained(model_dir), make_set(11, seed=3), tiny_tokenizer, 32, **SETTINGS
    )
    out_file = tmp_path / "ranks.json"
    mp.spawn(
        _two_rank_worker,
        args=(2, str(tmp_path / "init"), str(model_dir), str(tok_dir), str(out_file)),
        nprocs=2,
        join=True,
    )
    multi = json.loads(out_file.read_text())
    assert multi["i2t"] == single.i2t_ranks.tolist()
    assert multi["t2i"] == single.t2i_ranks.tolist()
    assert multi["metrics"] == pytest.approx(single.metrics)


def test_bf16_autocast_keeps_fp32_similarities(tiny_model, tiny_tokenizer):
    rset = make_set(6)
    ids = tokenize_texts(tiny_tokenizer, rset.texts, tiny_model.cfg.text.max_length)
    emb = embed_gallery(
        tiny_model,
        rset.images,
        ids,
        lambda x: x,
        tiny_tokenizer.pad_token_id,
        4,
        "cpu",
        keep_tokens=True,
        precision="bf16",
    )
    assert (
        emb.text_tokens.dtype == emb.image_tokens.dtype == torch.bfloat16
    )  # half the memory for the ITM stage
    assert emb.text_feats.dtype == emb.image_feats.dtype == torch.float32  # no bf16 ties in the ITC top-k
    fp32 = gallery(tiny_model, rset, tiny_tokenizer)
    assert torch.allclose(emb.text_feats, fp32.text_feats, atol=0.05)
    out = two_stage_ranks(tiny_model, emb, rset.txt2img, rset.img2txt, k=4, precision="bf16")
    assert out.t2i_ranks.min() >= 1 and out.t2i_ranks.max() <= len(rset.images)


def test_eval_ties_setting_ranks_duplicate_captions_as_configured(tiny_model, tiny_tokenizer):
    """Eight images share one caption text, so their captions score exactly alike: ``eval.ties=index`` (the IGLUE
    eval configs) ranks them as IGLUE's argsort does, ``against`` (the default) counts each tie against the
    query; ``cclm evaluate retrieval`` honours the setting through :func:`evaluate_retrieval`."""
    from cclm.config import EvalConfig, from_dict
    from cclm.evaluation.retrieval import tie_breaking
    from cclm.evaluation.run import evaluate_retrieval, settings

    rng = np.random.default_rng(1)
    entries = [
        (torch.from_numpy(rng.integers(0, 256, (3, 32, 32), dtype=np.uint8)), f"img{i}", ["a red circle"])
        for i in range(8)
    ]
    rset = RetrievalSet.from_entries("duplicates", "en", entries)
    image_size = int(tiny_model.cfg.vision.image_size)
    results = {}
    for ties in ("against", "index"):
        cfg = from_dict(EvalConfig, {"k_test": 6, "batch_size": 4, "ties": ties})
        results[ties] = evaluate_retrieval(tiny_model, rset, tiny_tokenizer, cfg, image_size, "cpu")
        with tie_breaking(ties):
            direct = run_retrieval(
                tiny_model, rset, tiny_tokenizer, image_size, **settings(cfg), device="cpu"
            ).metrics
        assert results[ties] == pytest.approx(direct)
    # an image query's gold caption ties with the seven others: index order puts it first only for image 0
    assert results["against"]["txt_r1"] == 0.0
    assert results["index"]["txt_r1"] == pytest.approx(100 / 8)
    assert results["against"]["img_r1"] == results["index"]["img_r1"]  # caption queries: distinct images
    with pytest.raises(Exception, match="ties"):
        from_dict(EvalConfig, {"ties": "random"})
