"""``cclm prep multi30k``: a clone of https://github.com/multi30k/dataset checked, and one retrieval config per
split (train, val, test = test_2016_flickr) with English and German from task 2 (five independent captions per
image) and French and Czech from task 1 (one translated caption), the usual multilingual retrieval protocol.

The publisher's layout (``data/`` of the clone; files gzipped as released, or gunzipped)::

    task1/image_splits/{train,val,test_2016_flickr}.txt       one Flickr30k file name a line
    task1/raw/{train,val,test_2016_flickr}.{fr,cs}[.gz]        aligned line by line with the image list
    task2/raw/{train,val,test_2016}.{1..5}.{en,de}[.gz]        aligned line by line with the same list

The caption files are written, decompressed, under ``OUT/annotations/`` (the evaluation reads plain text); the
images are read where they are (Flickr30k's ``flickr30k-images/``). For retrieval fine-tuning
(``configs/finetune/multi30k_cclm.yaml``), the same captions go to ``OUT/finetune/`` in the CCLM reference's JSON
layout (:mod:`cclm.tasks.retrieval_json`): ``train.<lang>.json`` (one item per caption), ``val.<lang>.json`` and
``test_2016_flickr.<lang>.json`` (one item per image), images named relative to the Flickr30k folder."""

from __future__ import annotations

import gzip
from pathlib import Path

from cclm.errors import DataError
from data_prep.corpora.files import DAMAGED, unreadable
from data_prep.corpora.retrieval_sets import (
    SplitSet,
    add_options,
    existing_folder,
    finetune_json,
    layout_error,
    publish,
)

# split -> (task 1 name, task 2 name)
SPLITS = {"train": ("train", "train"), "val": ("val", "val"), "test": ("test_2016_flickr", "test_2016")}
TASK1_LANGS = ("fr", "cs")
TASK2_LANGS = ("en", "de")
LAYOUT = (
    "multi30k/dataset's data/ folder: task1/image_splits/<split>.txt, task1/raw/<split>.{fr,cs}.gz and "
    "task2/raw/<split>.{1..5}.{en,de}.gz"
)


def data_folder(path: str) -> Path:
    """The clone's ``data/`` folder (the clone itself is accepted too)."""
    root = existing_folder(path, "--dataset")
    for candidate in (root, root / "data"):
        if (candidate / "task1" / "image_splits").is_dir():
            return candidate
    raise layout_error(root, LAYOUT)


def caption_files(split: str) -> dict[str, list[str]]:
    """language -> the split's caption files (relative to ``data/``, without ``.gz``), task 2 for en/de."""
    task1, task2 = SPLITS[split]
    files = {lang: [f"task2/raw/{task2}.{n}.{lang}" for n in range(1, 6)] for lang in TASK2_LANGS}
    files.update({lang: [f"task1/raw/{task1}.{lang}"] for lang in TASK1_LANGS})
    return files


def read_text(path: Path) -> bytes:
    """A caption file as plain bytes, from ``path`` or ``path.gz``."""
    if path.is_file():
        return path.read_bytes()
    lines: list[bytes] = []
    try:
        with gzip.open(path.with_name(path.name + ".gz"), "rb") as handle:
            lines.extend(handle)
    except DAMAGED as err:
        raise DataError(unreadable(f"{path}.gz", "gzip file", err, len(lines))) from None
    return b"".join(lines)


def lines_of(data: bytes, where: Path) -> list[str]:
    try:
        lines = data.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{where}: not UTF-8 (byte {err.start + 1})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


FINETUNE_NAMES = {
    "train": "train",
    "val": "val",
    "test": "test_2016_flickr",
}  # as multi30k_cclm.yaml reads them


def run(args) -> int:
    data = data_folder(args.dataset)
    images = existing_folder(args.images, "--images")
    out = Path(args.out).expanduser().resolve()
    annotations_dir = out / "annotations"
    found = [s for s in SPLITS if (data / "task1" / "image_splits" / f"{SPLITS[s][0]}.txt").is_file()]
    if not found:
        raise layout_error(data, LAYOUT)
    wanted = {s: caption_files(s) for s in found}
    missing = [
        f"{data / name}[.gz]"
        for files in wanted.values()
        for names in files.values()
        for name in names
        if not (data / name).is_file() and not (data / f"{name}.gz").is_file()
    ]
    if missing:
        raise DataError(
            f"{len(missing)} Multi30K caption files missing: {', '.join(missing)} (layout: {LAYOUT})"
        )

    annotations: dict[Path, bytes] = {}
    splits = []
    for split in found:
        list_name = f"task1/image_splits/{SPLITS[split][0]}.txt"
        list_bytes = (data / list_name).read_bytes()
        names = [line.strip() for line in lines_of(list_bytes, data / list_name) if line.strip()]
        annotations[annotations_dir / list_name] = list_bytes
        split_set = SplitSet(
            split,
            {
                "format": "lines",
                "root": str(annotations_dir),
                "image_root": str(images),
                "images_file": list_name,
                "captions": wanted[split],
            },
            [images / name for name in names],
        )
        for lang, files in wanted[split].items():
            captions: list[list[str]] = [[] for _ in names]
            for name in files:
                text = read_text(data / name)
                lines = lines_of(text, data / name)
                if len(lines) != len(names):
                    raise DataError(
                        f"{data / name}: {len(lines)} captions for the {len(names)} images of {list_name}"
                    )
                for kept, line in zip(captions, lines):
                    if line.strip():
                        kept.append(line.strip())
                annotations[annotations_dir / name] = text
            split_set.count(lang, [len(kept) for kept in captions])
            json_name = f"{FINETUNE_NAMES[split]}.{lang}.json"
            ids = [Path(name).stem for name in names]  # the Flickr30k id
            annotations[out / "finetune" / json_name] = finetune_json(split == "train", names, captions, ids)
        splits.append(split_set)
    comment = (
        f"Multi30K (github.com/multi30k/dataset), written by `cclm prep multi30k` from {data}.\n"
        "en/de: task 2 (5 captions per image); fr/cs: task 1 (1 caption). Evaluate or fine-tune with checkpoint=..."
    )
    code = publish("multi30k", splits, out, images, annotations, comment)
    print(
        f"fine-tune with: cclm finetune configs/finetune/multi30k_cclm.yaml pretrained=MODEL_DIR "
        f"data.root={out / 'finetune'} data.image_roots.images={images}"
    )
    return code


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("multi30k", help="check a Multi30K clone; write retrieval configs per split")
    add_options(
        p,
        "clone of github.com/multi30k/dataset (or its data/ folder)",
        "Flickr30k image folder (flickr30k-images/)",
    )
    p.set_defaults(run=run)
