"""``cclm index`` and ``cclm search``: text search, in any language, over a folder of images.

    cclm index IMAGE_DIR --model MODEL_DIR --out INDEX_DIR [--image-size 384]
    cclm search INDEX_DIR "ein roter Kreis" -k 10 [--rerank] [--html result.html]

The index is a folder: ``index.json`` (the model folder's absolute path and the sha256 of its weights, the image
folder, the indexed files in row order and the files that could not be read, with the reason) and
``embeddings-NNNNN.safetensors`` shards of normalised image features. Indexing writes one shard per chunk of
files and then updates ``index.json`` atomically, so an interrupted run resumes where it stopped, and running it
again later adds only the new files of the folder.
Unreadable files (not an image, truncated, corrupt) are skipped, counted and listed, never retried silently.
The query is read as the model reads text (:class:`cclm.inference.api.CCLM`): through the text normaliser saved
with it (``model.cfg.text.normalize``), so with ``pre_caption`` case and punctuation do not change the hits. Parts
of the query the model's tokenizer does not know (capitals, for a model trained on lower-case text only) are named
in a warning: they reach the model as ``<unk>`` and the hits ignore them.
``--image-size`` runs the vision tower at another resolution than the model was trained at
(:func:`cclm.model.resize.resize_vision`); the index records it, so searching and re-ranking use it too.
File names are printed with their control characters escaped (:func:`cclm.text_safety.printable`): a crafted
name cannot drive the terminal.
"""

from __future__ import annotations

import argparse
import base64
import functools
import html
import io
import json
import logging
import os
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

from cclm.data.images import UnreadableImage, load_upright, open_image
from cclm.errors import DataError, UserError
from cclm.inference.api import CCLM, resolve_model_folder
from cclm.model.fingerprint import weights_digest
from cclm.text_safety import printable
from cclm.weights_files import save_tensors

log = logging.getLogger("cclm.inference")
INDEX_NAME = "index.json"
INDEX_FORMAT = "cclm-image-index"
SHARD_PATTERN = "embeddings-{:05d}.safetensors"
REBUILD = (
    "the index is damaged: build it again into a new folder (cclm index IMAGE_DIR --model MODEL --out INDEX)"
)


class IndexMismatch(UserError, ValueError):
    """A model, image folder or image size other than the one an index was built with."""


# ------------------------------------------------------------------------------------------------- the index
@dataclass
class ImageIndex:
    """What ``index.json`` holds. ``model`` is the model folder's absolute path and ``model_sha256`` the digest of
    its weights (:func:`cclm.model.fingerprint.weights_digest`; empty in indexes written before it was recorded);
    ``paths`` are relative to ``image_dir``, in the row order of the shards."""

    model: str
    image_dir: str
    embed_dim: int
    paths: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    image_size: int = 0  # the resolution the images were embedded at; 0: the model's training resolution
    model_sha256: str = ""

    @classmethod
    def read(cls, folder: Path) -> ImageIndex:
        """The index of ``folder``; DataError naming ``index.json`` when it is damaged."""
        path = folder / INDEX_NAME
        if not path.exists():
            raise FileNotFoundError(
                f"{printable(folder)} is not a cclm image index ({INDEX_NAME} missing); build one with "
                "`cclm index IMAGE_DIR --model MODEL --out INDEX`"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{printable(path)}: not valid JSON ({err}); {REBUILD}") from None
        if not isinstance(data, dict):
            raise DataError(f"{printable(path)}: a JSON {type(data).__name__}, not an object; {REBUILD}")
        if data.get("format") != INDEX_FORMAT:
            found = printable(repr(data.get("format")))
            raise DataError(f"{printable(path)} is not a cclm image index (format {found})")
        fields = {
            "model": str,
            "image_dir": str,
            "embed_dim": int,
            "paths": list,
            "shards": list,
            "skipped": dict,
            "image_size": int,  # indexes written before the option: the model's resolution
            "model_sha256": str,  # indexes written before it was recorded: the path is checked only
        }
        optional = {"image_size": 0, "model_sha256": ""}
        for key, kind in fields.items():
            value = data.get(key, optional.get(key))
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                what = "missing" if value is None else f"a {type(value).__name__}, not a {kind.__name__}"
                raise DataError(f'{printable(path)}: "{key}" is {what}; {REBUILD}')
        for key in ("paths", "shards"):
            odd = next((item for item in data[key] if not isinstance(item, str)), None)
            if odd is not None:
                raise DataError(
                    f'{printable(path)}: "{key}" holds {printable(repr(odd))}, not a file name; {REBUILD}'
                )
        return cls(**{key: data.get(key, optional.get(key)) for key in fields})

    def write(self, folder: Path) -> None:
        data = {"format": INDEX_FORMAT, "version": 1, **self.__dict__}
        tmp = folder / (INDEX_NAME + ".tmp")
        # A file name that is not UTF-8 reaches us with lone surrogates (os.fsdecode); "backslashreplace" writes
        # them as \udcNN, which in a JSON string is the escape that reads back as the same surrogate.
        tmp.write_text(
            json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8", errors="backslashreplace"
        )
        os.replace(tmp, folder / INDEX_NAME)

    def check_shards(self, folder: Path) -> None:
        """Every shard is whole (its header covers the file) and together they hold one row of ``embed_dim`` per
        path, read from the shards' headers only; DataError naming the shard or the index otherwise."""
        rows = 0
        for shard in self.shards:
            path = folder / shard
            try:
                with safe_open(str(path), framework="pt") as handle:
                    shape = handle.get_slice("embeddings").get_shape()
            except (SafetensorError, OSError, KeyError) as err:
                raise DataError(f"{printable(path)}: {_shard_problem(err)}; {REBUILD}") from None
            if len(shape) != 2 or shape[1] != self.embed_dim:
                raise DataError(
                    f"{printable(path)}: embeddings of shape {shape}, not [rows, {self.embed_dim}]; {REBUILD}"
                )
            rows += shape[0]
        self._check_rows(folder, rows)

    def embeddings(self, folder: Path) -> torch.Tensor:
        self.check_shards(folder)
        parts = []
        for shard in self.shards:
            try:
                parts.append(load_file(str(folder / shard))["embeddings"])
            except (SafetensorError, OSError) as err:  # changed since it was checked
                raise DataError(f"{printable(folder / shard)}: {_shard_problem(err)}; {REBUILD}") from None
        feats = torch.cat(parts) if parts else torch.empty(0, self.embed_dim)
        self._check_rows(folder, feats.shape[0])
        return feats

    def _check_rows(self, folder: Path, rows: int) -> None:
        if rows != len(self.paths):
            raise DataError(
                f"index {printable(folder)} is inconsistent: {rows} embeddings for {len(self.paths)} paths; "
                "rebuild it"
            )


def _shard_problem(err: Exception) -> str:
    if isinstance(err, FileNotFoundError):
        return "missing"
    if isinstance(err, KeyError):
        return "holds no 'embeddings' tensor"
    if isinstance(err, OSError):
        return f"cannot be read ({err.strerror or err})"
    return f"damaged or cut short ({err})"


def list_files(image_dir: Path, index_dir: Path | None = None) -> tuple[list[str], dict[str, str]]:
    """Every regular file under ``image_dir`` (recursively, into linked folders too, each real folder once),
    relative, sorted; and what cannot be tried, with the reason: broken links (dangling, or a loop), links to a
    folder already listed, unreadable folders and what is not a regular file (a pipe, a socket). Whether a file
    is an image is decided by decoding it, not by its name. ``index_dir`` (the index's own folder, which may lie
    inside ``image_dir``) is left out."""
    files: list[str] = []
    skipped: dict[str, str] = {}
    seen = {os.path.realpath(image_dir)}
    own = os.path.realpath(index_dir) if index_dir is not None else None

    def relative(path: str) -> str:
        return os.path.relpath(path, image_dir)

    def unreadable_folder(err: OSError) -> None:
        skipped[relative(err.filename)] = f"folder cannot be read ({err.strerror})"

    for root, dirs, names in os.walk(image_dir, onerror=unreadable_folder, followlinks=True):
        for name in sorted(dirs):  # os.walk descends only into what stays in ``dirs``
            path = os.path.join(root, name)
            real = os.path.realpath(path)
            if real == own:
                dirs.remove(name)
                continue
            if real in seen:
                dirs.remove(name)
                skipped[relative(path)] = f"a link to a folder already listed ({real})"
            seen.add(real)
        for name in names:
            path = os.path.join(root, name)
            try:
                mode = os.stat(path).st_mode
            except OSError as err:
                kind = "broken link" if os.path.islink(path) else type(err).__name__
                skipped[relative(path)] = f"{kind}: {err.strerror}"
                continue
            if stat.S_ISREG(mode):
                files.append(relative(path))
            else:
                skipped[relative(path)] = "not a regular file"
    return _one_path_per_file(sorted(files), image_dir, skipped), skipped


def _one_path_per_file(files: list[str], image_dir: Path, skipped: dict[str, str]) -> list[str]:
    """``files`` with each file once: of the paths that reach one file (links to it), the one not through a
    link (else the first); the others are skipped naming it, so that a search never shows one photo twice."""
    by_file: dict[str, list[str]] = {}
    for rel in files:
        by_file.setdefault(os.path.realpath(os.path.join(image_dir, rel)), []).append(rel)
    base, kept = os.path.realpath(image_dir), []
    for real, paths in by_file.items():
        direct = [rel for rel in paths if os.path.join(base, rel) == real]
        keep = (direct or paths)[0]
        kept.append(keep)
        for rel in paths:
            if rel != keep:
                skipped[rel] = f"a link to a file already listed ({keep})"
    return sorted(kept)


class ImageFiles(torch.utils.data.Dataset):
    """Decodes one file: ``(relative path, uint8 tensor or None, error or None)``."""

    def __init__(self, image_dir: Path, paths: Sequence[str], transform):
        self.image_dir, self.paths, self.transform = image_dir, list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        rel = self.paths[i]
        try:
            return rel, self.transform(self.image_dir / rel), None
        except OSError as err:  # not an image, or removed or unreadable since the folder was listed
            return rel, None, why_unreadable(err)


def photo_transform(engine: CCLM):
    """How the search reads a photo: as the model's transform does, turned upright as its EXIF orientation says
    (a phone's portrait photo is stored sideways; the training converters turn such photos upright too)."""
    return functools.partial(load_upright, size=engine.image_size)


def why_unreadable(err: OSError) -> str:
    """The reason an image file could not be used: the decoder's (:class:`UnreadableImage`), or the OS's."""
    if isinstance(err, UnreadableImage):
        return err.reason
    return f"{type(err).__name__}: {err.strerror or err}"


def _keep_items(batch):
    return batch


@dataclass
class IndexReport:
    indexed: int  # new rows this run
    already: int  # rows from earlier runs
    skipped: dict[str, str]  # new unreadable files this run -> reason
    skipped_before: int


def build_index(
    image_dir: str | Path,
    model_dir: str | Path,
    out: str | Path,
    *,
    batch_size: int = 32,
    chunk_size: int = 512,
    num_workers: int = 0,
    device: str | None = None,
    dtype: str = "auto",
    progress: bool | None = None,
    image_size: int = 0,
) -> IndexReport:
    """Embed every readable image under ``image_dir`` into the index folder ``out`` (created or resumed).
    ``image_size``: the vision tower's resolution (0: the model's training resolution). The index records the
    model folder's absolute path and the digest of its weights; resuming with other weights, another folder or
    size, or over a damaged shard is refused."""
    image_dir, out = Path(image_dir).resolve(), Path(out)
    if not image_dir.is_dir():
        raise NotADirectoryError(f"image folder not found: {printable(image_dir)}")
    if image_size < 0:
        raise ValueError(f"--image-size must be positive, or 0 for the model's own; got {image_size}")
    model_path = resolve_model_folder(model_dir)  # a folder, a released name or hf-hub:ORG/NAME; absolute
    fingerprint = weights_digest(model_path)
    out.mkdir(parents=True, exist_ok=True)
    index = ImageIndex.read(out) if (out / INDEX_NAME).exists() else None
    if index is not None:
        _check_resumable(index, out, model_path, fingerprint, image_dir, image_size)
    engine = CCLM.from_pretrained(model_path, device=device, dtype=dtype, image_size=image_size or None)
    if index is None:
        embed_dim = int(engine.model.cfg.embed_dim)
        index = ImageIndex(
            str(model_path), str(image_dir), embed_dim, image_size=image_size, model_sha256=fingerprint
        )
    done = set(index.paths) | set(index.skipped)
    files, untried = list_files(image_dir, out)
    todo = [p for p in files if p not in done]
    report = IndexReport(0, len(index.paths), {}, len(index.skipped))
    for rel, reason in untried.items():  # recorded with the first shard (or at the end)
        if rel not in done:
            report.skipped[rel] = index.skipped[rel] = reason
    loader = torch.utils.data.DataLoader(
        ImageFiles(image_dir, todo, photo_transform(engine)),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_keep_items,
    )
    show = len(todo) > 4 * batch_size if progress is None else progress
    rows: list[str] = []
    feats: list[torch.Tensor] = []
    with tqdm(total=len(todo), desc="indexing", unit="file", disable=not show) as bar, torch.inference_mode():
        for batch in loader:
            good = [(rel, pixels) for rel, pixels, _ in batch if pixels is not None]
            for rel, _, error in batch:
                if error is not None:
                    report.skipped[rel] = error
                    index.skipped[rel] = error
            if good:
                pixels = torch.stack([p for _, p in good]).to(engine.device)
                feats.append(engine.model.encode_image(pixels)[1].float().cpu())
                rows += [rel for rel, _ in good]
            bar.update(len(batch))
            if len(rows) >= chunk_size:
                _flush(index, out, rows, feats, report)
                rows, feats = [], []
        _flush(index, out, rows, feats, report)
    return report


def _check_resumable(
    index: ImageIndex, out: Path, model_path: Path, fingerprint: str, image_dir: Path, image_size: int
) -> None:
    """Resuming ``index`` is refused with another model (other weights; an index without a digest: another
    path), image folder or size, and over a damaged shard."""
    if index.model_sha256:
        _check_same_weights(index, out, model_path, fingerprint)
        if not Path(index.model).is_dir():  # moved: the same weights, found elsewhere
            index.model = str(model_path)
    elif os.path.abspath(index.model) != str(model_path):
        raise IndexMismatch(
            f"index {printable(out)} was built with model {printable(index.model)}, not {printable(model_path)}; "
            "use another --out"
        )
    for name, ours, theirs in (
        ("image folder", str(image_dir), index.image_dir),
        ("--image-size", str(image_size), str(index.image_size)),
    ):
        if ours != theirs:
            raise IndexMismatch(
                f"index {printable(out)} was built with {name} {printable(theirs)}, not {printable(ours)}; "
                "use another --out"
            )
    index.check_shards(out)


def _check_same_weights(index: ImageIndex, index_dir: Path, model_path: Path, fingerprint: str) -> None:
    if fingerprint != index.model_sha256:
        raise IndexMismatch(
            f"index {printable(index_dir)} was built with the model {printable(index.model)} (weights sha256 "
            f"{index.model_sha256[:12]}), not {printable(model_path)} (weights sha256 {fingerprint[:12]}): "
            "use the index's model, or index into another --out"
        )


def _flush(
    index: ImageIndex, out: Path, rows: list[str], feats: list[torch.Tensor], report: IndexReport
) -> None:
    """Write one shard, then record it (and the skips so far) in index.json: a crash loses at most one chunk."""
    if rows:
        shard = SHARD_PATTERN.format(len(index.shards))
        save_tensors({"embeddings": torch.cat(feats).contiguous()}, out / shard)
        index.shards.append(shard)
        index.paths += rows
        report.indexed += len(rows)
    index.write(out)


# ------------------------------------------------------------------------------------------------- search
@dataclass
class Hit:
    rank: int
    path: Path
    score: float  # cosine similarity of the ITC features
    match: float | None = None  # ITM probability when re-ranked


def search_index(
    index_dir: str | Path,
    query: str,
    k: int = 10,
    rerank: bool = False,
    rerank_k: int | None = None,
    model: str | Path | None = None,
    device: str | None = None,
    dtype: str = "auto",
    image_size: int = 0,
) -> list[Hit]:
    """The top ``k`` images of the index for ``query`` by cosine similarity, or (``rerank``) its top
    ``rerank_k`` re-scored by the ITM head. ``image_size``: the resolution re-ranking decodes the candidates at
    (0: the one the index was built at)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    index_dir = Path(index_dir)
    index = ImageIndex.read(index_dir)
    feats = index.embeddings(index_dir)
    if not index.paths:
        return []
    if image_size < 0:
        raise ValueError(f"--image-size must be positive, or 0 for the index's own; got {image_size}")
    size = image_size or index.image_size
    model_path = _search_model(index, index_dir, model)
    engine = CCLM.from_pretrained(model_path, device=device, dtype=dtype, image_size=size or None)
    unknown = unknown_pieces(engine, query)
    if unknown:
        log.warning(
            "the model's tokenizer does not know %s of the query (they reach the model as %s and do not count "
            "in the ranking)%s",
            ", ".join(repr(printable(piece)) for piece in unknown),
            engine.tokenizer.unk_token,
            "; it was trained on lower-case text: try the query in lower case"
            if _lowercase_helps(engine, query)
            else "",
        )
    if engine.model.cfg.embed_dim != index.embed_dim:
        raise ValueError(
            f"model embed_dim {engine.model.cfg.embed_dim} does not match the index ({index.embed_dim})"
        )
    image_dir = Path(index.image_dir)
    gallery = [image_dir / path for path in index.paths]  # paths only: re-ranking decodes just the candidates
    cosine = (engine.encode_texts([query]) @ feats.t())[0]
    order = cosine.argsort(descending=True, stable=True).tolist()
    k = min(k, len(index.paths))
    if not rerank:
        rows = _one_row_per_file(order, gallery, k)
        return [Hit(r + 1, gallery[i], float(cosine[i])) for r, i in enumerate(rows)]
    depth = max(k, min(rerank_k or k, len(index.paths)))
    candidates, pixels = _decode_candidates(engine, index, _one_row_per_file(order, gallery, depth))
    if not candidates:
        return []
    probs, rows = engine.rerank([query], pixels, torch.arange(len(candidates))[None], k)
    return [
        Hit(r + 1, gallery[candidates[int(i)]], float(cosine[candidates[int(i)]]), float(p))
        for r, (p, i) in enumerate(zip(probs[0], rows[0]))
    ]


def _one_row_per_file(order: list[int], gallery: list[Path], count: int) -> list[int]:
    """The first ``count`` rows of ``order`` that are distinct files: an index built before links to one photo
    were listed once (or resumed since) may hold a photo under two paths, and would show it twice."""
    seen: set[str] = set()
    rows = []
    for row in order:
        real = os.path.realpath(gallery[row])
        if real not in seen:
            seen.add(real)
            rows.append(row)
            if len(rows) == count:
                break
    return rows


def _search_model(index: ImageIndex, index_dir: Path, model: str | Path | None) -> Path:
    """The model folder a search uses: ``model`` (a folder, released name or hf-hub:ORG/NAME) when given, else
    the index's. Its weights must be the ones the index was built with; an index that records no digest (written
    before cclm recorded one) is searched with ``model`` after a warning that this cannot be checked."""
    if model is None and not Path(index.model).is_dir():
        raise FileNotFoundError(
            f"the model index {printable(index_dir)} was built with, {printable(index.model)}, is not there (moved "
            "or deleted?); pass --model with the same weights"
        )
    folder = resolve_model_folder(index.model if model is None else model)
    if index.model_sha256:
        _check_same_weights(index, index_dir, folder, weights_digest(folder))
    elif model is not None and str(folder) != os.path.abspath(index.model):
        log.warning(
            "index %s records no digest of its model's weights (it was built before cclm recorded one): cannot "
            "check that %s is the model it was built with (%s)",
            printable(index_dir),
            printable(folder),
            printable(index.model),
        )
    return folder


def _decode_candidates(
    engine: CCLM, index: ImageIndex, rows: list[int]
) -> tuple[list[int], list[torch.Tensor]]:
    """The rows of ``rows`` whose image still decodes, and its pixels; the others (deleted, or damaged since they
    were indexed) are named in a warning and not re-ranked."""
    kept, pixels, failed = [], [], []
    for row in rows:
        try:
            pixels.append(photo_transform(engine)(Path(index.image_dir) / index.paths[row]))
            kept.append(row)
        except OSError as err:  # deleted, or no longer a decodable image (UnreadableImage)
            failed.append(f"{printable(index.paths[row])} ({printable(why_unreadable(err))})")
    if failed:
        log.warning(
            "%d indexed images in %s cannot be read any more and are not re-ranked: %s",
            len(failed),
            printable(index.image_dir),
            ", ".join(failed),
        )
    return kept, pixels


def unknown_pieces(engine: CCLM, query: str) -> list[str]:
    """The distinct parts of ``query`` (after the model's normaliser) that its tokenizer reads as unknown."""
    tokenizer = engine.tokenizer
    if tokenizer.unk_token_id is None or not getattr(tokenizer, "is_fast", False):
        return []
    text = engine.normalize(query)
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    pieces = [
        text[start:end].strip()
        for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"])
        if token == tokenizer.unk_token_id
    ]
    return list(dict.fromkeys(piece for piece in pieces if piece))


def _lowercase_helps(engine: CCLM, query: str) -> bool:
    return query != query.lower() and not unknown_pieces(engine, query.lower())


def thumbnail_data_uri(path: Path, size: int = 192) -> str | None:
    """A JPEG thumbnail as a ``data:`` URI, so the page needs no other file; None if the image is unreadable."""
    try:
        image = open_image(path, upright=True)
    except (ValueError, OSError):
        return None
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


PAGE_STYLE = """
body { font-family: sans-serif; background: #f4f4f4; color: #222; margin: 24px; }
h1 { font-size: 20px; font-weight: normal; } h1 q { font-weight: bold; }
.grid { display: flex; flex-wrap: wrap; gap: 16px; }
figure { margin: 0; width: 200px; background: #fff; padding: 8px; box-shadow: 0 1px 3px #bbb; }
figure img { display: block; width: 192px; height: 192px; object-fit: contain; background: #fff; }
.missing { display: flex; width: 192px; height: 192px; align-items: center; justify-content: center; color: #900; }
figcaption { font-size: 12px; margin-top: 6px; word-break: break-all; }
"""


def _html_text(text) -> str:
    """Text for the page: control characters (and the undecodable bytes of a file name, which could not even be
    written as UTF-8) shown as escapes, then HTML-escaped."""
    return html.escape(printable(text))


def render_html(query: str, hits: list[Hit], thumb_size: int = 192) -> str:
    """A self-contained page: the query, and each hit's thumbnail (embedded), rank, scores and path."""
    cards = []
    for hit in hits:
        uri = thumbnail_data_uri(hit.path, thumb_size)
        picture = (
            f'<a href="{html.escape(hit.path.as_uri())}"><img src="{uri}" alt="{_html_text(hit.path.name)}"></a>'
            if uri
            else '<div class="missing">image unreadable</div>'
        )
        scores = f"cosine {hit.score:.3f}" + (
            f" &middot; match {hit.match:.3f}" if hit.match is not None else ""
        )
        cards.append(
            f"<figure>{picture}<figcaption><b>#{hit.rank}</b> {scores}<br>{_html_text(hit.path)}"
            "</figcaption></figure>"
        )
    body = "\n".join(cards) if cards else "<p>No images in the index.</p>"
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>cclm search: {_html_text(query)}</title>'
        f"<style>{PAGE_STYLE}</style></head>\n<body><h1>Top {len(hits)} for <q>{_html_text(query)}</q></h1>\n"
        f'<div class="grid">\n{body}\n</div></body></html>\n'
    )


# ---------------------------------------------------------------------------------------------------- CLI
def _index_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cclm index",
        description="Embed a folder of images into a search index "
        "(resumable; unreadable files are skipped and listed).",
    )
    p.add_argument("image_dir")
    p.add_argument("--model", dest="model_dir", required=True, help="a save_pretrained model folder")
    p.add_argument("--out", required=True, help="index folder (created, or resumed when it exists)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=512, help="images per shard (the unit of resumption)")
    p.add_argument("--num-workers", type=int, default=2, help="image decoding processes")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto", help="auto (bf16 on a GPU that supports it), fp32, bf16, fp16")
    p.add_argument(
        "--image-size",
        type=int,
        default=0,
        help="embed the images at this resolution (0: the model's training resolution; the tower is resized)",
    )
    return p


def _search_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cclm search", description="Search an image index with a text query in any language."
    )
    p.add_argument("index_dir", metavar="index")
    p.add_argument("query")
    p.add_argument("-k", type=int, default=10, help="number of results")
    p.add_argument("--rerank", action="store_true", help="re-score the top candidates with the ITM head")
    p.add_argument(
        "--rerank-k", type=int, default=None, help="candidates re-scored with --rerank (default k)"
    )
    p.add_argument("--html", default=None, help="also write a static page of thumbnails to this file")
    p.add_argument("--model", default=None, help="model folder (default: the one the index was built with)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument(
        "--image-size",
        type=int,
        default=0,
        help="resolution --rerank decodes the candidates at (0: the one the index was built at)",
    )
    return p


def check_search_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Numbers that would give an empty table, a traceback, or be silently ignored: refused (exit status 2)."""
    if args.k < 1:
        parser.error(f"-k must be at least 1, got {args.k}")
    if args.rerank_k is not None and not args.rerank:
        parser.error(
            "--rerank-k sets how many candidates --rerank re-scores: add --rerank, or drop --rerank-k"
        )
    if args.rerank_k is not None and args.rerank_k < args.k:
        parser.error(
            f"--rerank-k {args.rerank_k} is smaller than -k {args.k}: re-rank at least the k results"
        )


def run_index(args: argparse.Namespace) -> int:
    report = build_index(**vars(args))  # the parser's destinations are build_index's parameters
    total = report.indexed + report.already
    print(f"indexed {report.indexed} new images ({total} in the index) -> {printable(args.out)}")
    if report.skipped:
        print(f"skipped {len(report.skipped)} unreadable files:", file=sys.stderr)
        for rel, reason in sorted(report.skipped.items()):
            print(f"  {printable(rel)}: {printable(reason)}", file=sys.stderr)
    if report.skipped_before:
        print(
            f"({report.skipped_before} unreadable files from earlier runs are listed in "
            f"{printable(Path(args.out) / INDEX_NAME)})",
            file=sys.stderr,
        )
    return 0


def run_search(args: argparse.Namespace) -> int:
    options = vars(args)
    html_file = options.pop("html")
    hits = search_index(**options)  # the other destinations are search_index's parameters
    header = f"{'rank':>4}  {'cosine':>7}" + (f"  {'match':>6}" if args.rerank else "") + "  path"
    print(header)
    for hit in hits:
        match = f"  {hit.match:6.3f}" if hit.match is not None else ""
        print(f"{hit.rank:>4}  {hit.score:7.3f}{match}  {printable(hit.path)}")
    if html_file:
        Path(html_file).write_text(render_html(args.query, hits), encoding="utf-8")
        print(f"wrote {printable(html_file)}")
    return 0


def main(argv: list[str]) -> int:
    command, rest = argv[0], argv[1:]
    if command == "index":
        return run_index(_index_parser().parse_args(rest))
    if command == "search":
        parser = _search_parser()
        args = parser.parse_args(rest)
        check_search_args(parser, args)
        return run_search(args)
    raise SystemExit(
        f"cclm.inference.search: unknown command '{printable(command)}' (expected index or search)"
    )
