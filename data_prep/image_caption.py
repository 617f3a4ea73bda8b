"""Image-caption converters:

* ``image-caption``: a jsonl/tsv/csv table of ``image, caption[, lang]`` rows (image = path relative to
  ``--image-root``, or an id without extension) -- rows of the same image become one sample with all captions;
* ``cclm-jsonl``: CCLM-style jsonl, ``{"binary": base64 | "image": path, "caption": {lang: text} | [..] | text}``;
* ``rekey-wds``: an img2dataset-style WebDataset (``jpg`` + ``txt`` or ``json`` with ``caption``), re-keyed into
  cclm's format with a language code.

Input lines that are not UTF-8 (and ``txt`` captions that are not) are skipped and counted as ``bad_utf8``, with a
warning naming ``file:line`` (or ``shard:member``).
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import json
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from PIL import Image

from cclm.data.examples import visible_text
from cclm.data.images import ORIENTATIONS, decode_error_reason, exif_orientation
from cclm.data.languages import normalize_language
from cclm.data.shards import (
    SKIP_KEY,
    VIEW_IMAGE_CAPTION,
    expand_shards,
    iter_tar_samples,
    read_sizes,
    safe_key,
)
from cclm.data.skips import SkipSample
from cclm.data.transforms import as_rgb
from cclm.jsonl import lone_surrogate
from data_prep.common import (
    MAX_KEY_CHARS,
    SampleKeys,
    SplitWriter,
    add_output_options,
    content_hash,
    csv_rows,
    decode_text,
    jsonl_records,
    require_file,
    text_lines,
)
from data_prep.workers import ordered_map

READ_AHEAD = 1024  # samples read ahead of the writer (see _write_all)
IMAGE_SUFFIXES = ("", ".jpg", ".jpeg", ".png", ".webp", ".JPG", ".JPEG", ".PNG")


# ---------------------------------------------------------------------------------------------------- images
def encode_image(data: bytes, max_side: int, quality: int, upright: bool = True) -> bytes:
    """JPEG bytes of a fully decoded image: a JPEG within ``max_side`` that needs no turning is kept byte for byte,
    anything else is re-encoded: turned upright as its EXIF orientation says (phones store portrait photos
    sideways), wide greyscale scaled to 8 bits (:func:`cclm.data.transforms.as_rgb`). Decoding every byte is
    what finds a truncated or corrupt file (``Image.verify`` reads only the headers, so a JPEG cut in half
    passed it). ``upright=False`` keeps the stored orientation, for annotations drawn on the stored pixels (COCO
    and Visual Genome boxes ignore EXIF)."""
    img = Image.open(io.BytesIO(data))
    turn = ORIENTATIONS.get(exif_orientation(img)) if upright else None
    if img.format == "JPEG" and turn is None and (max_side <= 0 or max(img.size) <= max_side):
        img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))  # every byte, 1/8 of the work
        img.load()
        return data
    img.load()
    img = as_rgb(img)
    if turn is not None:
        img = img.transpose(turn)
    if max_side > 0 and max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BICUBIC
        )
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def resolve_image(root: Path, name: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        path = root / f"{name}{suffix}"
        if path.is_file():
            return path
    return None


def _prepare(item, max_side: int, quality: int):
    """Worker: (key, source, captions, where) -> (key, jpeg bytes | None, captions, skip reason | None, detail);
    ``where`` names the input in a skip's warning (a path names itself)."""
    key, source, captions, where = item
    where = where or str(source)
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as err:
        return key, None, captions, "missing_image", f"{where}: {err.strerror or err}"
    try:
        return key, encode_image(data, max_side, quality), captions, None, ""
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return key, None, captions, "bad_image", f"{where}: {decode_error_reason(err)}"


def _add_caption(
    captions: dict[str, list[str]], lang: str, text, writer: SplitWriter, reasons: list[str]
) -> None:
    code = normalize_language(lang) if isinstance(lang, str) else None
    if code is None:
        reasons.append("unknown_language")
    elif not writer.allowed_language(code):
        reasons.append("filtered_language")
    elif not visible_text(text):
        reasons.append("empty_caption")
    else:
        captions.setdefault(code, []).append(visible_text(text))


def _captions(value, default_lang: str, writer: SplitWriter) -> tuple[dict[str, list[str]], list[str]]:
    """Captions from ``{lang: text | [texts]}``, a list of those, ``[texts]`` or ``text`` (in ``default_lang``),
    and the reasons
    any of them were dropped."""
    captions: dict[str, list[str]] = {}
    reasons: list[str] = []
    parts = value if isinstance(value, list) and any(isinstance(v, dict) for v in value) else [value]
    for part in parts:  # the reference's dumps also hold [{lang: text}, ...]
        for lang, texts in (part if isinstance(part, dict) else {default_lang: part}).items():
            for text in (texts or [None]) if isinstance(texts, list) else [texts]:
                _add_caption(captions, lang, text, writer, reasons)
    return captions, reasons


def _write_all(items: Iterable, writer: SplitWriter, args, desc: str, total: int | None = None) -> int:
    """Encode and write ``items`` (key, image bytes or path, captions, where: what a warning names, or "" for the
    path), read lazily: at most
    :data:`READ_AHEAD` of them are held at once, whatever ``--num-workers`` (a worker pool otherwise reads its
    whole input ahead, which for a CC3M-sized stream of image bytes is the whole corpus in memory)."""
    if total is None and isinstance(items, list):
        total = len(items)
    slots = threading.Semaphore(READ_AHEAD)

    def fed() -> Iterator:
        for item in items:
            slots.acquire()
            yield item

    prepare = functools.partial(_prepare, max_side=args.max_side, quality=args.jpeg_quality)
    for key, jpeg, captions, reason, detail in ordered_map(
        prepare, fed(), args.num_workers, total, not args.no_progress, desc, unit="sample"
    ):
        slots.release()
        if reason:
            writer.skip(reason, detail=detail)
            continue
        meta = {"captions": captions}
        writer.write(
            key,
            {"jpg": jpeg, "json": json.dumps(meta, ensure_ascii=False).encode()},
            list(captions),
            content_hash(jpeg, captions),
        )
    manifests = writer.close()
    print(writer.summary(manifests))
    return 0


# ------------------------------------------------------------------------------------------------- tables
def delimited_rows(path: Path, fmt: str, writer: SplitWriter) -> Iterator[tuple[int, list[str]]]:
    """(line number, cells) of a tsv or csv table. A tsv line is split at its tabs and nothing else: it has no
    quoting (img2dataset's and CC3M's tsv files put quotes in captions as they are), where csv quoting would let
    one unbalanced ``"`` swallow every row up to the next quote. A csv file is read strictly (RFC 4180 quoting),
    and a line it cannot parse (a stray quote, a lone carriage return, a field past the size limit) stops the
    run naming ``file:line``."""
    if fmt == "tsv":
        for number, line in text_lines(path, writer):
            if line.strip():
                yield number, line.rstrip("\r\n").split("\t")
        return
    yield from csv_rows(text_lines(path, writer), path)


def read_table(
    path: Path, fmt: str, default_lang: str, writer: SplitWriter
) -> list[tuple[str, str, str, str]]:
    """Rows (``file:line``, image, caption, lang) from jsonl (keys image/caption/lang) or csv/tsv (header with image
    and caption columns, or positional ``image, caption[, lang]``); a row without a lang (or a lang column) is in
    ``default_lang``. Lines that are not UTF-8 are counted on ``writer``."""
    if fmt == "auto":
        fmt = {".jsonl": "jsonl", ".json": "jsonl", ".tsv": "tsv", ".csv": "csv"}.get(path.suffix.lower(), "")
        if not fmt:
            raise ValueError(f"cannot tell the format of {path}; pass --format jsonl|tsv|csv")
    rows = []
    if fmt == "jsonl":
        return [
            (
                f"{path}:{number}",
                str(obj.get("image", "")),
                obj.get("caption", ""),
                obj.get("lang") or default_lang,
            )
            for number, obj in jsonl_records(path, writer)
        ]
    table = [(number, row) for number, row in delimited_rows(path, fmt, writer) if row]
    if not table:
        return rows
    header = [c.strip().lower() for c in table[0][1]]
    if "image" in header and "caption" in header:
        ii, ci = header.index("image"), header.index("caption")
        li = header.index("lang") if "lang" in header else None
        body = table[1:]
    else:
        ii, ci, li, body = 0, 1, 2, table
    for number, row in body:
        lang = _cell(row, li)
        rows.append(
            (f"{path}:{number}", _cell(row, ii), _cell(row, ci), lang if lang.strip() else default_lang)
        )
    return rows


def _cell(row: list[str], index: int | None) -> str:
    """A row's cell, or "" where the row is too short: a missing caption is an empty one, a missing image name a
    row without an image (both counted skips)."""
    return row[index] if index is not None and index < len(row) else ""


def run_table(args) -> int:
    table = require_file(args.input)
    root = Path(args.image_root)
    if not root.is_dir():
        raise FileNotFoundError(f"--image-root {root} is not a folder")
    with SplitWriter(args, VIEW_IMAGE_CAPTION) as writer:
        return _convert_table(table, root, writer, args)


def _convert_table(table: Path, root: Path, writer: SplitWriter, args) -> int:
    rows = read_table(table, args.format, args.lang, writer)
    if not rows and not writer.skipped:
        raise ValueError(f"{table} has no rows")
    grouped: dict[str, dict[str, list[str]]] = {}
    for where, image, caption, lang in rows:
        if not image:
            writer.skip("missing_image", detail=f"{where}: a row without an image name")
            continue
        reasons: list[str] = []
        captions = grouped.setdefault(image, {})
        _add_caption(captions, lang, caption, writer, reasons)
        for reason in reasons:
            writer.skip(f"caption_{reason.removesuffix('_caption')}")  # a dropped row, not a sample
    items = []
    keys = SampleKeys()
    for image, captions in grouped.items():
        path = resolve_image(root, image)
        if path is None:
            writer.skip("missing_image", detail=f"{table}: no file {image!r} under {root}")
        elif not captions:
            writer.skip("no_caption")
        else:
            items.append((keys(str(Path(image).with_suffix("")), image), str(path), captions, ""))
    return _write_all(items, writer, args, "image-caption")


# ---------------------------------------------------------------------------------------------- cclm jsonl
def _cclm_records(path: Path, writer: SplitWriter) -> Iterator[tuple[int, dict]]:
    """(line number, record) of a CCLM-style dump. Unlike the tables (:func:`data_prep.common.jsonl_records`,
    where a malformed line stops the run, naming it), a malformed line here is one bad record in a large scraped
    file: it is counted as ``bad_json`` and skipped with a warning, like a line that is not UTF-8."""
    for number, line in text_lines(path, writer):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            writer.skip("bad_json", detail=f"{path}:{number}: not a JSON object")
        elif surrogate := lone_surrogate(line, record):
            writer.skip("bad_json", detail=f"{path}:{number}: {surrogate}")
        else:
            yield number, record


_URLSAFE = str.maketrans("-_", "+/")


def _cclm_item(path: Path, number: int, obj: dict, root: Path | None, default_lang: str, writer: SplitWriter):
    """(key, image bytes or path, captions, where) of one CCLM-style record, or None after counting why it is skipped."""
    captions, reasons = _captions(
        obj.get("caption", obj.get("captions")), obj.get("lang") or default_lang, writer
    )
    if not captions:
        writer.skip(reasons[0] if reasons else "no_caption")
        return None
    where = f"{path}:{number}"
    if isinstance(obj.get("binary"), str):
        try:
            source = decode_base64(obj["binary"])
        except (binascii.Error, ValueError) as err:
            writer.skip("bad_image", detail=f"{where}: 'binary' is not base64 ({err})")
            return None
        name = str(obj.get("image_id", obj.get("id", f"line{number:09d}")))
    elif isinstance(obj.get("image"), str):
        image = Path(obj["image"])
        full = image if image.is_absolute() or root is None else root / image
        source, name = str(full), str(obj.get("image_id", image.with_suffix("")))
        where = f"{where}: {full}"
    else:
        writer.skip("missing_image", detail=f"{where}: neither 'binary' nor 'image'")
        return None
    # the line number keeps a key cut short unique
    return safe_key(f"{number:09d}_{name}")[:MAX_KEY_CHARS], source, captions, where


def decode_base64(text: str) -> bytes:
    """Image bytes from standard or URL-safe base64, wrapped over lines (MIME) or not, padded or not; anything
    else fails (``binascii.Error``)."""
    compact = "".join(text.split()).translate(_URLSAFE)
    return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)


def run_cclm_jsonl(args) -> int:
    path = require_file(args.input)
    root = Path(args.image_root) if args.image_root else None
    with SplitWriter(args, VIEW_IMAGE_CAPTION) as writer:
        items = [
            item
            for number, obj in _cclm_records(path, writer)
            if (item := _cclm_item(path, number, obj, root, args.lang, writer)) is not None
        ]
        if not items and not writer.skipped:
            raise ValueError(f"{path} has no rows")
        return _write_all(items, writer, args, "cclm-jsonl")


# ----------------------------------------------------------------------------------------------- re-keying
def run_rekey(
    args,
    join: Callable[[dict], dict[str, list[str]]] | None = None,
    before: Callable[[SplitWriter], None] | None = None,
) -> int:
    """``rekey-wds``. For ``cclm prep uc2``: ``before(writer)`` runs first (reading the translations, counting
    their bad rows on ``writer``), and each sample also gets the captions ``join(its img2dataset json)`` returns,
    or is skipped when ``join`` raises :class:`SkipSample`."""
    urls = expand_shards(args.shards)
    sizes = read_sizes(urls)
    total = sum(sizes.values()) if all(sizes.values()) else None
    keys = SampleKeys()
    with SplitWriter(args, VIEW_IMAGE_CAPTION) as writer:
        if before is not None:
            before(writer)
        items = (
            item for url in urls for item in _rekey_items(url, sizes[url], writer, keys, args.lang, join)
        )
        return _write_all(items, writer, args, getattr(args, "subcommand", "rekey-wds"), total)


def _rekey_items(
    url: str,
    size: int | None,
    writer: SplitWriter,
    keys: SampleKeys,
    default_lang: str,
    join: Callable[[dict], dict[str, list[str]]] | None = None,
) -> Iterator[tuple]:
    """(key, image bytes, captions) of one img2dataset shard's usable samples; the others are counted."""
    base = url.rsplit("/", 1)[-1].removesuffix(".tar")
    for sample in iter_tar_samples(url, size):
        where = f"{url}:{sample['__key__']}"
        if SKIP_KEY in sample:
            writer.skip(sample[SKIP_KEY], detail=sample.get("detail", ""))
            continue
        jpeg = next((sample[e] for e in ("jpg", "jpeg", "png", "webp") if e in sample), None)
        if jpeg is None:
            writer.skip("missing_image", detail=f"{where}: no jpg, jpeg, png or webp member")
            continue
        try:
            meta = json.loads(sample["json"]) if "json" in sample else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = {}
        meta = meta if isinstance(meta, dict) else {}  # a broken json member still leaves the txt caption
        surrogate = lone_surrogate(sample["json"], meta) if "json" in sample else None
        if surrogate:  # img2dataset writes ASCII JSON: half an emoji arrives as a "\ud83d" escape
            if "txt" not in sample:
                writer.skip("bad_json", detail=f"{where}.json: {surrogate}")
                continue
            meta = {}
        if isinstance(meta.get("captions"), dict):
            value = meta["captions"]
        elif "txt" in sample:
            value = decode_text(sample["txt"], f"{where}.txt", writer)
            if value is None:
                continue
        else:
            value = meta.get("caption")
        captions, reasons = _captions(value, meta.get("lang") or default_lang, writer)
        if join is not None:
            try:
                for lang, texts in join(meta).items():
                    captions.setdefault(lang, []).extend(texts)
            except SkipSample as skip:
                writer.skip(skip.reason)
                continue
        if not captions:
            writer.skip(reasons[0] if reasons else "no_caption")
            continue
        yield keys(f"{base}_{sample['__key__']}", f"{url}\0{sample['__key__']}"), jpeg, captions, where


# ------------------------------------------------------------------------------------------------- parsers
def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "image-caption", help="image-caption shards from a jsonl/tsv/csv table + image folder"
    )
    p.add_argument("--input", required=True, help="table: jsonl (image, caption, lang) or tsv/csv")
    p.add_argument("--image-root", required=True, help="folder the image column is relative to")
    p.add_argument("--format", choices=("auto", "jsonl", "tsv", "csv"), default="auto")
    p.add_argument("--lang", default="en", help="language of rows without a lang column (default en)")
    add_output_options(p, images=True)
    p.set_defaults(run=run_table)

    p = subparsers.add_parser(
        "cclm-jsonl", help="image-caption shards from CCLM-style jsonl (base64 or paths)"
    )
    p.add_argument("--input", required=True, help="jsonl with binary|image and caption")
    p.add_argument("--image-root", default="", help="folder relative image paths are under")
    p.add_argument("--lang", default="en", help="language of captions given without one (default en)")
    add_output_options(p, images=True)
    p.set_defaults(run=run_cclm_jsonl)

    p = subparsers.add_parser(
        "rekey-wds", help="re-key an img2dataset WebDataset (jpg + txt/json) with languages"
    )
    p.add_argument("--shards", required=True, help="input shard spec (brace pattern, folder, glob)")
    p.add_argument("--lang", default="en", help="language of the captions (default en)")
    add_output_options(p, images=True)
    p.set_defaults(run=run_rekey)
