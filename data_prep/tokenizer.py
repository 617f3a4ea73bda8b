"""``cclm prep tokenizer``: train an XLM-R-style Unigram/BPE tokenizer offline on shard text or text files."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

from cclm.data.shards import SKIP_KEY, expand_shards, iter_tar_samples, read_sizes
from cclm.data.tokenize import train_tokenizer
from cclm.errors import DataError


def shard_texts(spec: str) -> Iterator[str]:
    """Every caption (image-caption shards) and both sides (parallel shards) of the given shards."""
    urls = expand_shards(spec)
    sizes = read_sizes(urls)
    for url in urls:
        for sample in iter_tar_samples(url, sizes[url]):
            if SKIP_KEY in sample or "json" not in sample:
                continue
            try:
                meta = json.loads(sample["json"])
            except (UnicodeDecodeError, ValueError) as err:
                raise DataError(
                    f"{url}: sample {sample['__key__']}: its json does not read ({err})"
                ) from None
            if not isinstance(meta, dict):
                raise DataError(f"{url}: sample {sample['__key__']}: its json is not an object")
            captions = meta.get("captions") or {}
            if not isinstance(captions, dict):
                raise DataError(
                    f"{url}: sample {sample['__key__']}: 'captions' must be {{language: captions}}"
                )
            for value in captions.values():
                yield from ([value] if isinstance(value, str) else [v for v in value if isinstance(v, str)])
            for key in ("src", "tgt"):
                if isinstance(meta.get(key), str):
                    yield meta[key]


def file_texts(path: str) -> Iterator[str]:
    """The non-blank lines of a UTF-8 text file; a line that is not UTF-8 stops the run naming it."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{number}: not UTF-8 (byte 0x{raw[err.start]:02x})") from None
            if line.strip():
                yield line.rstrip("\r\n")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "tokenizer",
        help="train a tokenizer on shard text (offline)",
        description="Train a Unigram or BPE tokenizer with `tokenizers` and save it as an "
        "HF tokenizer folder with XLM-R special tokens (<s>=0, <pad>=1, </s>=2, <unk>=3, "
        "<mask>). Use the folder as model.text.tokenizer.",
    )
    p.add_argument("--shards", action="append", default=[], help="shard spec (repeatable)")
    p.add_argument(
        "--text", action="append", default=[], help="text file, one sentence per line (repeatable)"
    )
    p.add_argument("--out", required=True, help="output tokenizer folder")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--model", choices=("unigram", "bpe"), default="unigram")
    p.add_argument("--model-max-length", type=int, default=512)
    p.add_argument(
        "--split-cjk",
        action="store_true",
        help="pre-split CJK text into characters (Chinese and Japanese have no spaces to split words at)",
    )
    p.set_defaults(run=run)


def run(args) -> int:
    if not args.shards and not args.text:
        raise ValueError("give --shards and/or --text")
    for path in args.text:
        if not Path(path).is_file():
            raise FileNotFoundError(f"text file {path} does not exist")
    for spec in args.shards:
        expand_shards(spec)  # fail early on a pattern that matches nothing
    count = 0

    def texts() -> Iterator[str]:
        nonlocal count
        for spec in args.shards:
            for text in shard_texts(spec):
                count += 1
                yield text
        for path in args.text:
            for text in file_texts(path):
                count += 1
                yield text

    stream = texts()
    first = next(stream, None)
    if first is None:
        raise ValueError("no text found in the given shards/files")
    tokenizer = train_tokenizer(
        itertools.chain([first], stream),
        args.out,
        vocab_size=args.vocab_size,
        model_max_length=args.model_max_length,
        model=args.model,
        split_cjk=args.split_cjk,
    )
    print(f"trained a {args.model} tokenizer with {len(tokenizer)} tokens on {count} sentences -> {args.out}")
    return 0
