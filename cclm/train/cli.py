"""``cclm pretrain CONFIG [key=value ...]``: run under any launcher (deepspeed, torchrun, srun) or alone."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from cclm.config import ConfigError, PretrainConfig, load_config


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cclm pretrain", description=__doc__)
    parser.add_argument("config", help="YAML config (see configs/pretrain/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = parser.parse_args(argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_config(PretrainConfig, args.config, args.overrides)
        from cclm.train.loop import pretrain

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
