"""Retrieval evaluation speed: cclm's two-stage evaluation vs the reference one-query-at-a-time re-ranking, in one
run, same model, same data (see ``make bench-eval``).

Data: 1,000 synthetic-world images (32 px, the tiny model's input) x 5,000 captions (each image's caption in
en/de/fr/es/ja, so 5 per image). Model: ``configs/model/tiny.yaml``, random init (seed 0). k = 128. CPU.

* two-stage: ``cclm.evaluation.run.run_retrieval`` -- the path of ``cclm evaluate retrieval`` (embeddings in
  length-sorted batches, block-wise ITC top-k, the (query, candidate) pairs of all queries pooled, de-duplicated
  across directions, sorted by caption length and re-scored by ITM in batches of ``rerank_batch_size``; queries
  whose gold item is not in their top-k are not re-scored since ITM cannot change their rank);
* two-stage, rescore all: the same with ``rescore_all=True`` (re-scores exactly the pairs the reference does);
* per-query: the ALBEF/CCLM ``evaluation()`` style of re-ranking -- the full similarity matrix, then for every
  image and every caption one ITM forward of its k candidates, captions padded to the gallery's longest caption
  (ALBEF pads to ``max_length``, which is slower still). Embeddings come from the same code as the two-stage
  path, so the ITC numbers are bit-identical. Candidates outside the top-k keep their ITC order below the
  re-scored ones (ALBEF fills them with -100; keeping the ITC order makes the median/mean ranks comparable too),
  and metrics come from the dense score matrices with ``itm_metrics``.

Threads: 1 by default (``--threads``), so that the numbers do not depend on what else runs on the machine.
Writes benchmarks/results/eval.json and appends a line to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LANGUAGES = ("en", "de", "fr", "es", "ja")


def build_inputs(n_images: int, image_size: int, seed: int = 0):
    """Synthetic-world scenes: uint8 images and 5 captions per image (one per language); a tokenizer."""
    from cclm.data.images import load_image
    from cclm.data.tokenize import train_tokenizer
    from cclm.evaluation.datasets import RetrievalSet
    from data_prep.world.build import _unique_scenes
    from data_prep.world.scenes import render

    scenes = _unique_scenes(random.Random(seed), n_images, set())
    entries = [
        (
            load_image(render(scene, image_size), image_size),
            f"s{i}",
            [scene.caption(x) for x in LANGUAGES],
        )
        for i, scene in enumerate(scenes)
    ]
    rset = RetrievalSet.from_entries("bench", "mixed", entries)
    tokenizer = train_tokenizer(rset.texts, Path(tempfile.mkdtemp(prefix="bench_eval_tok_")), vocab_size=400)
    return rset, tokenizer


@torch.inference_mode()
def per_query_reference(model, rset, tokenizer, k: int, batch_size: int, itc_weight: float = 0.0) -> dict:
    """The reference re-ranking: the full similarity matrix, then one ITM forward of k candidates per query,
    captions at the gallery's full padded width. Embeddings come from the same code as the two-stage path (the
    comparison is about re-ranking; it also keeps the ITC numbers bit-identical, so that even the mean rank of
    queries whose gold item is outside the top-k matches)."""
    import functools

    from cclm.data.images import load_image
    from cclm.evaluation.retrieval import embed_gallery, itm_metrics, tokenize_texts

    image_size = int(model.cfg.vision.image_size)
    token_ids = tokenize_texts(tokenizer, rset.texts, int(model.cfg.text.max_length))
    emb = embed_gallery(
        model,
        rset.images,
        token_ids,
        functools.partial(load_image, size=image_size),
        tokenizer.pad_token_id,
        batch_size,
        "cpu",
        keep_tokens=True,
    )
    sims_i2t = emb.image_feats @ emb.text_feats.t()
    sims_t2i = emb.text_feats @ emb.image_feats.t()
    k_i2t, k_t2i = min(k, sims_i2t.shape[1]), min(k, sims_t2i.shape[1])
    scores_i2t = sims_i2t.double() - 1e6  # below every re-scored candidate, in ITC order (ALBEF: -100)
    for i in range(sims_i2t.shape[0]):
        top_sim, top_idx = sims_i2t[i].topk(k_i2t)
        memory = emb.image_tokens[i].repeat(k_i2t, 1, 1)
        fused = model.fuse(emb.text_tokens[top_idx], emb.text_masks[top_idx], memory)
        scores_i2t[i, top_idx] = (model.itm_logits(fused)[:, 1] + itc_weight * top_sim).double()
    scores_t2i = sims_t2i.double() - 1e6
    for t in range(sims_t2i.shape[0]):
        top_sim, top_idx = sims_t2i[t].topk(k_t2i)
        tokens, mask = emb.text_tokens[t].repeat(k_t2i, 1, 1), emb.text_masks[t].repeat(k_t2i, 1)
        fused = model.fuse(tokens, mask, emb.image_tokens[top_idx])
        scores_t2i[t, top_idx] = (model.itm_logits(fused)[:, 1] + itc_weight * top_sim).double()
    return itm_metrics(scores_i2t, scores_t2i, rset.txt2img, rset.img2txt)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=256, help="embedding batch (both methods)")
    parser.add_argument("--rerank-batch-size", type=int, default=128, help="two-stage: pairs per ITM forward")
    parser.add_argument("--skip-rescore-all", action="store_true", help="do not time the rescore-all variant")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "eval.json"))
    parser.add_argument("--results-md", default=str(REPO / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args(argv)

    from cclm.config import ModelConfig, load_config
    from cclm.evaluation.run import run_retrieval
    from cclm.model import CrossViewModel

    torch.set_num_threads(args.threads)
    cfg = load_config(ModelConfig, REPO / "configs" / "model" / "tiny.yaml")
    image_size = int(cfg.vision.image_size)
    rset, tokenizer = build_inputs(args.images, image_size)
    cfg.text.encoder["vocab_size"] = len(tokenizer)
    torch.manual_seed(0)
    model = CrossViewModel(cfg).eval()
    settings = {"k_test": args.k, "batch_size": args.batch_size, "rerank_batch_size": args.rerank_batch_size}
    print(f"{len(rset.images)} images x {len(rset.texts)} captions, k={args.k}, {args.threads} thread(s)")

    start = time.perf_counter()
    ours = run_retrieval(model, rset, tokenizer, image_size, **settings)
    two_stage_s = time.perf_counter() - start
    print(f"two-stage: {two_stage_s:.1f} s")

    rescore_all_s, rescore_all_equal = None, None
    if not args.skip_rescore_all:
        start = time.perf_counter()
        everything = run_retrieval(model, rset, tokenizer, image_size, rescore_all=True, **settings)
        rescore_all_s = time.perf_counter() - start
        rescore_all_equal = everything.metrics == ours.metrics
        print(f"two-stage, rescore all: {rescore_all_s:.1f} s")

    start = time.perf_counter()
    reference = per_query_reference(model, rset, tokenizer, args.k, args.batch_size)
    per_query_s = time.perf_counter() - start
    print(f"per-query reference: {per_query_s:.1f} s")

    metrics_equal = reference == ours.metrics
    if not metrics_equal:
        diff = {
            key: (reference[key], ours.metrics[key])
            for key in reference
            if reference[key] != ours.metrics[key]
        }
        print(f"metrics differ: {diff}")
    # How many queries the two-stage path had to re-score (a gold item in the ITC top-k).
    n_i2t, n_t2i = len(rset.images), len(rset.texts)
    result = {
        "two_stage_s": round(two_stage_s, 2),
        "per_query_s": round(per_query_s, 2),
        "metrics_equal": metrics_equal,
        "speedup": round(per_query_s / two_stage_s, 2),
        "two_stage_rescore_all_s": None if rescore_all_s is None else round(rescore_all_s, 2),
        "speedup_rescore_all": None if rescore_all_s is None else round(per_query_s / rescore_all_s, 2),
        "rescore_all_metrics_equal": rescore_all_equal,
        "queries_with_gold_in_top_k": {
            "i2t": float((ours.i2t_ranks <= args.k).float().mean()),
            "t2i": float((ours.t2i_ranks <= args.k).float().mean()),
        },
        "metrics": ours.metrics,
        "reference_metrics": reference,
        "setup": {
            "images": n_i2t,
            "captions": n_t2i,
            "k": args.k,
            "threads": args.threads,
            "model": "tiny (random init)",
            "embed_batch_size": args.batch_size,
            "rerank_batch_size": args.rerank_batch_size,
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    line = (
        f"- eval ({time.strftime('%Y-%m-%d')}, CPU, {args.threads} thread(s)): {n_i2t} images x {n_t2i} captions, "
        f"tiny model, k={args.k}: two-stage {two_stage_s:.1f} s vs per-query re-ranking {per_query_s:.1f} s "
        f"({per_query_s / two_stage_s:.1f}x)"
        + (
            f"; re-scoring every top-k pair {rescore_all_s:.1f} s ({per_query_s / rescore_all_s:.1f}x)"
            if rescore_all_s
            else ""
        )
        + f"; identical metrics: {metrics_equal}\n"
    )
    md = Path(args.results_md)
    if not md.exists() or "## Retrieval evaluation" not in md.read_text():
        with md.open("a") as handle:
            handle.write("\n## Retrieval evaluation (`make bench-eval`)\n\n")
    with md.open("a") as handle:
        handle.write(line)
    print(json.dumps({k: result[k] for k in ("two_stage_s", "per_query_s", "metrics_equal", "speedup")}))
    return 0 if metrics_equal else 1


if __name__ == "__main__":
    sys.exit(main())
