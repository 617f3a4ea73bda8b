"""``cclm index`` and ``cclm search``: text search, in any language, over a folder of images.

    cclm index IMAGE_DIR --model MODEL_DIR --out INDEX_DIR [--image-size 384]
    cclm search INDEX_DIR "ein roter Kreis" -k 10 [--rerank] [--html result.html]

The index is a folder: ``index.json`` (the model, the image folder, the indexed files in row order and the files
that could not be read, with the reason) and ``embeddings-NNNNN.safetensors`` shards of normalised image
features. Indexing writes one shard per chunk of files and then updates ``index.json`` atomically, so an
interrupted run resumes where it stopped, and running it again later adds only the new files of the folder.
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
import html
import io
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from cclm.data.images import UnreadableImage, open_image
from cclm.inference.api import CCLM, resolve_model_folder
from cclm.text_safety import printable

log = logging.getLogger("cclm.inference")
INDEX_NAME = "index.json"
INDEX_FORMAT = "cclm-image-index"
SHARD_PATTERN = "embeddings-{:05d}.safetensors"


# ------------------------------------------------------------------------------------------------- the index
@dataclass
class ImageIndex:
    """What ``index.json`` holds. ``paths`` are relative to ``image_dir``, in the row order of the shards."""

    model: str
    image_dir: str
    embed_dim: int
    paths: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    image_size: int = 0  # the resolution the images were embedded at; 0: the model's training resolution

    @classmethod
    def read(cls, folder: Path) -> ImageIndex:
        path = folder / INDEX_NAME
        if not path.exists():
            raise FileNotFoundError(
                f"{printable(folder)} is not a cclm image index ({INDEX_NAME} missing); build one with "
                "`cclm index IMAGE_DIR --model MODEL --out INDEX`"
            )
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != INDEX_FORMAT:
            raise ValueError(
                f"{printable(path)} is not a cclm image index (format {printable(repr(data.get('format')))})"
            )
        return cls(
            data["model"],
            data["image_dir"],
            int(data["embed_dim"]),
            list(data["paths"]),
            list(data["shards"]),
            dict(data["skipped"]),
            int(data.get("image_size", 0)),  # indexes written before the option: the model's resolution
        )

    def write(self, folder: Path) -> None:
        data = {"format": INDEX_FORMAT, "version": 1, **self.__dict__}
        tmp = folder / (INDEX_NAME + ".tmp")
        # A file name that is not UTF-8 reaches us with lone surrogates (os.fsdecode); "backslashreplace" writes
        # them as \udcNN, which in a JSON string is the escape that reads back as the same surrogate.
        tmp.write_text(
            json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8", errors="backslashreplace"
        )
        os.replace(tmp, folder / INDEX_NAME)

    def embeddings(self, folder: Path) -> torch.Tensor:
        parts = [load_file(str(folder / shard))["embeddings"] for shard in self.shards]
        feats = torch.cat(parts) if parts else torch.empty(0, self.embed_dim)
        if feats.shape[0] != len(self.paths):
            raise ValueError(
                f"index {printable(folder)} is inconsistent: {feats.shape[0]} embeddings for {len(self.paths)} "
                "paths; rebuild it"
            )
        return feats


def list_files(image_dir: Path) -> list[str]:
    """Every regular file under ``image_dir`` (recursively), relative, sorted. Whether it is an image is decided
    by decoding it, not by its name."""
    files = [p for p in image_dir.rglob("*") if p.is_file()]
    return sorted(str(p.relative_to(image_dir)) for p in files)


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
        except UnreadableImage as err:
            return rel, None, err.reason
        except OSError as err:  # e.g. removed or unreadable since the folder was listed
            return rel, None, f"{type(err).__name__}: {err.strerror or err}"


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
    ``image_size``: the vision tower's resolution (0: the model's training resolution)."""
    image_dir, out = Path(image_dir).resolve(), Path(out)
    if not image_dir.is_dir():
        raise NotADirectoryError(f"image folder not found: {printable(image_dir)}")
    if image_size < 0:
        raise ValueError(f"--image-size must be positive, or 0 for the model's own; got {image_size}")
    model_path = str(resolve_model_folder(model_dir))  # a folder, a released name or hf-hub:ORG/NAME
    out.mkdir(parents=True, exist_ok=True)
    index = ImageIndex.read(out) if (out / INDEX_NAME).exists() else None
    if index is not None:
        for name, ours, theirs in (
            ("model", model_path, index.model),
            ("image folder", str(image_dir), index.image_dir),
            ("--image-size", str(image_size), str(index.image_size)),
        ):
            if ours != theirs:
                raise ValueError(
                    f"index {printable(out)} was built with {name} {printable(theirs)}, not {printable(ours)}; "
                    "use another --out"
                )
    engine = CCLM.from_pretrained(model_path, device=device, dtype=dtype, image_size=image_size or None)
    if index is None:
        index = ImageIndex(model_path, str(image_dir), int(engine.model.cfg.embed_dim), image_size=image_size)
    done = set(index.paths) | set(index.skipped)
    todo = [p for p in list_files(image_dir) if p not in done]
    report = IndexReport(0, len(index.paths), {}, len(index.skipped))
    loader = torch.utils.data.DataLoader(
        ImageFiles(image_dir, todo, engine.transform),
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


def _flush(
    index: ImageIndex, out: Path, rows: list[str], feats: list[torch.Tensor], report: IndexReport
) -> None:
    """Write one shard, then record it (and the skips so far) in index.json: a crash loses at most one chunk."""
    if rows:
        shard = SHARD_PATTERN.format(len(index.shards))
        save_file({"embeddings": torch.cat(feats).contiguous()}, str(out / shard))
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
    engine = CCLM.from_pretrained(model or index.model, device=device, dtype=dtype, image_size=size or None)
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
    k = min(k, len(index.paths))
    if not rerank:
        scores, rows = cosine.topk(k)
        return [Hit(r + 1, gallery[int(i)], float(s)) for r, (s, i) in enumerate(zip(scores, rows))]
    depth = max(k, min(rerank_k or k, len(index.paths)))
    candidates = [int(i) for i in cosine.topk(depth).indices]
    gone = [i for i in candidates if not gallery[i].is_file()]
    if gone:
        names = ", ".join(printable(index.paths[i]) for i in gone)
        log.warning(
            "%d indexed images are gone from %s and are not re-ranked: %s",
            len(gone),
            printable(image_dir),
            names,
        )
        candidates = [i for i in candidates if i not in gone]
    if not candidates:
        return []
    probs, rows = engine.rerank([query], gallery, torch.tensor([candidates]), k)
    return [
        Hit(r + 1, gallery[int(i)], float(cosine[int(i)]), float(p))
        for r, (p, i) in enumerate(zip(probs[0], rows[0]))
    ]


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
        image = open_image(path)
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
