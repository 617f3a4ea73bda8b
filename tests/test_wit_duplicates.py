"""WIT lines that share a picture (514 of the 1,000 lines of IGLUE's test_en.jsonl; 44-235 in the other languages):
``data.duplicate_images`` groups them into image entries (``iglue``: one per ``wit_ix``, IGLUE's key; ``merge``:
one per image file, the CCLM reference's), and the IGLUE retrieval tasks break equal scores by index order.

An oracle that scores a caption 1 against every entry showing its picture (identical images score alike) and 0
elsewhere gets R@1 = 100 both ways under each convention, on every real WIT test file; the lines kept as separate
entries with ties counted against the query (cclm before) do not."""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cclm.config import DuplicateImages
from cclm.evaluation.retrieval import (
    TopK,
    itc_topk,
    itm_metrics,
    ranks_after_rerank,
    ranks_from_scores,
    resolve_ties,
    tie_breaking,
)
from cclm.runtime.env import DistEnv
from cclm.tasks import iglue_retrieval, wit, xflickrco
from cclm.tasks.iglue_retrieval import to_retrieval_set, with_duplicate_images
from cclm.tasks.protocols import TaskSuite

ROOTS = {"wit": "/data/wit", "flickr30k": "/data/flickr30k", "coco": "/data/coco"}
CONVENTIONS = list(DuplicateImages)


def wit_test_files(iglue_dir):
    files = sorted((iglue_dir / "wit").glob("annotations*/test_*.jsonl"))
    if not files:
        pytest.skip(f"no WIT test files under {iglue_dir / 'wit'}")
    return files


def records(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def oracle(data, line_images):
    """[n_texts, n_images] scores: 1 where the entry shows the caption's picture (its line's image file)."""
    ids: dict = {}
    entry = torch.tensor([ids.setdefault(ref, len(ids)) for ref in data.images])
    caption = torch.tensor([ids.setdefault(ref, len(ids)) for ref in line_images])
    return (caption[:, None] == entry[None, :]).float()


def metrics_of(data, ties, line_images=None):
    """The oracle's metrics on ``data``; ``line_images``: the image of each caption's line (default: re-read)."""
    rset = to_retrieval_set(data, ROOTS)
    if line_images is None:
        line_images = wit.read(data.file).images  # the reader keeps one entry per line
    t2i = oracle(data, line_images)
    return itm_metrics(t2i.t(), t2i, rset.txt2img, rset.img2txt, ties=ties)


# ------------------------------------------------------------------------------------------ real WIT test files
@pytest.mark.parametrize("convention", CONVENTIONS, ids=str)
def test_an_oracle_gets_r1_100_under_each_convention_on_every_wit_test_file(iglue_dir, convention):
    for path in wit_test_files(iglue_dir):
        lines = wit.read(path)
        data = with_duplicate_images(wit, lines, convention)
        assert len(data.images) < len(lines.images)  # every file has lines sharing a picture
        # the IGLUE tasks' tie order; grouped entries leave no tie between a gold and a non-gold entry, so counting
        # ties against the query (the project's default) gives the same (checked on one file: it is slow)
        for ties in ("index", "against") if path.name == "test_en.jsonl" else ("index",):
            metrics = metrics_of(data, ties, lines.images)
            assert metrics["img_r1"] == metrics["txt_r1"] == 100.0, (path.name, ties)


def test_the_old_line_entries_with_ties_against_the_query_did_not(iglue_dir):
    path = iglue_dir / "wit" / "annotations" / "test_en.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    lines = wit.read(path)  # one entry per line, as cclm evaluated WIT before
    urls = Counter(r["image_url"] for r in records(path))
    alone = sum(1 for r in records(path) if urls[r["image_url"]] == 1)
    assert len(lines.images) == 1000 and 1000 - alone == 514  # lines sharing their picture
    against = metrics_of(lines, "against")
    assert against["img_r1"] == against["txt_r1"] == pytest.approx(100.0 * alone / 1000)  # 48.6
    # per line, even with IGLUE's tie order: a caption of a later copy finds the first copy first
    indexed = metrics_of(lines, "index")
    assert indexed["img_r1"] == pytest.approx(100.0 * len(urls) / 1000)  # 68.5
    assert indexed["img_r1"] < 100.0


def test_each_released_file_keys_a_picture_by_one_wit_ix_so_the_conventions_agree(iglue_dir):
    for path in wit_test_files(iglue_dir):
        rows = records(path)
        by_ix = {r["wit_ix"] for r in rows}
        by_url = {r["image_url"] for r in rows}
        assert len(by_ix) == len(by_url) == len({(r["wit_ix"], r["image_url"]) for r in rows}), path.name
        iglue = with_duplicate_images(wit, wit.read(path), DuplicateImages.iglue)
        merged = with_duplicate_images(wit, wit.read(path), DuplicateImages.merge)
        assert len(iglue.images) == len(by_ix) and len(iglue.texts) == len(rows)
        assert (iglue.images, iglue.text_image) == (merged.images, merged.text_image)
        # each entry holds exactly the captions of its lines, in file order
        captions: dict[str, list[str]] = {}
        for r in rows:
            captions.setdefault(r["wit_ix"], []).append(r["caption_reference_description"])
        grouped = [[] for _ in iglue.images]
        for text, image in zip(iglue.texts, iglue.text_image):
            grouped[image].append(text)
        assert grouped == list(captions.values())
        assert iglue.image_ids == list(captions)


def test_the_task_data_path_groups_as_configured(iglue_dir):
    path = iglue_dir / "wit" / "annotations" / "test_en.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    shared = sum(1 for n in Counter(wit.read(path).images).values() if n > 1)  # pictures on several lines
    for convention in CONVENTIONS:
        cfg = SimpleNamespace(image_roots=ROOTS, max_examples=0, duplicate_images=convention)
        suite = TaskSuite("wit", cfg, env=DistEnv(0, 1, 0, torch.device("cpu")))
        data = suite.read(str(path))
        assert (len(data.images), len(data.texts)) == (685, 1000)
        assert sum(len(t) > 1 for t in to_retrieval_set(data, ROOTS).img2txt) == shared


def test_the_evaluate_retrieval_loader_groups_too(iglue_dir):
    if not (iglue_dir / "wit" / "annotations" / "test_ja.jsonl").is_file():
        pytest.skip("no WIT test_ja.jsonl")
    for convention in CONVENTIONS:
        cfg = SimpleNamespace(
            root=str(iglue_dir / "wit" / "annotations"),
            captions={"ja": ["test_ja.jsonl"]},
            options={"image_roots": {"wit": "/w"}, "duplicate_images": str(convention)},
        )
        rset = iglue_retrieval.load_wit(cfg, "ja")
        assert (len(rset.images), len(rset.texts)) == (842, 1000)
        assert len(set(rset.image_ids)) == 842


# ----------------------------------------------------------------------------------------- where keys disagree
def write_wit(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_iglue_follows_wit_ix_and_merge_follows_the_image_file(tmp_path):
    url = "https://upload.wikimedia.org/wikipedia/commons/a/ab/Map.svg"
    rows = [
        {"image_url": url, "caption_reference_description": "a", "wit_ix": "w0"},
        {"image_url": url, "caption_reference_description": "b", "wit_ix": "w1"},  # same picture, another key
        {"image_url": url.replace("Map", "Other"), "caption_reference_description": "c", "wit_ix": "w0"},
        {
            "image_url": "http://upload.wikimedia.org/x/Map.svg",
            "caption_reference_description": "d",
        },  # no key
    ]
    data = wit.read(write_wit(tmp_path / "test_xx.jsonl", rows))
    iglue = with_duplicate_images(wit, data, "iglue")
    assert iglue.image_ids == ["w0", "w1", "test_xx.jsonl:4"] and iglue.text_image == [0, 1, 0, 2]
    merged = with_duplicate_images(wit, data, "merge")
    assert [ref.path for ref in merged.images] == ["Map.svg", "Other.svg"]
    assert merged.text_image == [0, 0, 1, 0]


def test_xflickrco_entries_are_its_img_paths_under_both_conventions(iglue_dir):
    path = iglue_dir / "xFlickrCO" / "annotations" / "de" / "test.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    data = xflickrco.read(path)
    for convention in CONVENTIONS:
        assert with_duplicate_images(xflickrco, data, convention) is data  # nothing to group


# --------------------------------------------------------------------------------------------- tie breaking
def stable_ranks(scores: np.ndarray, gold: list[list[int]]) -> list[int]:
    """IGLUE's ranks (``argsort(-scores)``) with a stable sort: 1 + position of the first gold candidate."""
    ranks = []
    for row, golds in zip(scores, gold):
        order = np.argsort(-row, kind="stable")
        ranks.append(1 + min(int(np.where(order == g)[0][0]) for g in golds))
    return ranks


@pytest.mark.parametrize("seed", range(4))
def test_index_ties_rank_as_a_stable_sort_by_descending_score(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 3, size=(40, 12)).astype(np.float64)  # many ties
    gold = [sorted(rng.choice(12, size=rng.integers(1, 4), replace=False).tolist()) for _ in range(40)]
    mask = torch.zeros(40, 12, dtype=torch.bool)
    for q, golds in enumerate(gold):
        mask[q, golds] = True
    got = ranks_from_scores(torch.tensor(scores), mask, ties="index")
    assert got.tolist() == stable_ranks(scores, gold)
    against = ranks_from_scores(torch.tensor(scores), mask)  # the default is unchanged
    best = np.where(mask.numpy(), scores, -np.inf).max(axis=1, keepdims=True)
    assert against.tolist() == (1 + ((scores >= best) & ~mask.numpy()).sum(axis=1)).tolist()


def test_index_ties_hold_through_the_top_k_and_the_rerank():
    """Identical candidates (a picture listed twice): the ITC top-k list and the re-ranked ranks break their ties
    by candidate index, as the dense ranks do."""
    feats = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    candidates = feats[[0, 1, 1, 2, 3, 3, 4]]  # candidates 1/2 and 4/5 are the same picture
    gold = torch.tensor([[0], [2], [1], [3], [5], [4], [6]])[:5]
    queries = feats
    dense = queries @ candidates.t()
    mask = torch.zeros(5, 7, dtype=torch.bool).scatter_(1, gold, True)
    top = itc_topk(queries, candidates, gold, k=4, ties="index")
    assert torch.equal(top.itc_ranks, ranks_from_scores(dense, mask, ties="index"))
    assert top.indices[1].tolist()[:2] == [1, 2]  # the tie kept in candidate order
    # re-scores that tie everywhere: the order of the top-k list (candidate index) decides
    flat = torch.zeros_like(top.scores)
    ranks = ranks_after_rerank(top, flat, ties="index")
    shuffled = TopK(top.indices.flip(1), top.scores.flip(1), top.itc_ranks, top.is_gold.flip(1))
    assert torch.equal(ranks_after_rerank(shuffled, flat, ties="index"), ranks)
    expected = [
        1 + int((top.indices[q] < top.indices[q][top.is_gold[q]].min()).sum()) if top.has_gold[q] else None
        for q in range(5)
    ]
    assert [r if e is not None else None for r, e in zip(ranks.tolist(), expected)] == expected


def test_the_iglue_tasks_score_with_index_ties(monkeypatch):
    seen = []

    def fake_run_retrieval(*args, **kwargs):
        seen.append(resolve_ties())
        return SimpleNamespace(metrics={})

    monkeypatch.setattr(iglue_retrieval, "run_retrieval", fake_run_retrieval)
    data = wit.RetrievalData("f", [wit.image_ref("http://x/a.jpg")], ["w0"], ["a"], [0], {"en"})
    iglue_retrieval.score_retrieval(
        SimpleNamespace(backbone=None),
        data,
        ROOTS,
        None,
        32,
        k_test=4,
        batch_size=2,
        precision="fp32",
        device=torch.device("cpu"),
    )
    assert seen == ["index"] and resolve_ties() == "against"  # only inside the call
    with tie_breaking("index"):
        assert resolve_ties() == "index"
    with pytest.raises(ValueError, match="unknown tie breaking"):
        resolve_ties("random")
