"""``cclm prep tokenizer``: train an XLM-R-style Unigram/BPE tokenizer offline on shard text or text files."""

from __future__ import annotations

import itertools
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cclm.data.shards import SKIP_KEY, expand_shards, iter_tar_samples, read_sizes
from cclm.data.skips import SkipCounter
from cclm.data.tokenize import train_tokenizer
from cclm.errors import DataError
from cclm.jsonl import lone_surrogate


def shard_texts(spec: str, skips: SkipCounter) -> Iterator[str]:
    """Every caption (image-caption shards) and both sides (parallel shards) of the given shards. A sample whose
    json holds a lone UTF-16 surrogate (half a character, as scraped alt-text has; the training pipeline skips it
    too) is counted in ``skips`` as ``bad_json``, with a warning."""
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
            surrogate = lone_surrogate(sample["json"], meta)
            if surrogate:
                skips.add("bad_json", f"{url}: sample {sample['__key__']}: {surrogate}")
                continue
            captions = meta.get("captions") or {}
            if not isinstance(captions, dict):
                raise DataError(
                    f"{url}: sample {sample['__key__']}: 'captions' must be {{language: captions}}"
                )
            for lang, value in captions.items():
                if not isinstance(value, (str, list)):
                    raise DataError(
                        f"{url}: sample {sample['__key__']}: its caption {lang!r} is "
                        f"{json.dumps(value)[:40]}, not a text or a list of texts"
                    )
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
    p.add_argument(
        "--out",
        required=True,
        help="output tokenizer folder (must not hold a tokenizer yet, see --overwrite)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the tokenizer that --out holds (it is replaced only once the new one is trained)",
    )
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--model", choices=("unigram", "bpe"), default="unigram")
    p.add_argument("--model-max-length", type=int, default=512)
    p.add_argument(
        "--split-cjk",
        action="store_true",
        help="pre-split CJK text into characters (Chinese and Japanese have no spaces to split words at)",
    )
    p.set_defaults(run=run)


# What a tokenizer folder holds (HF's save_pretrained, XLM-R's and BERT's vocabularies): any of them makes --out a
# tokenizer folder, which only --overwrite replaces.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "sentencepiece.bpe.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
)


def held_tokenizer_files(folder: Path) -> list[str]:
    """The tokenizer files in ``folder`` (none when it does not exist)."""
    return [name for name in TOKENIZER_FILES if (folder / name).exists()]


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` that is a file, or that holds a tokenizer already without ``--overwrite``."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder")
    held = held_tokenizer_files(out)
    if held and not overwrite:
        raise FileExistsError(
            f"--out {out} already holds a tokenizer ({', '.join(held)}): give a new folder, or --overwrite to "
            "replace it"
        )


def save_replacing(trained: Path, out: Path) -> None:
    """Move the files of the tokenizer saved in ``trained`` into ``out``, removing the tokenizer files of the old
    one that the new one does not have (a left-over vocabulary would be read with the new tokenizer)."""
    out.mkdir(parents=True, exist_ok=True)
    new = {p.name for p in trained.iterdir()}
    for name in held_tokenizer_files(out):
        if name not in new:
            (out / name).unlink()
    for name in sorted(new):
        os.replace(trained / name, out / name)


def run(args) -> int:
    if not args.shards and not args.text:
        raise ValueError("give --shards and/or --text")
    out = Path(args.out)
    check_out(out, args.overwrite)
    for path in args.text:
        if not Path(path).is_file():
            raise FileNotFoundError(f"text file {path} does not exist")
    for spec in args.shards:
        expand_shards(spec)  # fail early on a pattern that matches nothing
    count = 0
    skips = SkipCounter(where="cclm prep tokenizer")

    def texts() -> Iterator[str]:
        nonlocal count
        for spec in args.shards:
            for text in shard_texts(spec, skips):
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
    # Saved beside --out first and moved in once complete: a failed run (a bad line in the last file) leaves
    # --out as it was, and --overwrite replaces the old tokenizer only with a whole new one.
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.partial-", dir=out.parent) as trained:
        tokenizer = train_tokenizer(
            itertools.chain([first], stream),
            trained,
            vocab_size=args.vocab_size,
            model_max_length=args.model_max_length,
            model=args.model,
            split_cjk=args.split_cjk,
        )
        check_out(out, args.overwrite)  # another run may have written there meanwhile
        save_replacing(Path(trained), out)
    skipped = "".join(f", skipped {reason}={n}" for reason, n in skips.as_dict().items())
    print(
        f"trained a {args.model} tokenizer with {len(tokenizer)} tokens on {count} sentences{skipped} -> {args.out}"
    )
    return 0
