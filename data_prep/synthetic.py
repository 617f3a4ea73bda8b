"""``cclm prep synthetic``: the embedded world (see :mod:`data_prep.world`)."""

from __future__ import annotations

import json
import shlex

from data_prep.world.build import build_world
from data_prep.world.scenes import ALL_LANGUAGES


def _langs(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "synthetic",
        help="draw the synthetic multilingual world (no downloads)",
        description="Draw the synthetic world: image-caption and parallel shards, held-out "
        f"retrieval sets and an XVNLI-style set. Languages: {', '.join(ALL_LANGUAGES)}.",
    )
    p.add_argument("--out", required=True, help="output folder (new or empty)")
    p.add_argument("--num-images", type=int, default=2000, help="training images (default 2000)")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--caption-langs", default="en", help="languages of the image captions (default: en)")
    p.add_argument(
        "--parallel-langs",
        default="de,fr,es,ja,zh",
        help="languages paired with English in the parallel text (default: de,fr,es,ja,zh)",
    )
    p.add_argument(
        "--num-parallel", type=int, default=None, help="pairs per language (default: --num-images)"
    )
    p.add_argument("--heldout-images", type=int, default=200, help="held-out retrieval images (default 200)")
    p.add_argument("--heldout-langs", default="", help="held-out languages (default: all languages used)")
    p.add_argument(
        "--xvnli-images", type=int, default=150, help="images of the XVNLI-style set (default 150)"
    )
    p.add_argument(
        "--regions",
        action="store_true",
        help="also write each shape's box with its descriptions, and held-out grounding.jsonl (docs/regions.md)",
    )
    p.add_argument(
        "--region-langs",
        default="",
        help="languages of the region descriptions (default: all languages used)",
    )
    p.add_argument("--shard-samples", type=int, default=None, help="images per shard (default: ~16 shards)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=0, help="processes drawing images (0 = inline)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args) -> int:
    world = build_world(
        args.out,
        num_images=args.num_images,
        caption_langs=_langs(args.caption_langs),
        parallel_langs=_langs(args.parallel_langs),
        image_size=args.image_size,
        seed=args.seed,
        num_parallel=args.num_parallel,
        heldout_images=args.heldout_images,
        heldout_langs=_langs(args.heldout_langs) or None,
        xvnli_images=args.xvnli_images,
        regions=args.regions,
        region_langs=_langs(args.region_langs) or None,
        shard_size=args.shard_samples,
        command="cclm prep " + " ".join(shlex.quote(a) for a in args.argv),
        num_workers=args.num_workers,
        progress=not args.no_progress,
    )
    summary = {
        k: world[k]
        for k in (
            "images",
            "parallel_pairs",
            "heldout_images",
            "xvnli_images",
            "caption_langs",
            "parallel_langs",
            "heldout_langs",
        )
    }
    print(f"wrote the synthetic world to {args.out}: {json.dumps(summary, ensure_ascii=False)}")
    return 0
