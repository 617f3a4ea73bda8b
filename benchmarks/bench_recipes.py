"""Cost of adding one language (German) on the synthetic world: MLA on a frozen English CLIP vs full CCLM
pretraining with that language (see ``make bench-recipes``).

* English base model (not counted in MLA's cost: MLA starts from an existing CLIP): the demo config's tiny
  open_clip CLIP fitted on the world's English captions (``cclm recipe english-clip``'s code path).
* MLA: ``cclm.recipes.mla_run.run_mla`` with ``configs/recipes/mla_demo.yaml`` -- stage 1 on en-de parallel text,
  stage 2 on German captions; only the multilingual embedding and the acquirers train.
* MLA Japanese (key ``mla_ja``, the issue-18 proof): the same on an en + ja world (tokenizer isolating CJK
  ideographs, as the demo's): ja R@1 against en R@1, and MLA's trained parameters against full pretraining's
  (every parameter of the same CLIP).
* CCLM: ``cclm.train.pretrain.Pretraining`` with ``configs/pretrain/demo.yaml`` (the tiny cross-view model from scratch)
  on English + German captions and en-de parallel text; retrieval with ITC top-k + ITM re-ranking.

* cViL on easy-VQA (``benchmarks/bench_easy_vqa.py``'s ``cvil_easy_vqa``): an English VQA teacher with object
  tags distilled into Japanese + Hindi students; key ``cvil_easy_vqa`` (``--skip-cvil`` leaves it out).

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

from benchmarks.results_md import append_to_section  # noqa: E402


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


def build_world(root: Path, images: int, language: str = "de", split_cjk: bool = False) -> Path:
    """An en + ``language`` world under ``root/world_<language>`` with its tokenizer (``split_cjk`` for Japanese
    and Chinese, as the demo's)."""
    from cclm.data.tokenize import train_tokenizer
    from data_prep.world.build import build_world as build

    world = root / f"world_{language}"
    build(
        world,
        num_images=images,
        caption_langs=("en", language),
        parallel_langs=(language,),
        image_size=32,
        seed=0,
        heldout_images=100,
        heldout_langs=("en", language),
        xvnli_images=10,
    )
    corpus = (world / "text" / "corpus.txt").read_text(encoding="utf-8").splitlines()
    train_tokenizer(corpus, world / "tokenizer", vocab_size=400, split_cjk=split_cjk)
    return world


def mla_demo_cfg(world: Path, clip_file: Path, threads: int, *overrides: str):
    from cclm.config import MLARecipeConfig, load_config

    base = [f"world={world}", f"threads={threads}", f"clip.pretrained={clip_file}"]
    return load_config(MLARecipeConfig, REPO / "configs/recipes/mla_demo.yaml", [*base, *overrides])


def english_clip(world: Path, root: Path, steps: int, threads: int = 1) -> tuple[Path, dict]:
    """The English CLIP, made as a user makes it: ``cclm recipe english-clip configs/recipes/mla_demo.yaml``."""
    from cclm.recipes.english_clip import run_english_clip

    cfg = mla_demo_cfg(
        world,
        root / "clip.safetensors",
        threads,
        f"english_clip.steps={steps}",
        f"output_dir={root / 'english'}",
    )
    torch.manual_seed(0)
    out = run_english_clip(cfg)
    training = out["training"]
    return Path(out["path"]), {
        "steps": steps,
        "cpu_s": training["english_clip/cpu_seconds"],
        "wall_s": training["english_clip/seconds"],
        "params": out["trained_params"],
        "r1_en": r1(out["languages"]["en"]),
    }


def run_mla_bench(
    world: Path,
    clip_file: Path,
    root: Path,
    nlt_steps: int,
    le_steps: int,
    language: str = "de",
    threads: int = 1,
) -> dict:
    from cclm.recipes.mla import MLAModel
    from cclm.recipes.mla_run import run_mla

    cfg = mla_demo_cfg(
        world,
        clip_file,
        threads,
        f"output_dir={root / 'mla'}",
        f"languages=[{language}]",
        f"nlt.steps={nlt_steps}",
        f"le.steps={le_steps}",
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


def mla_ja(root: Path, images: int, clip_steps: int, nlt_steps: int, le_steps: int, threads: int) -> dict:
    """The issue-18 proof: Japanese (other script, verb-final order) added to a frozen English CLIP by MLA.
    ``full_pretraining_trained_params``: what pretraining the same dual encoder on every language would train --
    all of the CLIP's parameters (its tokenizer already covers Japanese); MLA's count is embedding + acquirers."""
    root.mkdir(parents=True, exist_ok=True)
    world = build_world(root, images, "ja", split_cjk=True)
    clip_file, base = english_clip(world, root, clip_steps, threads)
    mla = run_mla_bench(world, clip_file, root, nlt_steps, le_steps, "ja", threads)
    return {
        "r1": mla["r1"],
        "r1_before": mla["r1_before"],
        "ja_over_en": mla["r1"]["ja"] / mla["r1"]["en"],
        "trained_params": mla["trained_params"],
        "full_pretraining_trained_params": base["params"],
        "trained_fraction": mla["trained_params"] / base["params"],
        "mla_cpu_s": mla["cpu_s"],
        "mla_steps": mla["steps"],
        "english_clip": base,
    }


def mla_ja_line(result: dict) -> str:
    r = result["r1"]
    return (
        f"- MLA Japanese (synthetic world, R@1 = mean of txt/img R@1 on 100 held-out images): ja R@1 "
        f"{r['ja']:.1f} = {100 * result['ja_over_en']:.0f}% of en {r['en']:.1f} (from {result['r1_before']['ja']:.1f}"
        f"), {result['trained_params']:,} trained params = {100 * result['trained_fraction']:.1f}% of full "
        f"pretraining's {result['full_pretraining_trained_params']:,}, {result['mla_cpu_s'] / 60:.2f} CPU-min "
        f"({result['mla_steps']} steps); `make bench-recipes`\n"
    )


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


SECTION = "## Language extension recipes (`make bench-recipes`)"


def append_result_line(path: Path, text: str) -> None:
    """Add ``text`` at the end of this benchmark's section of RESULTS.md (the first heading that starts with
    ``SECTION``, not a later "Language extension recipes, ..." section; made at the file's end if missing)."""
    append_to_section(path, SECTION, text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--clip-steps", type=int, default=300)
    parser.add_argument("--nlt-steps", type=int, default=150)
    parser.add_argument("--le-steps", type=int, default=100)
    parser.add_argument("--cclm-steps", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-cvil", action="store_true", help="leave out the cViL easy-VQA proof")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "recipes.json"))
    parser.add_argument("--results-md", default=str(REPO / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        world = build_world(root, args.images)
        clip_file, base = english_clip(world, root, args.clip_steps, args.threads)
        print(f"[bench] English CLIP: {base}", flush=True)
        mla = run_mla_bench(world, clip_file, root, args.nlt_steps, args.le_steps, threads=args.threads)
        print(f"[bench] MLA: {mla}", flush=True)
        ja = mla_ja(root / "ja", args.images, args.clip_steps, args.nlt_steps, args.le_steps, args.threads)
        print(f"[bench] MLA Japanese: {ja}", flush=True)
        cclm = run_cclm_bench(world, root, args.cclm_steps)
        print(f"[bench] CCLM: {cclm}", flush=True)
        cvil = None
        if not args.skip_cvil:
            from benchmarks.bench_easy_vqa import cvil_easy_vqa, cvil_results_line

            cvil = cvil_easy_vqa(root / "cvil")
            print(f"[bench] cViL easy-VQA: {cvil}", flush=True)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} CPU, {args.threads} thread(s)",
        "world": {"images": args.images, "heldout_images": 100, "image_size": 32, "languages": ["en", "de"]},
        "english_clip": base,
        "mla": mla,
        "mla_ja": ja,
        "cclm_pretraining": cclm,
        **({"cvil_easy_vqa": cvil} if cvil else {}),
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
    append_result_line(
        Path(args.results_md), line + mla_ja_line(ja) + (cvil_results_line(cvil) if cvil else "")
    )
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
