"""``cclm pretrain CONFIG [key=value ...]``: run under any launcher (deepspeed, torchrun, srun) or alone."""

from __future__ import annotations

import argparse
import os
import sys

from cclm.cli_args import add_config_arguments, start_logging
from cclm.config import ConfigError, PretrainConfig, load_config


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cclm pretrain", description=__doc__)
    add_config_arguments(parser, "configs/pretrain/", "train.max_steps=100")
    args = parser.parse_args(argv[1:])
    start_logging()
    try:
        cfg = load_config(PretrainConfig, args.config, args.overrides)
        from cclm.train.pretrain import pretrain

        result = pretrain(cfg)
    except (ConfigError, FileNotFoundError) as err:
        print(f"cclm pretrain: config error: {err}", file=sys.stderr)
        return 2
    if result and int(os.environ.get("RANK", "0")) == 0:
        shown = {
            k: v for k, v in result.items() if not k.startswith("eval/") or k.startswith("eval/world/mean/")
        }
        print("final:", " ".join(f"{k}={v:.4g}" for k, v in sorted(shown.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
