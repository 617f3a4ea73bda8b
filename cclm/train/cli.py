"""``cclm pretrain CONFIG [key=value ...]``: run under any launcher (deepspeed, torchrun, srun) or alone."""

from __future__ import annotations

import argparse
import os

from cclm.cli_args import add_config_arguments, resolve_model_setting, run_module, start_logging
from cclm.config import PretrainConfig, load_config, require_complete
from cclm.runtime.stop_signal import holds_stop_signal


@holds_stop_signal
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cclm pretrain", description=__doc__)
    add_config_arguments(parser, "configs/pretrain/", "train.max_steps=100")
    args = parser.parse_args(argv[1:])
    start_logging()
    cfg = load_config(PretrainConfig, args.config, args.overrides)
    require_complete(cfg)
    from cclm.model.text import check_text_config
    from cclm.model.vision import check_vision_config

    # Before any data, process group or output folder: a misspelt field or an unknown model name fails now.
    check_vision_config(cfg.model.vision, "model.vision")
    check_text_config(cfg.model.text, "model.text")
    if cfg.init_from:
        cfg.init_from = resolve_model_setting(cfg.init_from, "init_from")
    from cclm.train.pretrain import pretrain

    result = pretrain(cfg)
    if result and int(os.environ.get("RANK", "0")) == 0:
        shown = {
            k: v for k, v in result.items() if not k.startswith("eval/") or k.startswith("eval/world/mean/")
        }
        print("final:", " ".join(f"{k}={v:.4g}" for k, v in sorted(shown.items())))
    return 0


if __name__ == "__main__":
    run_module("pretrain", main)
