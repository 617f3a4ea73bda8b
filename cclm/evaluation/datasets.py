"""Retrieval test sets: one in-memory format (:class:`RetrievalSet`) and loaders for the standard benchmarks.

Formats (``RetrievalDataConfig.format``):
  lines      -- an image list file plus, per language, one or more caption files aligned line by line with it
                (Multi30K test_2016_flickr: 1 file per language, 5 for the en/de "task 2" captions; XTD10).
  json       -- per language, a JSON list of {"image": path, "caption": str | [str], "image_id"?} as used by
                ALBEF/X-VLM/CCLM (MSCOCO Karpathy test en, the STAIR ja 1k/5k files, any custom set).
  id_tsv     -- per language, lines "IMAGE_ID#N<TAB>caption" (COCO-CN's human-written captions), an optional
                file of the image ids of the split, and ``image_template`` to find the image of an id.
  xm3600     -- XM3600's captions.jsonl ({"image/key": ..., "<lang>": {"caption": [...]}}) + images/<key>.jpg.
  demo_world -- the synthetic world's held-out sets: a folder with retrieval.jsonl, one line per image
                {"image": path relative to the folder, "image_id": str, "captions": {"<lang>": [...]}}, or a
                folder of such folders (``heldout/<lang>/``).
  (IGLUE's xFlickr&CO and WIT test files come through ``python`` loaders of :mod:`cclm.tasks.iglue_retrieval`, see
  configs/eval/xflickrco.yaml: evaluation never imports the tasks.)
  python     -- any other reader, named by ``loader: MODULE:FUNCTION`` and called as FUNCTION(data_cfg, lang).
Images are keyed on their id as a string (Flickr ids are strings, COCO ids ints: both become str keys).
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cclm.config import RetrievalDataConfig, RetrievalFormat  # noqa: F401 - RetrievalDataConfig re-exported
from cclm.data.images import ImageInput, MissingImageError
from cclm.errors import DataError
from cclm.jsonl import read_json, read_jsonl

logger = logging.getLogger(__name__)
MISSING_IMAGES_SHOWN = 20  # missing image files listed by name in the error (all are counted)


@dataclass
class RetrievalSet:
    """A retrieval test set in one language: the gallery images, the captions and who belongs to whom.

    ``txt2img[t]`` is the index of the image of caption t; ``img2txt[i]`` the indices of image i's captions."""

    name: str
    lang: str
    images: list[ImageInput]
    texts: list[str]
    txt2img: list[int]
    img2txt: list[list[int]]
    image_ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        where = f"retrieval set {self.name}/{self.lang}"
        if not self.images or not self.texts:
            raise ValueError(f"{where} is empty ({len(self.images)} images, {len(self.texts)} captions)")
        if len(self.txt2img) != len(self.texts) or len(self.img2txt) != len(self.images):
            raise ValueError(f"{where}: txt2img/img2txt do not match the numbers of captions and images")
        if self.image_ids and len(self.image_ids) != len(self.images):
            raise ValueError(f"{where}: {len(self.image_ids)} image ids for {len(self.images)} images")
        for i, texts in enumerate(self.img2txt):
            if not texts:
                raise ValueError(f"{where}: image {self.image_key(i)} has no caption")
            for t in texts:
                if not 0 <= t < len(self.texts) or self.txt2img[t] != i:
                    raise ValueError(f"{where}: img2txt[{i}] lists caption {t}, whose txt2img is not {i}")
        if sum(len(t) for t in self.img2txt) != len(self.texts):
            raise ValueError(f"{where}: some captions are not listed in img2txt")

    def image_key(self, i: int) -> str:
        return self.image_ids[i] if self.image_ids else str(self.images[i])

    def subset(self, image_indices: Sequence[int], name: str | None = None) -> RetrievalSet:
        """The set restricted to some images (and their captions), e.g. one fold of MSCOCO 5k."""
        images, texts, txt2img, img2txt, ids = [], [], [], [], []
        for new_i, i in enumerate(image_indices):
            images.append(self.images[i])
            if self.image_ids:
                ids.append(self.image_ids[i])
            img2txt.append(list(range(len(texts), len(texts) + len(self.img2txt[i]))))
            for t in self.img2txt[i]:
                texts.append(self.texts[t])
                txt2img.append(new_i)
        return RetrievalSet(name or self.name, self.lang, images, texts, txt2img, img2txt, ids)

    def folds(self, n_folds: int) -> list[RetrievalSet]:
        """Consecutive equal folds of the images (MSCOCO 1k = the 5k test split in 5 folds of 1,000)."""
        if n_folds <= 1:
            return [self]
        if len(self.images) % n_folds:
            raise ValueError(f"{len(self.images)} images do not split into {n_folds} equal folds")
        size = len(self.images) // n_folds
        return [self.subset(range(f * size, (f + 1) * size), f"{self.name}[fold{f}]") for f in range(n_folds)]

    @classmethod
    def from_entries(
        cls,
        name: str,
        lang: str,
        entries: Iterable[tuple[ImageInput, str, Sequence[str]]],
        keep_blank: bool = False,
    ):
        """Build from (image, image_id, captions) entries; entries with the same image id are merged (two
        different images under one id are refused), a caption given as a string is one caption, and images
        without any non-empty caption are skipped with a counted warning. ``keep_blank``: blank captions are
        captions too (a benchmark that scores every line of its files as given, as IGLUE does)."""
        by_key: dict[str, tuple[ImageInput, list[str]]] = {}
        for image, image_id, captions in entries:
            key = str(image_id)
            if key not in by_key:
                by_key[key] = (image, [])
            elif _differ(by_key[key][0], image):
                raise DataError(
                    f"{name}/{lang}: image id '{key}' names two images ({by_key[key][0]} and {image}); "
                    "each image needs its own id"
                )
            if isinstance(captions, str):  # one caption given as a string, not a list of one
                captions = [captions]
            by_key[key][1].extend(c for c in captions if isinstance(c, str) and (keep_blank or c.strip()))
        images, ids, texts, txt2img, img2txt = [], [], [], [], []
        skipped = 0
        for key, (image, captions) in by_key.items():
            if not captions:
                skipped += 1
                continue
            img2txt.append(list(range(len(texts), len(texts) + len(captions))))
            txt2img.extend([len(images)] * len(captions))
            texts.extend(captions)
            images.append(image)
            ids.append(key)
        if skipped:
            logger.warning("%s/%s: skipped %d images without a caption in this language", name, lang, skipped)
        return cls(name, lang, images, texts, txt2img, img2txt, ids)


# ------------------------------------------------------------------------------------------------- loaders
def _path(base: str | Path, name: str | Path) -> Path:
    path = Path(name)
    return path if path.is_absolute() else Path(base) / path


def _differ(a: ImageInput, b: ImageInput) -> bool:
    """Whether two image inputs are different images (paths compare by name; anything else by identity)."""
    if isinstance(a, (str, os.PathLike)) and isinstance(b, (str, os.PathLike)):
        return os.fspath(a) != os.fspath(b)
    return a is not b


def read_text_lines(path: Path) -> list[str]:
    """A text file's lines, without a leading UTF-8 byte-order mark; a file that is not UTF-8 is an error naming
    it and the line."""
    if not path.exists():
        raise FileNotFoundError(f"file not found: {path}")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte 0x{data[err.start]:02x})") from None


def _malformed(path: Path, number: int, what: str) -> DataError:
    return DataError(f"{path}: record {number}: {what}")


def caption_files(cfg, lang: str) -> list[Path]:
    """The caption file(s) of one language of a data config, resolved against its root."""
    if lang not in cfg.captions:
        raise DataError(
            f"unknown language '{lang}' for this data set; it has {', '.join(sorted(cfg.captions))}"
        )
    files = cfg.captions[lang]
    files = [files] if isinstance(files, str) else list(files)
    return [_path(cfg.root, f) for f in files]


def load_lines(cfg, lang: str, name: str) -> RetrievalSet:
    image_root = cfg.image_root or cfg.root
    if not cfg.images_file:
        raise ValueError("format 'lines' needs data.images_file (one image path per line)")
    images = [line.strip() for line in read_text_lines(_path(cfg.root, cfg.images_file)) if line.strip()]
    columns = []
    for path in caption_files(cfg, lang):
        lines = read_text_lines(path)
        while lines and not lines[-1].strip():
            lines.pop()
        if len(lines) != len(images):
            raise ValueError(
                f"{path} has {len(lines)} captions for {len(images)} images in {cfg.images_file}"
            )
        columns.append(lines)
    entries = ((_path(image_root, img), img, [col[i] for col in columns]) for i, img in enumerate(images))
    return RetrievalSet.from_entries(name, lang, entries)


def load_json(cfg, lang: str, name: str) -> RetrievalSet:
    image_root = cfg.image_root or cfg.root
    entries = []
    for path in caption_files(cfg, lang):
        items = read_json(path)
        if not isinstance(items, list):
            raise ValueError(f"{path}: expected a JSON list of {{'image', 'caption'}} entries")
        for n, item in enumerate(items):
            if not isinstance(item, dict):
                raise ValueError(f"{path}: entry {n} is not an object with 'image' and 'caption'")
            if "image" not in item or "caption" not in item:
                raise ValueError(f"{path}: entry {n} lacks 'image' or 'caption'")
            if not isinstance(item["image"], str) or not item["image"]:
                raise ValueError(f"{path}: entry {n}: 'image' must be a file name, got {item['image']!r}")
            captions = item["caption"] if isinstance(item["caption"], list) else [item["caption"]]
            entries.append(
                (_path(image_root, item["image"]), str(item.get("image_id", item["image"])), captions)
            )
    return RetrievalSet.from_entries(name, lang, entries)


def _coco_split(image_id: str) -> str:
    for split in ("train2014", "val2014", "test2014", "train2017", "val2017"):
        if split in image_id:
            return split
    return ""


def load_id_tsv(cfg, lang: str, name: str) -> RetrievalSet:
    image_root = cfg.image_root or cfg.root
    captions: dict[str, list[str]] = {}
    for path in caption_files(cfg, lang):
        for n, line in enumerate(read_text_lines(path), 1):
            if not line.strip():
                continue
            if "\t" not in line:
                raise ValueError(f"{path}:{n}: expected 'IMAGE_ID#N<TAB>caption'")
            key, caption = line.split("\t", 1)
            captions.setdefault(key.split("#", 1)[0].strip(), []).append(caption.strip())
    ids = list(captions)
    if cfg.split_file:
        ids = [line.strip() for line in read_text_lines(_path(cfg.root, cfg.split_file)) if line.strip()]
        missing = [i for i in ids if i not in captions]
        if missing:
            logger.warning(
                "%s/%s: %d images of the split have no caption (e.g. %s)",
                name,
                lang,
                len(missing),
                missing[0],
            )
    entries = (
        (
            _path(image_root, cfg.image_template.format(id=i, coco_split=_coco_split(i))),
            i,
            captions.get(i, []),
        )
        for i in ids
    )
    return RetrievalSet.from_entries(name, lang, entries)


def _records(path: Path) -> list[dict]:
    return [record for _, record in read_jsonl(path)]


def _known_languages(records: list[dict], key: str | None, path: Path) -> set[str]:
    langs = set()
    for number, rec in enumerate(records, 1):
        value = rec.get(key) if key else rec
        if not isinstance(value, dict):
            raise _malformed(path, number, f"'{key}' must be an object {{language: captions}}")
        langs.update(value.keys())
    return langs


def _xm3600_file(cfg) -> Path:
    return _path(
        cfg.root, cfg.captions.get("all", ["captions.jsonl"])[0] if cfg.captions else "captions.jsonl"
    )


def _xm3600_languages(records: list[dict]) -> set[str]:
    """The languages of XM3600 records: the keys whose value holds a ``caption`` list (the released file also
    has ``image/key`` and ``image/locale``, which are not languages)."""
    return {
        key
        for record in records
        for key, value in record.items()
        if isinstance(value, dict) and isinstance(value.get("caption"), list)
    }


def load_xm3600(cfg, lang: str, name: str) -> RetrievalSet:
    path = _xm3600_file(cfg)
    records = _records(path)
    langs = _xm3600_languages(records)
    if lang not in langs:
        raise DataError(f"unknown language '{lang}' for XM3600 ({path} has {', '.join(sorted(langs))})")
    image_root = cfg.image_root or _path(cfg.root, "images")
    entries = []
    for number, rec in enumerate(records, 1):
        key, captions = rec.get("image/key"), rec.get(lang, {})
        if not isinstance(key, str) or not key:
            raise _malformed(path, number, f"'image/key' must be an image id, got {key!r}")
        if not isinstance(captions, dict):
            raise _malformed(path, number, f"'{lang}' must be an object with a 'caption' list")
        entries.append((_path(image_root, f"{key}.jpg"), key, captions.get("caption", [])))
    return RetrievalSet.from_entries(name, lang, entries)


def demo_world_files(root: str | Path) -> list[Path]:
    """The retrieval.jsonl files of a held-out folder: its own, or those of its sub-folders."""
    root = Path(root)
    if root.is_file():
        return [root]
    if (root / "retrieval.jsonl").exists():
        return [root / "retrieval.jsonl"]
    files = sorted(root.glob("*/retrieval.jsonl"))
    if not files:
        raise FileNotFoundError(f"no retrieval.jsonl in {root} or its sub-folders")
    return files


def load_demo_world(cfg, lang: str, name: str) -> RetrievalSet:
    found = []
    for path in demo_world_files(cfg.root):
        records = _records(path)
        if lang in _known_languages(records, "captions", path):
            found.append((path, records))
    if not found:
        raise DataError(f"unknown language '{lang}' for {cfg.root} (it has {', '.join(data_languages(cfg))})")
    path, records = found[0]  # every sub-folder holds the same images; the first with this language is used
    image_root = cfg.image_root or path.parent
    entries = []
    for number, rec in enumerate(records, 1):
        if not isinstance(rec.get("image"), str) or rec.get("image_id") is None:
            raise _malformed(path, number, "needs 'image' (a file name) and 'image_id'")
        entries.append((_path(image_root, rec["image"]), str(rec["image_id"]), rec["captions"].get(lang, [])))
    return RetrievalSet.from_entries(name, lang, entries)


LOADERS = {
    "lines": load_lines,
    "json": load_json,
    "id_tsv": load_id_tsv,
    "xm3600": load_xm3600,
    "demo_world": load_demo_world,
}


def available_languages(cfg) -> list[str]:
    """Languages to evaluate: the data config's ``languages`` if given, else every one the data provides."""
    return list(cfg.languages) if cfg.languages else data_languages(cfg)


def data_languages(cfg) -> list[str]:
    """Languages the data provides, whatever ``languages`` asks for."""
    if cfg.format == "demo_world":
        langs: set[str] = set()
        for path in demo_world_files(cfg.root):
            langs |= _known_languages(_records(path), "captions", path)
        return sorted(langs)
    if cfg.format == "xm3600":
        return sorted(_xm3600_languages(_records(_xm3600_file(cfg))))
    if cfg.captions:
        return list(cfg.captions)
    raise ValueError(f"data config of format '{cfg.format}' names no languages; set data.languages")


def load_retrieval_set(cfg, lang: str, name: str = "retrieval") -> RetrievalSet:
    """The test set of one language described by a :class:`RetrievalDataConfig`."""
    fmt = RetrievalFormat(cfg.format)
    if fmt == RetrievalFormat.python:
        module_name, _, fn_name = (cfg.loader or "").partition(":")
        if not module_name or not fn_name:
            raise ValueError("format 'python' needs data.loader: MODULE:FUNCTION")
        loader = getattr(importlib.import_module(module_name), fn_name)
        result = loader(cfg, lang)
    elif fmt in LOADERS:
        result = LOADERS[fmt](cfg, lang, name)
    else:
        raise ValueError(
            f"unknown retrieval data format '{fmt}'; expected one of {sorted(LOADERS)} or python:M:F"
        )
    if not isinstance(result, RetrievalSet):
        raise TypeError(f"loader '{fmt}' returned {type(result).__name__}, not a RetrievalSet")
    if cfg.max_images:
        result = result.subset(range(min(cfg.max_images, len(result.images))))
    return result


def missing_image_files(sets: Iterable[RetrievalSet]) -> list[Path]:
    """Every distinct image file the sets name (paths; bytes and in-memory images need none) that is not there,
    sorted."""
    named = {Path(image) for rset in sets for image in rset.images if isinstance(image, (str, os.PathLike))}
    return sorted(path for path in named if not path.is_file())


def require_image_files(sets: Iterable[RetrievalSet], show: int = MISSING_IMAGES_SHOWN) -> None:
    """Fail before any model is loaded when image files are missing: one error listing the first ``show`` of
    them and how many there are, rather than stopping at the first one mid-evaluation."""
    missing = missing_image_files(sets)
    if missing:
        listed = ", ".join(str(p) for p in missing[:show])
        more = f", ... and {len(missing) - show} more" if len(missing) > show else ""
        raise MissingImageError(
            f"{len(missing)} image file(s) missing: {listed}{more} (the data config names the image folders: "
            "data.image_root, else data.root; IGLUE sets: data.options.image_roots)"
        )


def load_heldout_sets(
    folders: dict[str, str], languages: Sequence[str] = ()
) -> dict[str, list[RetrievalSet]]:
    """The demo-world held-out folders named in ``EvalConfig.datasets`` (name -> folder), one set per language
    (all languages of the folder, or the given ones)."""
    out: dict[str, list[RetrievalSet]] = {}
    for name, folder in folders.items():
        cfg = RetrievalDataConfig(format="demo_world", root=str(folder), languages=list(languages))
        out[name] = [load_retrieval_set(cfg, lang, name) for lang in available_languages(cfg)]
    return out
