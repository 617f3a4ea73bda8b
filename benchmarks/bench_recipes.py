"""Cost of adding one language (German) on the synthetic world: MLA on a frozen English CLIP vs full CCLM
pretraining with that language (see ``make bench-recipes``).

* English base model (not counted in MLA's cost: MLA starts from an existing CLIP): the demo config's tiny
  open_clip CLIP fitted on the world's English captions (``tests/english_clip.fit_clip``).
* MLA: ``cclm.recipes.mla_run.run_mla`` with ``configs/recipes/mla_demo.yaml`` -- stage 1 on en-de parallel text,
  stage 2 on German captions; only the multilingual embedding and the acquirers train.
* CCLM: ``cclm.train.pretrain.Pretraining`` with ``configs/pretrain/demo.yaml`` (the tiny cross-view model from scratch)
  on English + German captions and en-de parallel text; retrieval with ITC top-k + ITM re-ranking.

Both on the same world (German captions and parallel pairs available to both), same held-out retrieval sets
(100 images), one CPU thread, data loading in-process (``num_workers=0``) so CPU time is the process's own.
CPU seconds = user + system time of this process for the training run only (evaluation excluded).
Writes benchmarks/results/recipes.json and appends a line to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Cost:
    def __enter__(self):
        self.cpu, self.wall = cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.cpu, self.wall = cpu_seconds() - self.cpu, time.perf_counter() - self.wall


def r1(metrics: dict) -> float:
    return (metrics["txt_r1"] + metrics["img_r1"]) / 2


def build_world(root: Path, images: int) -> Path:
    from cclm.data.tokenize import train_tokenizer
    from data_prep.world.build import build_world as build

    world = root / "world"
    build(
        world,
        num_images=images,
        caption_langs=("en", "de"),
        parallel_langs=("de",),
        image_size=32,
        seed=0,
        heldout_images=100,
        heldout_langs=("en", "de"),
        xvnli_images=10,
    )
    corpus = (world / "text" / "corpus.txt").read_text(encoding="utf-8").splitlines()
    train_tokenizer(corpus, world / "tokenizer", vocab_size=400)
    return world


def english_clip(world: Path, root: Path, steps: int) -> tuple[Path, dict]:
    from safetensors.torch import save_model

    from cclm.config import DataConfig, MLARecipeConfig, load_config
    from cclm.data.pipeline import PretrainData
    from cclm.data.tokenize import load_tokenizer
    from cclm.recipes.clip import build_clip, build_clip_tokenizer, text_tower
    from tests.english_clip import fit_clip

    cfg = load_config(
        MLARecipeConfig, REPO / "configs/recipes/mla_demo.yaml", [f"world={world}", "clip.pretrained=null"]
    )
    torch.manual_seed(0)
    clip = build_clip(cfg.clip)
    tokenize = build_clip_tokenizer(cfg.clip, text_tower(clip).context_length)
    data_cfg = load_config(
        DataConfig,
        None,
        [f"image_caption.shards={world}/image_caption", "image_caption.batch_size=64", "num_workers=0"],
    )
    data_cfg.image_caption.languages = ["en"]
    data_cfg.hflip, data_cfg.crop_scale_min = False, 0.8
    data = PretrainData(data_cfg, load_tokenizer(str(world / "tokenizer")), 24, image_size=32, seed=0)
    with Cost() as cost:
        fit_clip(clip, tokenize, data, steps=steps, lr=2e-3)
    data.close()
    path = root / "clip.safetensors"
    save_model(clip, str(path))
    params = sum(p.numel() for p in clip.parameters())
    return path, {"steps": steps, "cpu_s": cost.cpu, "wall_s": cost.wall, "params": params}


def run_mla_bench(world: Path, clip_file: Path, root: Path, nlt_steps: int, le_steps: int) -> dict:
    from cclm.config import MLARecipeConfig, load_config
    from cclm.recipes.mla import MLAModel
    from cclm.recipes.mla_run import run_mla

    cfg = load_config(
        MLARecipeConfig,
        REPO / "configs/recipes/mla_demo.yaml",
        [
            f"world={world}",
            f"clip.pretrained={clip_file}",
            f"output_dir={root / 'mla'}",
            f"nlt.steps={nlt_steps}",
            f"le.steps={le_steps}",
        ],
    )
    model = MLAModel.build(cfg)
    with Cost() as cost:
        results = run_mla(cfg, model)
    training = results["training"]
    return {
        "steps": nlt_steps + le_steps,
        "trained_params": results["trained_params"],
        "total_params": results["total_params"],
        "cpu_s": training["nlt/cpu_seconds"] + training["le/cpu_seconds"],
        "wall_s": training["nlt/seconds"] + training["le/seconds"],
        "run_wall_s_incl_eval": cost.wall,
        "r1": {lang: r1(m) for lang, m in results["languages"].items()},
        "r1_before": {lang: r1(m) for lang, m in results["before"].items()},
    }


def run_cclm_bench(world: Path, root: Path, steps: int) -> dict:
    from cclm.config import EvalConfig, PretrainConfig, load_config
    from cclm.evaluation.datasets import load_heldout_sets
    from cclm.evaluation.run import evaluate_retrieval
    from cclm.train.pretrain import Pretraining

    cfg = load_config(
        PretrainConfig,
        REPO / "configs/pretrain/demo.yaml",
        [
            f"model.text.tokenizer={world}/tokenizer",
            f"data.image_caption.shards={world}/image_caption",
            f"data.parallel_text.shards={world}/parallel",
            "data.num_workers=0",
            f"train.max_steps={steps}",
            f"train.save_every={steps}",
            "deepspeed.zero_stage=0",
            f"output_dir={root / 'cclm'}",
        ],
    )
    torch.manual_seed(0)
    with Cost() as cost:
        trainer = Pretraining(cfg)
        trainer.run()
    model = trainer.model.eval()
    sets = load_heldout_sets({"world": str(world / "heldout")}, ["en", "de"])["world"]
    eval_cfg = load_config(EvalConfig, None, ["k_test=32"])
    metrics = {s.lang: evaluate_retrieval(model, s, trainer.tokenizer, eval_cfg, 32, "cpu") for s in sets}
    itc_only = {
        s.lang: evaluate_retrieval(model, s, trainer.tokenizer, eval_cfg, 32, "cpu", rerank=False)
        for s in sets
    }
    params = sum(p.numel() for p in model.parameters())
    return {
        "steps": steps,
        "trained_params": params,
        "total_params": params,
        "cpu_s": cost.cpu,
        "wall_s": cost.wall,
        "r1": {lang: r1(m) for lang, m in metrics.items()},
        "r1_itc_only": {lang: r1(m) for lang, m in itc_only.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--clip-steps", type=int, default=300)
    parser.add_argument("--nlt-steps", type=int, default=150)
    parser.add_argument("--le-steps", type=int, default=100)
    parser.add_argument("--cclm-steps", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "recipes.json"))
    parser.add_argument("--results-md", default=str(REPO / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        world = build_world(root, args.images)
        clip_file, base = english_clip(world, root, args.clip_steps)
        print(f"[bench] English CLIP: {base}", flush=True)
        mla = run_mla_bench(world, clip_file, root, args.nlt_steps, args.le_steps)
        print(f"[bench] MLA: {mla}", flush=True)
        cclm = run_cclm_bench(world, root, args.cclm_steps)
        print(f"[bench] CCLM: {cclm}", flush=True)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} CPU, {args.threads} thread(s)",
        "world": {"images": args.images, "heldout_images": 100, "image_size": 32, "languages": ["en", "de"]},
        "english_clip": base,
        "mla": mla,
        "cclm_pretraining": cclm,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    line = (
        f"- recipes ({result['date']}, {result['machine']}; synthetic world, {args.images} images, R@1 = mean of "
        f"txt/img R@1 on 100 held-out images): add German with MLA: {mla['trained_params']:,} trained of "
        f"{mla['total_params']:,} params, {mla['cpu_s'] / 60:.2f} CPU-min training "
        f"({mla['steps']} steps), de R@1 {mla['r1']['de']:.1f} (from {mla['r1_before']['de']:.1f}; en "
        f"{mla['r1']['en']:.1f}) -- on top of an English CLIP that took {base['cpu_s'] / 60:.2f} CPU-min; full CCLM "
        f"pretraining with German: {cclm['trained_params']:,} params, {cclm['cpu_s'] / 60:.2f} CPU-min "
        f"({cclm['steps']} steps), de R@1 {cclm['r1']['de']:.1f}, en {cclm['r1']['en']:.1f} (ITC only: de "
        f"{cclm['r1_itc_only']['de']:.1f}, en {cclm['r1_itc_only']['en']:.1f}); "
        "`make bench-recipes`\n"
    )
    md = Path(args.results_md)
    text = md.read_text() if md.exists() else ""
    with md.open("a") as handle:
        if "## Language extension recipes" not in text:
            handle.write("\n## Language extension recipes (`make bench-recipes`)\n\n")
        handle.write(line)
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
