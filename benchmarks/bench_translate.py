"""CPU throughput of the translation step (``cclm prep translate``, see ``make bench-translate``).

Two randomly initialised Marian models built here (nothing is downloaded): the tests' tiny one (d_model 32, one
layer each side) and one of Marian-base size (opus-mt-en-de: d_model 512, 6 + 6 layers, 8 heads, FFN 2048,
58,101-token vocabulary). Each translates the same caption-like English sentences (5-25 words) three ways, in
the same run:

* batched: ``Translator.translate`` as ``cclm prep translate`` calls it (sorted by length, batches of 32);
* batched unsorted: batches of 32 in input order (what length sorting saves);
* naive: one sentence per ``generate`` call (the loop a first script writes).

A random model never writes ``</s>``, so every sentence runs to its output cap (2 x its source + 10 tokens), about
twice what a real model writes: output tokens/s is the figure that carries over, sentences/s is pessimistic.
Writes benchmarks/results/translate.json and appends a line to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.results_md import append_to_section  # noqa: E402

WORDS = (
    "a the red blue green small large dog cat man woman child street beach table plate food car bus train "
    "walking sitting running standing holding looking next to on in under near with of two three people group "
    "building tree park water sky field grass white black wooden old young city night snow"
).split()

MODELS = {
    "tiny": dict(d_model=32, layers=1, heads=2, vocab_size=0),
    "marian-base": dict(d_model=512, layers=6, heads=8, vocab_size=58101),
}


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 25))) for _ in range(n)]


def measure(label: str, run, translator) -> dict:
    before = vars(translator.throughput).copy()
    began = time.perf_counter()
    texts = run()
    wall = time.perf_counter() - began
    after = vars(translator.throughput)
    n = after["sentences"] - before["sentences"]
    out_tokens = after["output_tokens"] - before["output_tokens"]
    src_tokens = after["source_tokens"] - before["source_tokens"]
    result = {
        "sentences": n,
        "seconds": round(wall, 3),
        "sentences_per_s": round(n / wall, 2),
        "source_tokens_per_s": round(src_tokens / wall, 1),
        "output_tokens_per_s": round(out_tokens / wall, 1),
    }
    print(f"[bench]   {label}: {result}", flush=True)
    return result | {"texts": texts}


def bench_model(name: str, folder: Path, n: int, batch_size: int) -> dict:
    from data_prep.translation.translator import GenerationSettings, Translator
    from tests.translation_models import build_marian

    texts = sentences(n)
    # Its sentencepiece model learns these words, so a sentence has as many tokens as with a real vocabulary.
    build_marian(folder, init_std=0.02, corpus=sentences(2000, seed=1), **MODELS[name])
    batched = Translator(
        str(folder), "en", ["de"], "cpu", "float32", GenerationSettings(batch_size=batch_size)
    )
    batched.translate(texts[:2], "de")  # warm-up
    runs = {"batched": measure("batched", lambda: batched.translate(texts, "de").texts, batched)}

    def unsorted() -> list[str]:
        ids = batched.tokenizer(texts, truncation=True, max_length=256)["input_ids"]
        spec = batched.targets["de"]
        batches = (batched._generate(ids[b : b + batch_size], spec) for b in range(0, n, batch_size))
        return [output.text for batch in batches for output in batch]

    runs["batched_unsorted"] = measure("batched, unsorted", unsorted, batched)
    naive = Translator(str(folder), "en", ["de"], "cpu", "float32", GenerationSettings(batch_size=1))
    runs["naive"] = measure("naive (1 per call)", lambda: naive.translate(texts, "de").texts, naive)
    same = runs["batched"].pop("texts") == runs["naive"].pop("texts")
    runs["batched_unsorted"].pop("texts")
    params = sum(p.numel() for p in batched.model.parameters())
    return {
        "params": params,
        **MODELS[name],
        "batch_size": batch_size,
        "runs": runs,
        "speedup_vs_naive": round(runs["batched"]["sentences_per_s"] / runs["naive"]["sentences_per_s"], 2),
        "speedup_vs_unsorted": round(
            runs["batched"]["sentences_per_s"] / runs["batched_unsorted"]["sentences_per_s"], 2
        ),
        "same_output_as_naive": same,
    }


SECTION = "## Translation step (`make bench-translate`)"


def append_result_line(path: Path, text: str) -> None:
    """Add ``text`` at the end of this benchmark's section of RESULTS.md (its heading may carry a date after
    "Translation step"; made at the file's end if missing)."""
    append_to_section(path, SECTION, text, match="## Translation step")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny-sentences", type=int, default=256)
    parser.add_argument("--base-sentences", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-base", action="store_true", help="only the tiny model")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "translate.json"))
    parser.add_argument("--results-md", default=str(REPO / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, n in (("tiny", args.tiny_sentences), ("marian-base", args.base_sentences)):
            if name == "marian-base" and args.skip_base:
                continue
            print(f"[bench] {name} ({n} sentences)", flush=True)
            results[name] = bench_model(name, Path(tmp) / f"opus-mt-en-de-{name}", n, args.batch_size)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} CPU, {args.threads} thread(s), load {os.getloadavg()[0]:.1f}",
        "models": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    parts = []
    for name, r in results.items():
        b = r["runs"]["batched"]
        parts.append(
            f"{name} ({r['params'] / 1e6:.1f}M params): {b['sentences_per_s']} sentences/s, "
            f"{b['output_tokens_per_s']:.0f} output tokens/s batched by length = **{r['speedup_vs_naive']}x the "
            f"naive loop** ({r['runs']['naive']['sentences_per_s']}/s), {r['speedup_vs_unsorted']}x unsorted "
            f"batches; same output as naive: {r['same_output_as_naive']}"
        )
    line = f"- translate ({result['date']}, {result['machine']}; random Marian, batch {args.batch_size}): " + "; ".join(parts) + " `make bench-translate`\n"  # fmt: skip
    append_result_line(Path(args.results_md), line)
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
