"""Retrieval evaluation speed: cclm's two-stage evaluation vs the reference one-query-at-a-time re-ranking, in one
run, same model, same data (see ``make bench-eval``).

Data: 1,000 synthetic-world images (32 px, the tiny model's input) x 5,000 captions (each image's caption in
en/de/fr/es/ja, so 5 per image). Model: ``configs/model/tiny.yaml``, random init (seed 0). k = 128. CPU.

* two-stage: ``cclm.evaluation.run.run_retrieval`` -- the path of ``cclm evaluate retrieval`` (embeddings in
  length-sorted batches, block-wise ITC top-k, the (query, candidate) pairs of all queries pooled, de-duplicated
  across directions, sorted by caption length and re-scored by ITM in batches of ``rerank_batch_size``; queries
  whose gold item is not in their top-k are not re-scored since ITM cannot change their rank);
* two-stage, rescore all: the same with ``rescore_all=True`` (re-scores exactly the pairs the reference does,
  what a trained model needs). Like the default run, it computes each image's cross-attention keys/values and
  each caption's memory-independent first-layer work once for all their pairs (``kv_cache=True``);
* two-stage, rescore all, no cache: the same with ``kv_cache=False`` (every pair through the whole fusion stack),
  to show what the cache gains (``--skip-uncached`` leaves it out);
* per-query: the ALBEF/CCLM ``evaluation()`` style of re-ranking -- the full similarity matrix, then for every
  image and every caption one ITM forward of its k candidates, captions padded to the gallery's longest caption
  (ALBEF pads to ``max_length``, which is slower still). Embeddings come from the same code as the two-stage
  path, so the ITC numbers are bit-identical. Candidates outside the top-k keep their ITC order below the
  re-scored ones (ALBEF fills them with -100; keeping the ITC order makes the median/mean ranks comparable too),
  and metrics come from the dense score matrices with ``itm_metrics``.

Threads: 1 by default (``--threads``), so that the numbers do not depend on what else runs on the machine.
Each run is timed in wall-clock and in CPU seconds of this process; the speed-ups are given in both (on a
machine shared with other jobs the CPU-time ratios are the steadier ones). Every variant must give the same
metrics. Writes benchmarks/results/eval.json and appends a line to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.results_md import append_to_section  # noqa: E402

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


@dataclass
class Timed:
    """A result with its wall-clock and CPU seconds (CPU time: this process only, steadier than wall-clock
    when other jobs share the machine)."""

    value: Any
    wall_s: float
    cpu_s: float


def timed(fn, *args, **kwargs) -> Timed:
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn(*args, **kwargs)
    return Timed(value, time.perf_counter() - wall, time.process_time() - cpu)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or denominator is None else round(numerator / denominator, 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=256, help="embedding batch (both methods)")
    parser.add_argument(
        "--rerank-batch-size",
        type=int,
        default=256,
        help="two-stage: pairs per ITM forward (EvalConfig default)",
    )
    parser.add_argument(
        "--skip-rescore-all", action="store_true", help="do not time the rescore-all variants"
    )
    parser.add_argument(
        "--skip-uncached",
        action="store_true",
        help="do not time the rescore-all variant without the K/V cache",
    )
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

    # The two-stage variants: (name, run_retrieval keywords); each must give the default's metrics.
    variants = [("two_stage", {})]
    if not args.skip_rescore_all:
        variants.append(("two_stage_rescore_all", {"rescore_all": True}))
        if not args.skip_uncached:
            variants.append(("two_stage_rescore_all_uncached", {"rescore_all": True, "kv_cache": False}))
    runs: dict[str, Timed] = {}
    for name, options in variants:
        runs[name] = timed(run_retrieval, model, rset, tokenizer, image_size, **settings, **options)
        print(f"{name}: {runs[name].wall_s:.1f} s (CPU {runs[name].cpu_s:.1f} s)")
    reference = timed(per_query_reference, model, rset, tokenizer, args.k, args.batch_size)
    print(f"per-query reference: {reference.wall_s:.1f} s (CPU {reference.cpu_s:.1f} s)")

    ours = runs["two_stage"].value
    metrics_equal = reference.value == ours.metrics
    if not metrics_equal:
        diff = {
            key: (value, ours.metrics[key])
            for key, value in reference.value.items()
            if value != ours.metrics[key]
        }
        print(f"metrics differ: {diff}")
    variants_equal = {name: run.value.metrics == ours.metrics for name, run in runs.items()}
    all_equal = metrics_equal and all(variants_equal.values())
    result = {
        "per_query_s": round(reference.wall_s, 2),
        "per_query_cpu_s": round(reference.cpu_s, 2),
        "metrics_equal": all_equal,
    }
    suffixes = {
        "two_stage": "",
        "two_stage_rescore_all": "_rescore_all",
        "two_stage_rescore_all_uncached": "_rescore_all_uncached",
    }
    for name, run in runs.items():
        suffix = suffixes[name]
        result[f"{name}_s"] = round(run.wall_s, 2)
        result[f"{name}_cpu_s"] = round(run.cpu_s, 2)
        result[f"speedup{suffix}"] = ratio(reference.wall_s, run.wall_s)
        result[f"speedup{suffix}_cpu"] = ratio(reference.cpu_s, run.cpu_s)
        result[f"{name}_metrics_equal"] = variants_equal[name]
    if "two_stage_rescore_all_uncached" in runs:
        cached, uncached = runs["two_stage_rescore_all"], runs["two_stage_rescore_all_uncached"]
        result["kv_cache_gain_rescore_all"] = ratio(uncached.wall_s, cached.wall_s)
        result["kv_cache_gain_rescore_all_cpu"] = ratio(uncached.cpu_s, cached.cpu_s)
    n_i2t, n_t2i = len(rset.images), len(rset.texts)
    result.update(
        {
            # How many queries the default two-stage path had to re-score (a gold item in the ITC top-k).
            "queries_with_gold_in_top_k": {
                "i2t": float((ours.i2t_ranks <= args.k).float().mean()),
                "t2i": float((ours.t2i_ranks <= args.k).float().mean()),
            },
            "metrics": ours.metrics,
            "reference_metrics": reference.value,
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
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    append_results_line(Path(args.results_md), args, n_i2t, n_t2i, runs, reference, all_equal)
    summary = [key for key in result if key.startswith("speedup")] + ["metrics_equal"]
    print(json.dumps({key: result[key] for key in summary}))
    return 0 if all_equal else 1


def append_results_line(md: Path, args, n_i2t: int, n_t2i: int, runs: dict, reference: Timed, equal: bool):
    """One line in RESULTS.md: each variant's wall-clock seconds and its speed-up over the per-query reference
    (wall-clock, then CPU time)."""
    labels = {
        "two_stage": "two-stage",
        "two_stage_rescore_all": "re-scoring every top-k pair",
        "two_stage_rescore_all_uncached": "re-scoring every top-k pair without the K/V cache",
    }
    parts = [
        f"{labels[name]} {run.wall_s:.1f} s ({reference.wall_s / run.wall_s:.1f}x; CPU time "
        f"{reference.cpu_s / run.cpu_s:.1f}x)"
        for name, run in runs.items()
    ]
    line = (
        f"- eval ({time.strftime('%Y-%m-%d')}, CPU, {args.threads} thread(s)): {n_i2t} images x {n_t2i} captions, "
        f"tiny model, k={args.k}, per-query re-ranking {reference.wall_s:.1f} s: "
        + "; ".join(parts)
        + f"; identical metrics: {equal}\n"
    )
    append_result_line(md, line)


SECTION = "## Retrieval evaluation (`make bench-eval`)"


def append_result_line(path: Path, text: str) -> None:
    """Add ``text`` at the end of this benchmark's section of RESULTS.md (made at the file's end if missing)."""
    append_to_section(path, SECTION, text, match="## Retrieval evaluation")


if __name__ == "__main__":
    sys.exit(main())
