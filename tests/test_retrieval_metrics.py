"""itm_metrics against a brute-force, one-query-at-a-time computation (the ALBEF/CCLM reference style)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cclm.evaluation.retrieval import RECALL_AT, itm_metrics, metrics_from_ranks


def brute_force_metrics(scores_i2t, scores_t2i, txt2img, img2txt) -> dict[str, float]:
    i2t_ranks = []
    for i, row in enumerate(scores_i2t):
        order = list(np.argsort(-row, kind="stable"))
        i2t_ranks.append(min(order.index(t) for t in img2txt[i]) + 1)
    t2i_ranks = []
    for t, row in enumerate(scores_t2i):
        order = list(np.argsort(-row, kind="stable"))
        t2i_ranks.append(order.index(txt2img[t]) + 1)
    out = {}
    for prefix, ranks in (("txt", np.array(i2t_ranks)), ("img", np.array(t2i_ranks))):
        for k in RECALL_AT:
            out[f"{prefix}_r{k}"] = 100.0 * np.mean(ranks <= k)
        out[f"{prefix}_r_mean"] = np.mean([out[f"{prefix}_r{k}"] for k in RECALL_AT])
        out[f"{prefix}_medr"] = float(np.median(ranks))
        out[f"{prefix}_meanr"] = float(np.mean(ranks))
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def random_set(n_images: int, rng: np.random.Generator):
    img2txt, txt2img = [], []
    for i in range(n_images):
        n_captions = int(rng.integers(1, 6))  # 1-5 gold captions per image
        img2txt.append(list(range(len(txt2img), len(txt2img) + n_captions)))
        txt2img += [i] * n_captions
    return txt2img, img2txt


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_itm_metrics_equal_brute_force_on_random_scores(seed):
    rng = np.random.default_rng(seed)
    txt2img, img2txt = random_set(60, rng)
    scores_i2t = rng.normal(size=(60, len(txt2img)))
    scores_t2i = rng.normal(size=(len(txt2img), 60))
    # Make some queries easy so that every recall level is exercised.
    for i in range(0, 60, 4):
        scores_i2t[i, img2txt[i][-1]] += 3.0
    for t in range(0, len(txt2img), 3):
        scores_t2i[t, txt2img[t]] += 2.0
    got = itm_metrics(scores_i2t, scores_t2i, txt2img, img2txt)
    expected = brute_force_metrics(scores_i2t, scores_t2i, txt2img, img2txt)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value), key
    # Tensors give the same result as arrays.
    assert itm_metrics(torch.tensor(scores_i2t), torch.tensor(scores_t2i), txt2img, img2txt) == got


def place_gold_at_rank(row: np.ndarray, gold: list[int], rank: int, rng) -> None:
    """Rewrite ``row`` so that the best gold candidate sits exactly at 1-based ``rank``."""
    others = [j for j in range(len(row)) if j not in gold]
    values = np.sort(rng.uniform(0, 1, size=len(row)))[::-1]
    order = others[: rank - 1] + [gold[0]] + gold[1:] + others[rank - 1 :]
    # The remaining golds go just after the best one (worse ranks), the rest keep their order.
    row[np.array(order)] = values


@pytest.mark.parametrize("rank", [1, 2, 5, 6, 10, 11])
def test_recall_boundaries(rank):
    rng = np.random.default_rng(rank)
    n_images = 12
    txt2img, img2txt = random_set(n_images, rng)
    n_texts = len(txt2img)
    scores_i2t = np.zeros((n_images, n_texts))
    scores_t2i = np.zeros((n_texts, n_images))
    for i in range(n_images):
        place_gold_at_rank(scores_i2t[i], img2txt[i], rank, rng)
    for t in range(n_texts):
        place_gold_at_rank(scores_t2i[t], [txt2img[t]], min(rank, n_images), rng)
    got = itm_metrics(scores_i2t, scores_t2i, txt2img, img2txt)
    for k in RECALL_AT:
        assert got[f"txt_r{k}"] == (100.0 if rank <= k else 0.0)
        assert got[f"img_r{k}"] == (100.0 if min(rank, n_images) <= k else 0.0)
    assert got["txt_medr"] == got["txt_meanr"] == rank
    assert got == pytest.approx(brute_force_metrics(scores_i2t, scores_t2i, txt2img, img2txt))


def test_ties_count_against_the_query():
    # A scorer that gives every candidate the same score must not get perfect recall.
    txt2img, img2txt = [0, 1, 2, 3], [[0], [1], [2], [3]]
    flat = np.zeros((4, 4))
    metrics = itm_metrics(flat, flat, txt2img, img2txt)
    assert metrics["txt_r1"] == metrics["img_r1"] == 0.0
    assert metrics["txt_meanr"] == 4.0


def test_metrics_from_ranks_means():
    metrics = metrics_from_ranks(torch.tensor([1, 3, 7, 20]), torch.tensor([2, 2]))
    assert metrics["txt_r1"] == 25.0 and metrics["txt_r5"] == 50.0 and metrics["txt_r10"] == 75.0
    assert metrics["txt_r_mean"] == pytest.approx(50.0)
    assert metrics["img_r1"] == 0.0 and metrics["img_r5"] == 100.0
    assert metrics["r_mean"] == pytest.approx((50.0 + 200.0 / 3) / 2)
    assert metrics["txt_medr"] == 5.0 and metrics["txt_meanr"] == 7.75


def test_bad_shapes_and_gold_are_reported():
    with pytest.raises(ValueError, match="scores_t2i has shape"):
        itm_metrics(np.zeros((2, 3)), np.zeros((2, 3)), [0, 1, 1], [[0], [1, 2]])
    with pytest.raises(ValueError, match="no gold"):
        itm_metrics(np.zeros((2, 2)), np.zeros((2, 2)), [0, 0], [[0, 1], []])
