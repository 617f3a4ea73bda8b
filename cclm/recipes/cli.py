"""``cclm recipe mla|cvil CONFIG [key=value ...]``: add languages to an existing model cheaply.

  mla   a frozen English open_clip CLIP learns new languages through a multilingual embedding and small acquirer
        adapters (stage 1 on parallel text, stage 2 on new-language captions);
  cvil  a target-language student distils an English task model (teacher) on translated task sentences.

Both write ``<output_dir>/results.json``: {"languages": {lang: metrics}, "trained_params", "total_params"}, and
the per-language table ``languages.{json,csv,md}``.
Configs: ``configs/recipes/``.
"""

from __future__ import annotations

import argparse
import json

from cclm.cli_args import add_config_arguments, run_module, start_logging
from cclm.config import CViLRecipeConfig, MLARecipeConfig, load_config

RECIPES = {"mla": MLARecipeConfig, "cvil": CViLRecipeConfig}


def run(recipe: str, cfg) -> dict:
    if recipe == "mla":
        from cclm.recipes.mla_run import run_mla

        return run_mla(cfg)
    from cclm.recipes.cvil import run_cvil

    return run_cvil(cfg)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cclm recipe", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("recipe", choices=sorted(RECIPES), help="which recipe")
    add_config_arguments(parser, "configs/recipes/", "nlt.steps=100")
    args = parser.parse_args(argv[1:])
    start_logging()
    cfg = load_config(RECIPES[args.recipe], args.config, args.overrides)
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
