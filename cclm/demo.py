"""``make demo``: the mission's claim, end to end on a laptop CPU in a few minutes.

1. Build the embedded synthetic world: captions in ENGLISH ONLY, parallel sentences English <-> de/fr/es/ja/zh
   (and object phrases, the form region descriptions take), held-out retrieval sets in every language.
2. Train a tokenizer on the world's text.
3. Pretrain the tiny cross-view model with DeepSpeed (2 gloo processes when there are 2 cores), twice: with the
   parallel-text view, and without it (image-caption view only).
   Both runs take the same number of image-caption steps; the parallel run adds one text step per two.
4. Export both, evaluate zero-shot image<->text retrieval in every language, print a table, write
   ``<out>/results.json`` and the training curves (``<out>/<run>/curves.png``). The table (and the top-level
   keys of results.json) rank by ITC similarity, the first stage of CCLM retrieval; the two-stage ranking (ITC
   top-k re-ranked by the ITM head) is stored as ``<run>_itm_rerank``. Re-ranking lowers the scores at this scale
   (docs/demo.md): in English the few-minute ITM head tells a caption's image from its ITC-nearest rivals less
   well than ITC does, and in the other languages it is at chance: it never saw their captions with an image, and
   this small model trained from scratch does not carry the matching over from English (ITC it does carry over).

The tokenizer (BPE, at most 1000 pieces) isolates every CJK character before Metaspace, as BERT's tokenizer does
(``train_tokenizer(split_cjk=True)``). Japanese and Chinese are written without spaces: without the split, 3/4 of
the vocabulary went to whole phrases of them (~2 pieces per sentence) and they retrieved at 0.4-0.6x English
(docs/demo.md). BPE rather than Unigram: the Unigram trainer seeds only pieces that repeat across distinct words,
so frequent English words ("small", "left", "red") were spelt letter by letter.

Languages other than English never saw an image; with parallel text they should retrieve nearly as well as
English, without it they should sit near chance.

5. Grounding (skipped with ``--no-grounding``): a third run continues the with-parallel model (``init_from``) on
   region batches (issue 14's multi-grained data) and trains its box head, where every box is paired with an
   ENGLISH description only. The box head then grounds held-out descriptions in every language (accuracy = IoU >=
   0.5, ``results.json`` ``"grounding"``): the other languages reach the boxes only through parallel text. Beside
   the box losses the run keeps the parallel pairs consistent (``model.objectives.xlc_weight``): each pair is
   put over one of the region batch's images -- an image it does not describe, without a box -- and the fused
   [CLS] of the translation is pulled to that of its English source.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from cclm.train.launch import local_pretrain_command

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "pretrain" / "demo.yaml"
LANGS = ("en", "de", "fr", "es", "ja", "zh")
RUNS = ("with_parallel", "without_parallel")
GROUNDING_RUN = "grounding"
# The grounding run continues the with-parallel model (init_from) on region batches only -- every box paired with
# an ENGLISH description -- with the box losses (L1 + GIoU) at a constant 3e-4 (at the pretraining lr of 1e-3
# they stall at the mean box, and a cosine decay leaves English at 57% instead of 73%; docs/demo.md, 5), and the
# cross-lingual consistency of parallel pairs put over the batch's images (xlc_weight): without it the box head's
# training on English drifts the fused states of the other languages away and they ground at 0.4-0.7x English.
# The parallel text feeds only that term (weight 0: no text steps).
GROUNDING_STEPS = 3000
GROUNDING_OVERRIDES = (
    "model.objectives.bbox=true",
    "model.objectives.itc_weight=0",
    "model.objectives.itm_weight=0",
    "model.objectives.mlm_weight=0",
    "model.objectives.xlc_weight=1",
    "data.parallel_text.weight=0",
    "data.regions.prob=1.0",
    "data.regions.batch_size=32",
    "data.regions.max_images=16",
    "train.optimizer.lr=3e-4",
    "train.scheduler.name=constant",
    "train.eval_every=0",
)
# Object phrases ("a small red circle" <-> "ein kleiner roter Kreis") added to each language's parallel text: region
# descriptions name one object alone, a form the sentences never use (German nominative after "ein", Japanese
# without a particle); without them the other languages grounded at 0.33-0.43x English (docs/demo.md section 5).
PARALLEL_PHRASES = 300
# The world's tokenizer (module docstring); a world whose tokenizer was trained otherwise is rebuilt, not reused.
TOKENIZER = {"vocab_size": 1000, "model": "bpe", "split_cjk": True}


def _shard_pattern(folder: Path) -> str:
    count = len(list(folder.glob("shard-*.tar")))
    if count == 0:
        raise FileNotFoundError(f"no shards in {folder}")
    return str(folder / f"shard-{{000000..{count - 1:06d}}}.tar")


def build_world(out: Path, images: int, image_size: int, seed: int) -> Path:
    from cclm.data.tokenize import train_tokenizer
    from data_prep.world.build import build_world as build

    world = out / "world"
    settings = world / "demo_tokenizer.json"
    if (world / "world.json").exists() and (world / "tokenizer" / "tokenizer.json").exists():
        spec = json.loads((world / "world.json").read_text())
        same_tokenizer = settings.exists() and json.loads(settings.read_text()) == TOKENIZER
        if (
            spec.get("images") == images
            and spec.get("image_size") == image_size
            and spec.get("seed") == seed
            and spec.get("region_langs") == ["en"]
            and spec.get("parallel_phrases") == PARALLEL_PHRASES
            and same_tokenizer
        ):
            print(f"[demo] reusing the world in {world}")
            return world
    if world.exists():
        import shutil

        shutil.rmtree(world)
    print(f"[demo] drawing the synthetic world: {images} images, English captions, 5 parallel languages")
    build(
        world,
        num_images=images,
        caption_langs=["en"],
        parallel_langs=[lang for lang in LANGS if lang != "en"],
        image_size=image_size,
        seed=seed,
        heldout_images=200,
        xvnli_images=60,
        regions=True,  # shape boxes with ENGLISH descriptions only; images and captions unchanged
        region_langs=["en"],
        parallel_phrases=PARALLEL_PHRASES,
    )
    corpus = (world / "text" / "corpus.txt").read_text(encoding="utf-8").splitlines()
    train_tokenizer(corpus, world / "tokenizer", **TOKENIZER)
    settings.write_text(json.dumps(TOKENIZER))
    return world


IMAGE_WEIGHT, TEXT_WEIGHT = 2.0, 1.0  # as in configs/pretrain/demo.yaml


def pretrain(
    world: Path,
    run_dir: Path,
    with_parallel: bool,
    image_steps: int,
    nproc: int,
    extra: list[str],
) -> None:
    """Both runs take ``image_steps`` image-caption steps; the parallel run adds its text steps on top."""
    steps = round(image_steps * (IMAGE_WEIGHT + TEXT_WEIGHT) / IMAGE_WEIGHT) if with_parallel else image_steps
    overrides = [
        f"train.eval_every={max(1, steps // 4)}",
        f"eval.datasets={{world: {world / 'heldout'}}}",
    ]
    if with_parallel:
        overrides.append(f"data.parallel_text.shards={_shard_pattern(world / 'parallel')}")
    else:
        overrides.append("data.parallel_text=null")
    what = f"{'with' if with_parallel else 'without'} parallel text"
    _run_pretraining(world, run_dir, steps, [*overrides, *extra], nproc, what)


def train_grounding(
    world: Path, run_dir: Path, init_model: Path, steps: int, nproc: int, extra: list[str]
) -> None:
    """The grounding run: the with-parallel model (``init_model``) trained on region batches of the same shards
    (boxes with English descriptions only) for ``steps`` steps: box losses, and the cross-lingual consistency of
    parallel pairs over the batches' images (no non-English text is ever paired with a box or a caption)."""
    overrides = [
        *GROUNDING_OVERRIDES,
        f"init_from={init_model}",
        f"data.regions.shards={_shard_pattern(world / 'image_caption')}",
        f"data.parallel_text.shards={_shard_pattern(world / 'parallel')}",
    ]
    what = "region batches: box losses + cross-lingual consistency"
    _run_pretraining(world, run_dir, steps, [*overrides, *extra], nproc, what)


def _run_pretraining(
    world: Path, run_dir: Path, steps: int, overrides: list[str], nproc: int, what: str
) -> None:
    common = [
        f"model.text.tokenizer={world / 'tokenizer'}",
        f"data.image_caption.shards={_shard_pattern(world / 'image_caption')}",
        f"output_dir={run_dir}",
        f"train.max_steps={steps}",
        f"train.save_every={steps}",
    ]
    command = local_pretrain_command(nproc, CONFIG, [*common, *overrides])
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONWARNINGS": "ignore",
    }
    print(f"[demo] pretraining ({what}) on {nproc} process(es)")
    subprocess.run(command, cwd=REPO, env=env, check=True)


def evaluate(model_dir: Path, world: Path, rerank: bool) -> dict[str, dict[str, float]]:
    import torch

    from cclm.data.tokenize import load_tokenizer
    from cclm.evaluation.datasets import load_heldout_sets
    from cclm.evaluation.run import run_retrieval
    from cclm.model import CrossViewModel

    torch.set_num_threads(os.cpu_count() or 1)
    model = CrossViewModel.from_pretrained(model_dir).eval()
    tokenizer = load_tokenizer(str(model_dir))
    sets = load_heldout_sets({"world": str(world / "heldout")}, LANGS)["world"]
    rows = {}
    for retrieval_set in sets:
        metrics = run_retrieval(
            model,
            retrieval_set,
            tokenizer,
            model.cfg.vision.image_size,
            k_test=32,
            batch_size=128,
            rerank=rerank,
        ).metrics
        rows[retrieval_set.lang] = {k: round(float(metrics[k]), 2) for k in ("txt_r1", "img_r1", "r_mean")}
    return rows


def evaluate_grounding(model_dir: Path, world: Path) -> dict[str, float]:
    """Grounding accuracy (% of held-out descriptions whose predicted box has IoU >= 0.5) per language."""
    import torch

    from cclm.data.tokenize import load_tokenizer
    from cclm.inference.ground import grounding_accuracy, read_grounding_sets
    from cclm.model import CrossViewModel

    torch.set_num_threads(os.cpu_count() or 1)
    model = CrossViewModel.from_pretrained(model_dir).eval()
    records = read_grounding_sets(world / "heldout")
    accuracy = grounding_accuracy(model, load_tokenizer(str(model_dir)), records)
    return {lang: round(accuracy[lang], 1) for lang in LANGS if lang in accuracy}


def print_table(results: dict) -> None:
    print(
        f"\nZero-shot image<->text retrieval on 200 held-out scenes, ranked by ITC similarity (%); "
        f"chance R@1 = {results['chance_r1']:.2f}."
    )
    print("Only English captions were ever paired with images.\n")
    print(f"{'':6}{'with parallel text':^26}    {'without parallel text':^26}")
    print(f"{'lang':6}" + f"{'txt_r1':>8}{'img_r1':>9}{'r_mean':>9}    " * 2)
    for lang in LANGS:
        cells = []
        for run in RUNS:
            m = results[run][lang]
            cells.append(f"{m['txt_r1']:>8.1f}{m['img_r1']:>9.1f}{m['r_mean']:>9.1f}    ")
        print(f"{lang:6}" + "".join(cells))
    if "grounding" in results:
        print(
            "\nGrounding on the held-out scenes (% of descriptions with IoU >= 0.5; boxes were only ever paired "
            "with English descriptions):"
        )
        print("  ".join(f"{lang} {acc:.1f}" for lang, acc in results["grounding"].items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cclm.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", default="demo_output")
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=600, help="image-caption steps of each pretraining run")
    parser.add_argument("--nproc", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-grounding",
        action="store_true",
        help="skip the third run (region batches, grounding per language)",
    )
    parser.add_argument(
        "--grounding-steps",
        type=int,
        default=GROUNDING_STEPS,
        help="steps of the grounding run (region batches)",
    )
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for both pretraining runs")
    args = parser.parse_args(argv)
    start = time.time()
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    world = build_world(out, args.images, args.image_size, args.seed)

    from cclm.train.export import export
    from cclm.train.plot import plot_curves

    results: dict = {"chance_r1": 100.0 / 200}
    runs = RUNS if args.no_grounding else (*RUNS, GROUNDING_RUN)
    for run in runs:
        run_dir = out / run
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        if run == GROUNDING_RUN:
            start_from = out / RUNS[0] / "model"
            train_grounding(world, run_dir, start_from, args.grounding_steps, args.nproc, args.overrides)
        else:
            pretrain(world, run_dir, run != "without_parallel", args.steps, args.nproc, args.overrides)
        model_dir = export(run_dir, run_dir / "model")
        plot_curves(run_dir)
        if run == GROUNDING_RUN:
            results["grounding"] = evaluate_grounding(model_dir, world)
            continue
        results[run] = evaluate(model_dir, world, rerank=False)
        results[f"{run}_itm_rerank"] = evaluate(model_dir, world, rerank=True)
    results["seconds"] = round(time.time() - start, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print_table(results)
    print(
        f"\n[demo] done in {results['seconds'] / 60:.1f} min: {out / 'results.json'}, curves in "
        f"{out / RUNS[0] / 'curves.png'} and {out / RUNS[1] / 'curves.png'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
