"""Multilingual retrieval test sets, checked where they were downloaded and given a ready-to-run config (split
``test``); their files are read in place:

* ``xtd10``: a clone of github.com/adobe-research/Cross-lingual-Test-Dataset-XTD10 -- ``XTD10/test_image_names.txt``
  (1,000 COCO train2014 file names) with ``XTD10/test_1kcaptions_<lang>.txt`` (en es it ko pl ru tr zh),
  ``MIC/test_1kcaptions_{de,fr}.txt`` and ``STAIR/test_1kcaptions_jp.txt`` (Japanese, ``ja``), every caption
  file aligned line by line with the image list; the images are COCO's ``train2014/``.
* ``xm3600``: Crossmodal-3600 (google.github.io/crossmodal-3600) -- ``captions.jsonl`` (one image a line:
  ``{"image/key": "...", "image/locale": "...", "<lang>": {"caption": [...], ...}, ...}``, 36 languages) and the
  images as ``<image/key>.jpg`` (``images.tgz`` unpacked; by default ``<dataset>/images/``)."""

from __future__ import annotations

import re
from pathlib import Path

from cclm.data.languages import normalize_language
from cclm.errors import DataError
from cclm.jsonl import read_jsonl
from data_prep.corpora.retrieval_sets import (
    SplitSet,
    add_options,
    existing_folder,
    layout_error,
    publish,
    read_lines,
)

XTD_CAPTIONS = re.compile(r"^test_1kcaptions_(?P<lang>[a-z]+)\.txt$")
XTD_FOLDERS = ("XTD10", "MIC", "STAIR")
XTD_CODES = {"jp": "ja"}  # STAIR's file says jp
XTD_LAYOUT = (
    "the XTD10 repository: XTD10/test_image_names.txt with XTD10/test_1kcaptions_<lang>.txt "
    "(and MIC/test_1kcaptions_{de,fr}.txt, STAIR/test_1kcaptions_jp.txt)"
)
XM3600_LAYOUT = 'XM3600\'s captions.jsonl: one {"image/key": ..., "<lang>": {"caption": [...]}} object a line'


def caption_count(captions) -> int:
    """Non-empty captions of a record, as the evaluation counts them (a string is one caption)."""
    captions = [captions] if isinstance(captions, str) else captions
    return sum(isinstance(c, str) and bool(c.strip()) for c in captions)


def xtd_root(path: str) -> Path:
    root = existing_folder(path, "--dataset")
    for candidate in (root, root.parent):  # the clone, or its XTD10/ folder
        if (candidate / "XTD10" / "test_image_names.txt").is_file():
            return candidate
    raise layout_error(root, XTD_LAYOUT)


def coco_train2014(images: Path, first: str) -> Path:
    """The folder of the XTD images: ``--images`` itself, or its ``train2014/``."""
    if not (images / first).is_file() and (images / "train2014" / first).is_file():
        return images / "train2014"
    return images


def run_xtd10(args) -> int:
    root = xtd_root(args.dataset)
    image_list = "XTD10/test_image_names.txt"
    names = [line.strip() for line in read_lines(root / image_list) if line.strip()]
    images = coco_train2014(existing_folder(args.images, "--images"), names[0] if names else "")
    captions: dict[str, list[str]] = {}
    split = SplitSet("test", {}, [images / name for name in names])
    for folder in XTD_FOLDERS:
        for path in sorted((root / folder).glob("test_1kcaptions_*.txt")):
            code = XTD_CAPTIONS.match(path.name)["lang"]
            lang = normalize_language(XTD_CODES.get(code, code))
            if lang is None:
                raise DataError(f"{path}: unknown language code {code!r} in the file name")
            lines = read_lines(path)
            if len(lines) != len(names):
                raise DataError(
                    f"{path}: {len(lines)} captions for the {len(names)} images of {root / image_list}"
                )
            captions[lang] = [f"{folder}/{path.name}"]
            split.count(lang, [int(bool(line.strip())) for line in lines])
    if not captions:
        raise layout_error(root, XTD_LAYOUT)
    split.data = {
        "format": "lines",
        "root": str(root),
        "image_root": str(images),
        "images_file": image_list,
        "captions": dict(sorted(captions.items())),
    }
    comment = f"XTD10 (github.com/adobe-research/Cross-lingual-Test-Dataset-XTD10), by `cclm prep xtd10` from {root}."
    return publish("xtd10", [split], Path(args.out).expanduser().resolve(), images, {}, comment)


def xm3600_records(path: Path) -> list[dict]:
    records = []
    for number, record in read_jsonl(path):
        if not isinstance(record.get("image/key"), str):
            raise layout_error(f"{path}:{number}", XM3600_LAYOUT)
        records.append(record)
    if not records:
        raise layout_error(path, XM3600_LAYOUT)
    return records


def caption_languages(records: list[dict]) -> list[str]:
    """The keys that hold captions (``{"caption": [...]}``), not ``image/key`` or ``image/locale``."""
    langs = {
        k for r in records for k, v in r.items() if isinstance(v, dict) and isinstance(v.get("caption"), list)
    }
    return sorted(langs)


def run_xm3600(args) -> int:
    root = existing_folder(args.dataset, "--dataset")
    captions_file = root / "captions.jsonl"
    if not captions_file.is_file():
        raise layout_error(root, XM3600_LAYOUT + " in captions.jsonl")
    records = xm3600_records(captions_file)
    images = existing_folder(args.images or str(root / "images"), "--images")
    langs = caption_languages(records)
    if not langs:
        raise layout_error(captions_file, XM3600_LAYOUT)
    for number, record in enumerate(records, 1):  # what the evaluation's reader refuses, refused here
        bad = [lang for lang in langs if lang in record and not isinstance(record[lang], dict)]
        if bad or not isinstance(record.get("image/key"), str):
            what = (
                f"'{bad[0]}' must be an object with a 'caption' list"
                if bad
                else "'image/key' must be a string"
            )
            raise DataError(f"{captions_file}: record {number}: {what}")
    split = SplitSet(
        "test",
        {"format": "xm3600", "root": str(root), "image_root": str(images), "languages": langs},
        [images / f"{r['image/key']}.jpg" for r in records],
    )
    for lang in langs:
        split.count(
            lang,
            [caption_count(r.get(lang, {}).get("caption", [])) for r in records],
        )
    comment = f"Crossmodal-3600 (google.github.io/crossmodal-3600), by `cclm prep xm3600` from {root}."
    return publish("xm3600", [split], Path(args.out).expanduser().resolve(), images, {}, comment)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "xtd10", help="check an XTD10 clone + COCO train2014 images; write a retrieval config"
    )
    add_options(p, "clone of the XTD10 repository", "COCO train2014/ folder (or the COCO folder holding it)")
    p.set_defaults(run=run_xtd10)

    p = subparsers.add_parser("xm3600", help="check a Crossmodal-3600 download; write a retrieval config")
    p.add_argument("--dataset", required=True, help="folder with captions.jsonl (and images/)")
    p.add_argument("--images", default="", help="folder of <image/key>.jpg (default: <dataset>/images)")
    p.add_argument("--out", required=True, help="folder for the config")
    p.set_defaults(run=run_xm3600)
