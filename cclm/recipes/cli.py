"""``cclm recipe RECIPE CONFIG [key=value ...] [--threads N]``: add languages to an existing model cheaply.

  mla   a frozen English open_clip CLIP learns new languages through a multilingual embedding and small acquirer
        adapters (stage 1 on parallel text, stage 2 on new-language captions; optional retrieval fine-tuning);
  english-clip  fit the English CLIP an MLA config starts from (clip.model_cfg, e.g. the synthetic world's) on
        English captions and write it to clip.pretrained;
  cvil  a target-language student distils an English task model (teacher) on translated task sentences;
  cvil_vqa  cViL for VQA: English teacher (fine-tuned here or given), object tags, translate-test (easy-VQA).

Both write ``<output_dir>/results.json``: {"languages": {lang: metrics}, "trained_params", "total_params"}, and
the per-language table ``languages.{json,csv,md}``. ``trained_params`` (also in the printed summary): every
parameter some stage trained, each counted once (the stages' own counts: ``<stage>/trained_params``).
Configs: ``configs/recipes/``.
"""

from __future__ import annotations

import argparse
import json

from cclm.cli_args import add_config_arguments, run_module, start_logging
from cclm.config import (
    CViLRecipeConfig,
    CViLVQARecipeConfig,
    MLARecipeConfig,
    check_data_config,
    check_deepspeed_config,
    check_train_config,
    load_config,
)
from cclm.runtime.stop_signal import holds_stop_signal

RECIPES = {
    "mla": MLARecipeConfig,
    "english-clip": MLARecipeConfig,  # the English CLIP an MLA config (clip.model_cfg) starts from
    "cvil": CViLRecipeConfig,
    "cvil_vqa": CViLVQARecipeConfig,
}


def run(recipe: str, cfg) -> dict:
    if recipe == "english-clip":
        from cclm.recipes.english_clip import run_english_clip

        return run_english_clip(cfg)
    if recipe == "mla":
        from cclm.recipes.mla_run import run_mla

        return run_mla(cfg)
    if recipe == "cvil_vqa":
        from cclm.recipes.cvil_vqa import run_cvil_vqa

        return run_cvil_vqa(cfg)
    from cclm.recipes.cvil import run_cvil

    return run_cvil(cfg)


@holds_stop_signal
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cclm recipe", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("recipe", choices=sorted(RECIPES), help="which recipe")
    add_config_arguments(parser, "configs/recipes/", "nlt.steps=100")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: the config's `threads` where it has one, else automatic: "
        "OMP_NUM_THREADS when set, else half the cores up to 8)",
    )
    args = parser.parse_intermixed_args(argv[1:])  # --threads anywhere among the key=value overrides
    start_logging()
    cfg = load_config(RECIPES[args.recipe], args.config, args.overrides)
    check_train_config(cfg.train)  # before a stage folder is touched
    if getattr(cfg, "deepspeed", None) is not None:
        check_deepspeed_config(cfg.deepspeed)
    if RECIPES[args.recipe] is MLARecipeConfig:  # the pretraining streams (the cViL recipes read task files)
        check_data_config(cfg.data)
    if hasattr(cfg, "threads"):
        if args.threads is not None:
            cfg.threads = args.threads
    else:  # a recipe config without a `threads` key: set here
        from cclm.recipes.runner import apply_threads

        apply_threads(args.threads or 0)
    results = run(args.recipe, cfg)
    summary = {
        "languages": results["languages"],
        "trained_params": results["trained_params"],
        "total_params": results["total_params"],
    }
    print(json.dumps(summary, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    run_module("recipe", main)
