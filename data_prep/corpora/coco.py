"""``cclm prep coco``: COCO captions checked against the images, and one retrieval config per split. Either file
as published (or both):

* Karpathy's ``dataset_coco.json`` (cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip):
  ``{"images": [{"filepath": "val2014", "filename": "COCO_val2014_....jpg", "cocoid": 391895, "split":
  "train|restval|val|test", "sentences": [{"raw": "..."}, ...]}, ...]}`` -> splits ``train`` (train + restval,
  113,287 images, as ALBEF/CCLM fine-tune), ``val`` and ``test`` (5,000 each; ``folds: 5`` gives MSCOCO 1k);
* COCO's own ``annotations/captions_<split><year>.json`` (``{"images": [{"id", "file_name"}], "annotations":
  [{"image_id", "caption"}]}``) -> split ``<split><year>`` (``train2017``, ``val2017``), images under
  ``<split><year>/``.

``--images`` is the folder holding ``train2014/``, ``val2014/`` (Karpathy) or ``train2017/``, ``val2017/``. The
captions are written as ``OUT/annotations/coco_<split>.json`` in the ``json`` retrieval format
(``[{"image", "caption": [...], "image_id"}]``). The Karpathy splits also go to ``OUT/finetune/en.train.json``
(one item per caption), ``en.valid.json`` and ``en.test.json`` (the 5k test; one item per image) in the CCLM
reference's fine-tuning layout, which ``configs/finetune/mscoco_cclm.yaml`` reads (its Japanese and Chinese
test sets come from other publishers)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from cclm.data.examples import visible_text
from cclm.errors import DataError
from cclm.jsonl import read_json
from data_prep.corpora.retrieval_sets import (
    SplitSet,
    add_options,
    existing_folder,
    finetune_json,
    layout_error,
    publish,
)

KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
FINETUNE_NAMES = {
    "train": "en.train.json",
    "val": "en.valid.json",
    "test": "en.test.json",
}  # of Karpathy's splits
OFFICIAL_FILE = re.compile(r"^captions_(?P<split>[a-z]+\d{4})\.json$")
LAYOUT = (
    "Karpathy's dataset_coco.json ({'images': [{'filepath', 'filename', 'cocoid', 'split', 'sentences': "
    "[{'raw'}]}]}) or COCO's captions_<split><year>.json ({'images': [{'id', 'file_name'}], 'annotations': "
    "[{'image_id', 'caption'}]})"
)

Entry = dict  # {"image": path under --images, "caption": [...], "image_id": str}


def karpathy_entries(path: Path, images: list[dict]) -> dict[str, list[Entry]]:
    splits: dict[str, list[Entry]] = {}
    seen: set[str] = set()
    for n, image in enumerate(images):
        if not isinstance(image, dict) or not {"filepath", "filename", "split", "sentences"} <= image.keys():
            raise layout_error(f"{path} (images[{n}])", LAYOUT)
        split = KARPATHY_SPLITS.get(image["split"]) if isinstance(image["split"], str) else None
        if split is None:
            raise DataError(
                f"{path}: images[{n}] has split {image['split']!r}; expected one of {list(KARPATHY_SPLITS)}"
            )
        if not isinstance(image["sentences"], list):
            raise DataError(f"{path}: images[{n}] 'sentences' must be a list of {{'raw': caption}}")
        captions = [s.get("raw", "") for s in image["sentences"] if isinstance(s, dict)]
        image_id = str(image.get("cocoid", image["filename"]))
        if image_id in seen:
            raise DataError(f"{path}: images[{n}] repeats cocoid {image_id}; each image needs its own id")
        seen.add(image_id)
        splits.setdefault(split, []).append(
            {
                "image": f"{image['filepath']}/{image['filename']}",
                "caption": [visible_text(c) for c in captions if visible_text(c)],
                "image_id": image_id,
            }
        )
    return splits


def official_entries(path: Path, data: dict) -> dict[str, list[Entry]]:
    match = OFFICIAL_FILE.match(path.name)
    if not match:
        raise DataError(
            f"{path}: a COCO captions file must keep its name captions_<split><year>.json (it names the image folder)"
        )
    split = match["split"]
    by_id: dict[str, Entry] = {}
    for n, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise layout_error(f"{path} (images[{n}])", LAYOUT)
        if str(image["id"]) in by_id:
            raise DataError(
                f"{path}: images[{n}] repeats image id {image['id']!r}; each image needs its own id"
            )
        by_id[str(image["id"])] = {
            "image": f"{split}/{image['file_name']}",
            "caption": [],
            "image_id": str(image["id"]),
        }
    for n, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise layout_error(f"{path} (annotations[{n}])", LAYOUT)
        entry = by_id.get(str(ann["image_id"]))
        if entry is None:
            raise DataError(f"{path}: annotations[{n}] names image_id {ann['image_id']} that 'images' lacks")
        if visible_text(ann["caption"]):
            entry["caption"].append(visible_text(ann["caption"]))
    return {split: list(by_id.values())}


def entries_of(path: Path) -> dict[str, list[Entry]]:
    data = read_json(path)
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        if isinstance(data.get("annotations"), list):
            return official_entries(path, data)
        if all(isinstance(i, dict) and "sentences" in i for i in data["images"][:1]):
            return karpathy_entries(path, data["images"])
    raise layout_error(path, LAYOUT)


def run(args) -> int:
    images = existing_folder(args.images, "--images")
    out = Path(args.out).expanduser().resolve()
    by_split: dict[str, list[Entry]] = {}
    for name in args.dataset:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"--dataset {path} does not exist")
        for split, entries in entries_of(path).items():
            if split in by_split:
                raise DataError(f"split {split!r} comes from two files; give each captions file once")
            by_split[split] = entries
    annotations, splits = {}, []
    for split, entries in by_split.items():
        file = out / "annotations" / f"coco_{split}.json"
        annotations[file] = json.dumps(entries, ensure_ascii=False).encode()
        split_set = SplitSet(
            split,
            {
                "format": "json",
                "root": str(file.parent),
                "image_root": str(images),
                "captions": {"en": [file.name]},
            },
            [images / e["image"] for e in entries],
            k_test=256 if split == "test" else 128,
        )
        split_set.count("en", [len(e["caption"]) for e in entries])
        splits.append(split_set)
        if split in FINETUNE_NAMES:
            annotations[out / "finetune" / FINETUNE_NAMES[split]] = finetune_json(
                split == "train",
                [e["image"] for e in entries],
                [e["caption"] for e in entries],
                [e["image_id"] for e in entries],
            )
    comment = (
        f"COCO captions, written by `cclm prep coco` from {', '.join(args.dataset)}.\n"
        "MSCOCO 1k (Karpathy test in 5 folds): set data.folds=5. Evaluate or fine-tune with checkpoint=..."
    )
    code = publish("coco", splits, out, images, annotations, comment)
    if set(FINETUNE_NAMES) <= by_split.keys():
        print(
            f"fine-tune with: cclm finetune configs/finetune/mscoco_cclm.yaml pretrained=MODEL_DIR "
            f"data.root={out / 'finetune'} data.image_roots.images={images} "
            f"'data.test={{en: {out / 'finetune' / 'en.test.json'}}}'"
        )
    return code


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("coco", help="check COCO captions + images; write retrieval configs per split")
    add_options(
        p,
        "dataset_coco.json (Karpathy) and/or captions_<split><year>.json file(s)",
        "COCO image folder holding train2014/ val2014/ (or train2017/ val2017/)",
        many=True,
    )
    p.set_defaults(run=run)
