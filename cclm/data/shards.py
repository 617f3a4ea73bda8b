"""The shard format, and reading/writing it.

Both views are WebDataset tar shards (``{prefix}-{index:06d}.tar``) in one folder together with

* ``sizes.json``: ``{"<shard file name>": samples}`` (the convention open_clip reads too);
* ``manifest.json``: ``{"view", "languages": {lang: count}, "samples", "shards", "files", "skipped", "command",
  "created", "id", ...}`` (``files``: the shard file names, in order; ``id``: random, one per write; parallel
  text also ``"language_pairs": {src: {tgt: count}}``).

Writing is atomic (:class:`ShardSink`): shards and index files are written under ``*.partial`` names and renamed
into place only when the conversion succeeds, ``manifest.json`` last. A shard that no ``manifest.json`` beside it
lists (:func:`unlisted_shards`) therefore comes from an interrupted conversion or a partial copy.

Samples (one tar member per extension, sharing the key; keys never contain dots):

* image-caption: ``{key}.jpg`` (or png/webp) + ``{key}.json`` =
  ``{"captions": {"en": "...", "de": ["...", "..."]}, ...}`` -- one or many captions in one or many languages;
* parallel text: ``{key}.json`` = ``{"src": "...", "tgt": "...", "src_lang": "en", "tgt_lang": "de"}``.

Reading is a plain stream (local files, ``pipe:`` commands, ``http(s)://`` through webdataset's ``gopen``, other
``scheme://`` URLs through fsspec), so shards need not be local. A shard that ends early (truncated download,
corrupt member) yields the samples before the damage and then one *tombstone* per missing sample (known from
``sizes.json``), so the pipeline can count the loss exactly instead of silently dropping it.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import logging
import os
import re
import shlex
import sys
import tarfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import braceexpand

from cclm.errors import DataError

log = logging.getLogger("cclm.data")
SIZES_NAME = "sizes.json"
MANIFEST_NAME = "manifest.json"
VIEW_IMAGE_CAPTION = "image_caption"
VIEW_PARALLEL = "parallel_text"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SKIP_KEY = "__skip__"
FORMAT_VERSION = 1
PARTIAL_SUFFIX = ".partial"  # files being written: no shard pattern (``*.tar``) matches them
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


# --------------------------------------------------------------------------------------------------- writing
def safe_key(text: str) -> str:
    """A sample key webdataset can group by: no dots, slashes or spaces (they are replaced by ``_``)."""
    key = _KEY_UNSAFE.sub("_", text)
    if not key:
        raise ValueError(f"cannot make a sample key from {text!r}")
    return key


class ShardSink:
    """Writes samples to ``{out_dir}/{prefix}-NNNNNN.tar``, starting a new shard at ``max_samples`` samples or
    ``max_bytes`` bytes, and on :meth:`close` writes ``sizes.json`` and ``manifest.json``.

    Nothing is published before :meth:`close`: shards and index files are written as ``NAME.partial`` and renamed
    into place at the end, ``manifest.json`` last. A sink that leaves its ``with`` block unclosed (an exception)
    or is :meth:`abort`-ed deletes its temporaries; a killed process leaves only ``*.partial`` files, which the
    next sink in the folder removes. A folder that holds shards (``*.tar``, any prefix), ``sizes.json`` or
    ``manifest.json`` already is refused: one folder holds one conversion."""

    def __init__(
        self,
        out_dir: str | Path,
        view: str,
        prefix: str = "shard",
        max_samples: int = 10000,
        max_bytes: int = 1 << 30,
        command: str | None = None,
    ):
        if view not in (VIEW_IMAGE_CAPTION, VIEW_PARALLEL):
            raise ValueError(f"unknown view {view!r}")
        if max_samples < 1 or max_bytes < 1:
            raise ValueError("shard limits must be positive")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # Any other conversion's output, whatever its prefix: this sink's sizes.json and manifest.json would
        # replace that conversion's, and readers of the folder would take its shards for this one's.
        shards = sorted(p.name for p in self.out_dir.glob("*.tar"))
        index = [name for name in (MANIFEST_NAME, SIZES_NAME) if (self.out_dir / name).exists()]
        if shards or index:
            held = [*shards[:3], *(["..."] if len(shards) > 3 else []), *index]
            raise FileExistsError(
                f"{self.out_dir} already holds another conversion's output ({', '.join(held)}); "
                "write into a new folder"
            )
        for leftover in self.out_dir.glob(f"{prefix}-*.tar{PARTIAL_SUFFIX}"):
            leftover.unlink()  # an interrupted conversion's temporaries
        self.view, self.prefix = view, prefix
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.command = command if command is not None else " ".join(shlex.quote(a) for a in sys.argv)
        self.sizes: dict[str, int] = {}
        self.languages: Counter[str] = Counter()
        self.pairs: Counter[tuple[str, str]] = Counter()  # parallel text: (source, target) languages
        self.skipped: Counter[str] = Counter()
        self._tar: tarfile.TarFile | None = None
        self._name = ""
        self._bytes = 0
        self._keys: set[str] = set()
        self._manifest: dict | None = None  # set once published

    def _partial(self, name: str) -> Path:
        return self.out_dir / f"{name}{PARTIAL_SUFFIX}"

    def _open_next(self) -> None:
        self._close_current()
        self._name = f"{self.prefix}-{len(self.sizes):06d}.tar"
        self._tar = tarfile.open(self._partial(self._name), "w", format=tarfile.USTAR_FORMAT)
        self.sizes[self._name] = 0
        self._bytes = 0

    def _close_current(self) -> None:
        tar, self._tar = self._tar, None
        if tar is not None:
            tar.close()

    def write(self, key: str, members: dict[str, bytes], languages: list[str] | tuple[str, ...] = ()) -> None:
        """Write one sample: ``members`` maps extension (``"jpg"``, ``"json"``) to bytes."""
        if key != safe_key(key):
            raise ValueError(f"sample key {key!r} must not contain dots, slashes or spaces (see safe_key)")
        if key.startswith("__"):
            raise ValueError(f"sample key {key!r} must not start with '__' (readers skip such members)")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        self._keys.add(key)
        size = sum(len(v) for v in members.values())
        if (
            self._tar is None
            or self.sizes[self._name] >= self.max_samples
            or (self.sizes[self._name] > 0 and self._bytes + size > self.max_bytes)
        ):
            self._open_next()
        assert self._tar is not None
        now = time.time()
        for ext, data in members.items():
            if not isinstance(data, bytes):
                raise TypeError(f"member {key}.{ext} must be bytes, got {type(data).__name__}")
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), now, 0o444
            self._tar.addfile(info, io.BytesIO(data))
        self._bytes += size
        self.sizes[self._name] += 1
        self.languages.update(languages)
        if self.view == VIEW_PARALLEL and len(languages) == 2:
            self.pairs[tuple(languages)] += 1

    def skip(self, reason: str, n: int = 1) -> None:
        """Record input rows that were not written (reported in the manifest)."""
        self.skipped[reason] += n

    @property
    def count(self) -> int:
        return sum(self.sizes.values())

    def close(self, extra: dict | None = None) -> dict:
        """Finish the last shard and publish the shards, ``sizes.json`` and ``manifest.json``."""
        if self._manifest is not None:
            return self._manifest
        self._close_current()
        manifest = {
            "format_version": FORMAT_VERSION,
            "view": self.view,
            "samples": self.count,
            "shards": len(self.sizes),
            "files": list(self.sizes),
            "languages": dict(sorted(self.languages.items())),
            **({"language_pairs": self._pair_counts()} if self.view == VIEW_PARALLEL else {}),
            "skipped": dict(sorted(self.skipped.items())),
            "command": self.command,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "id": uuid.uuid4().hex,  # this write's identity: a resumed training run checks it is reading the same
            **(extra or {}),
        }
        self._partial(SIZES_NAME).write_text(json.dumps(self.sizes, indent=1))
        self._partial(MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
        # Everything is on disk before the first rename, and the manifest that vouches for the shards comes last.
        for name in [*self.sizes, SIZES_NAME, MANIFEST_NAME]:
            os.replace(self._partial(name), self.out_dir / name)
        self._manifest = manifest
        return manifest

    def _pair_counts(self) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = {}
        for (src, tgt), n in sorted(self.pairs.items()):
            counts.setdefault(src, {})[tgt] = n
        return counts

    def abort(self) -> None:
        """Delete everything written so far (nothing of an unpublished sink is visible to readers)."""
        if self._manifest is not None:
            return
        with contextlib.suppress(OSError, tarfile.TarError):  # e.g. the disk filled up: remove what is there
            self._close_current()
        for name in [*self.sizes, SIZES_NAME, MANIFEST_NAME]:
            self._partial(name).unlink(missing_ok=True)

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, *exc) -> None:
        self.abort()


# --------------------------------------------------------------------------------------------- shard lists
def is_remote(url: str) -> bool:
    """A ``pipe:`` command or a URL (read as a stream, with no folder beside it to look in)."""
    return url.startswith("pipe:") or "://" in url


def expand_shards(spec: str | list[str], key: str = "shards", warn: bool = True) -> list[str]:
    """Shard URLs from a spec: patterns joined by ``::`` (or a list), each brace-expanded
    (``data/shard-{000000..000099}.tar``); local entries may also be globs or a folder (all ``*.tar`` in it). A
    path that exists as given is read as given, even when it holds glob characters (``run[1]/shard-000000.tar``).
    A shard listed more than once (overlapping patterns, two spellings of one path) is read once, with a warning
    naming it under ``key`` (``warn=False``: silently, where the stream that reads them warns). Raises a clear error
    for an empty spec or a local pattern that matches no file."""
    parts = spec if isinstance(spec, (list, tuple)) else str(spec).split("::")
    parts = [p.strip() for p in parts if p and p.strip()]
    if not parts:
        raise ValueError("empty shard specification")
    urls: list[str] = []
    for part in parts:
        for url in braceexpand.braceexpand(part):
            urls.extend(_expand_one(url, part))
    return _drop_duplicates(urls, key, warn)


def _expand_one(url: str, part: str) -> list[str]:
    if is_remote(url):
        return [url]
    path = Path(os.path.expanduser(url))
    if path.is_dir():
        found = sorted(str(p) for p in path.glob("*.tar"))
        if not found:
            raise FileNotFoundError(f"shard folder {path} contains no .tar files")
        return found
    if path.exists():
        return [str(path)]
    if any(c in url for c in "*?["):
        found = sorted(glob.glob(os.path.expanduser(url)))
        if not found:
            raise FileNotFoundError(f"shard pattern {url!r} matches no file")
        return found
    raise FileNotFoundError(f"shard {url!r} does not exist (from pattern {part!r})")


def _drop_duplicates(urls: list[str], key: str, warn: bool = True) -> list[str]:
    """``urls`` with every shard kept once, at its first place: local files compare by their real path, so a
    shard reached through two spellings (``data/x.tar``, ``./data/x.tar``, a symlink) is one shard."""
    seen: set[str] = set()
    kept, repeated = [], []
    for url in urls:
        identity = url if is_remote(url) else os.path.realpath(url)
        if identity in seen:
            repeated.append(url)
        else:
            seen.add(identity)
            kept.append(url)
    if repeated and warn:
        named = ", ".join(repeated[:5]) + (f" and {len(repeated) - 5} more" if len(repeated) > 5 else "")
        log.warning(
            "%s: %d shard(s) listed more than once (overlapping patterns?) are read once per epoch: %s",
            key,
            len(repeated),
            named,
        )
    return kept


def read_sizes(urls: list[str]) -> dict[str, int | None]:
    """Samples per shard from the ``sizes.json`` next to each local shard; ``None`` where unknown."""
    cache: dict[Path, dict] = {}
    sizes: dict[str, int | None] = {}
    for url in urls:
        if is_remote(url):
            sizes[url] = None
            continue
        folder = Path(url).parent
        if folder not in cache:
            cache[folder] = _sizes_file(folder / SIZES_NAME)
        value = cache[folder].get(Path(url).name)
        sizes[url] = value
    return sizes


def _sizes_file(path: Path) -> dict[str, int]:
    """A folder's ``sizes.json`` (shard name -> samples); none is ``{}``. A damaged one fails naming it: its
    counts are what tells a truncated shard from a short one."""
    if not path.exists():
        return {}
    try:
        sizes = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise DataError(f"{path}: damaged ({err}); convert the shards again, or delete it") from None
    if not isinstance(sizes, dict) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in sizes.values()
    ):
        raise DataError(
            f"{path}: expected {{shard name: sample count}}; convert the shards again, or delete it"
        )
    return sizes


def _listed_names(folder: Path) -> set[str]:
    """The shard file names the folder's ``manifest.json`` lists; none without a readable manifest. (Manifests
    from before they listed ``files`` vouch for the ``sizes.json`` published with them.)"""
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
        files = manifest["files"] if "files" in manifest else json.loads((folder / SIZES_NAME).read_text())
        return {str(name) for name in files}
    except (OSError, ValueError, TypeError):
        return set()


def unlisted_shards(urls: list[str]) -> list[str]:
    """The local shards among ``urls`` that no ``manifest.json`` beside them lists. Remote shards (``pipe:``,
    URLs) have no folder to look in and are never returned."""
    listed: dict[Path, set[str]] = {}
    unlisted = []
    for url in urls:
        if is_remote(url):
            continue
        path = Path(os.path.expanduser(url))
        if path.parent not in listed:
            listed[path.parent] = _listed_names(path.parent)
        if path.name not in listed[path.parent]:
            unlisted.append(url)
    return unlisted


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {folder} a cclm shard folder?")
    return json.loads(path.read_text())


def shard_manifests(urls: list[str]) -> dict[str, dict | None]:
    """The ``manifest.json`` of every local folder holding ``urls`` (folder -> manifest; None where a folder has
    none, or an unreadable one). Remote shards have no folder and are left out."""
    folders = sorted({str(Path(os.path.expanduser(url)).parent) for url in urls if not is_remote(url)})
    manifests: dict[str, dict | None] = {}
    for folder in folders:
        try:
            manifest = read_manifest(folder)
        except (FileNotFoundError, ValueError):
            manifest = None
        manifests[folder] = manifest if isinstance(manifest, dict) else None
    return manifests


def _all_manifests(urls: list[str]) -> list[dict] | None:
    """Every folder's manifest, or None when one is missing or the shards are remote (nothing to check)."""
    if not urls or any(is_remote(url) for url in urls):
        return None
    manifests = list(shard_manifests(urls).values())
    return None if any(m is None for m in manifests) else manifests


def manifest_languages(urls: list[str]) -> dict[str, int] | None:
    """Per-language sample counts from the ``manifest.json`` of every local folder holding ``urls`` (None when
    a folder has none, or the shards are remote: nothing to check against)."""
    manifests = _all_manifests(urls)
    if manifests is None:
        return None
    counts: dict[str, int] = {}
    for manifest in manifests:
        for lang, n in (manifest.get("languages") or {}).items():
            counts[lang] = counts.get(lang, 0) + int(n)
    return counts


def manifest_language_pairs(urls: list[str]) -> dict[tuple[str, str], int] | None:
    """Parallel-text pairs per (source, target) language from the manifests of the folders holding ``urls``; None
    when a folder's manifest does not count them (written before manifests did, or by another tool)."""
    manifests = _all_manifests(urls)
    if manifests is None or not all(isinstance(m.get("language_pairs"), dict) for m in manifests):
        return None
    counts: dict[tuple[str, str], int] = {}
    for manifest in manifests:
        for src, targets in manifest["language_pairs"].items():
            for tgt, n in (targets if isinstance(targets, dict) else {}).items():
                counts[(src, tgt)] = counts.get((src, tgt), 0) + int(n)
    return counts


# --------------------------------------------------------------------------------------------- raw reading
def open_stream(url: str):
    """A binary file object for a local path, ``pipe:`` command, http(s) URL, or any fsspec URL."""
    import webdataset as wds

    scheme = url.split("://", 1)[0] if "://" in url else ""
    if url.startswith("pipe:") or scheme in ("", "file", "http", "https"):
        return wds.gopen(url, "rb")
    import fsspec

    return fsspec.open(url, "rb").open()


def _split_name(name: str) -> tuple[str, str]:
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    prefix = f"{directory}/{stem}" if directory else stem
    return prefix, (ext.lower() if dot else "")


def _members(sample: dict) -> set[str]:
    return {k for k in sample if not k.startswith("__")}


def _has_end_blocks(stream: tarfile.TarFile) -> bool:
    """Whether a fully read stream-mode archive ended with its end-of-archive (zero) block. tarfile ends the
    iteration silently where the data ends, or ends inside a header; only the end block is read whole past the
    last member."""
    return stream.fileobj.tell() - stream.offset >= tarfile.BLOCKSIZE


def _second_end_block_follows(fileobj) -> bool:
    """Whether the block after the one that ended a stream-mode read is zeros (or the data ends there): then
    that one was the first end-of-archive block of a whole tar. tarfile also ends its iteration, silently, at a
    member header that does not read (a damaged byte), after reading that block whole; what follows it is then
    the member's data or the next header. Only the two end blocks are required to be zero (a record's padding
    after them may hold anything)."""
    block = fileobj.read(tarfile.BLOCKSIZE)
    return not block.strip(b"\0")


def _cut_sample(sample: dict, reference: dict | None, url: str, where: str) -> dict:
    """The last sample read from a shard that ends early (``where`` says how): itself when it has every member
    of the sample before it, else a ``truncated_shard`` tombstone (the damage fell between its members)."""
    if reference is not None and _members(sample) >= _members(reference):
        return sample
    has = ", ".join(sorted(_members(sample)))
    return {
        SKIP_KEY: "truncated_shard",
        "__key__": sample["__key__"],
        "__url__": url,
        "detail": f"{url}: {where}, in sample {sample['__key__']} (has {has})",
    }


def iter_tar_samples(url: str, expected: int | None = None) -> Iterator[dict]:
    """Raw samples of one shard: ``{"__key__", "__url__", "<ext>": bytes, ...}``.

    If reading fails part-way (truncated or corrupt tar, unreadable stream), the complete samples before the damage
    are yielded, then tombstones ``{"__skip__": reason, ...}``: ``expected - read`` of them when the shard size
    is known, otherwise one. A shard that ends cleanly but short of ``expected`` yields ``truncated_shard``
    tombstones for the difference. A shard cut on a member boundary (no end-of-archive blocks) whose last sample
    lacks a member the sample before it has yields a ``truncated_shard`` tombstone in that sample's place; where
    the size is unknown, such a shard also yields one ``truncated_shard`` tombstone for what the cut may have
    taken. A member header that does not read ends tarfile's iteration as if the archive ended: the data behind
    it gives it away, and the shard counts as ``corrupt_shard`` as above.
    """
    count = 0
    error: Exception | None = None
    current: dict | None = None
    previous: dict | None = None
    try:
        with open_stream(url) as fileobj:
            stream = tarfile.open(fileobj=fileobj, mode="r|*")
            for info in stream:
                if not info.isreg():
                    continue
                prefix, ext = _split_name(info.name)
                if prefix.startswith("__") or not ext:
                    continue
                if current is not None and prefix != current["__key__"]:
                    yield current
                    count += 1
                    previous, current = current, None
                data = stream.extractfile(info).read()
                if current is None:
                    current = {"__key__": prefix, "__url__": url}
                if ext in current:
                    raise ValueError(f"duplicate member {info.name} in {url}")
                current[ext] = data
                stream.members = []
            ended = _has_end_blocks(stream)
            damaged = ended and not _second_end_block_follows(stream.fileobj)
        if damaged:
            where = "a member header does not read (a damaged byte?)"
        else:
            where = "ends without its end-of-archive blocks"
        after = current["__key__"] if current is not None else previous["__key__"] if previous else None
        last = current
        if current is not None:
            if not ended or damaged:
                last = _cut_sample(current, previous, url, where)
            yield last
            count += 1
            current = None
        if damaged:
            raise tarfile.ReadError(
                f"{where} after sample {after}: the members after it cannot be read" if after else where
            )
        if not ended and expected is None and (last is None or SKIP_KEY not in last):
            yield {  # a cut on a sample boundary: how many samples it took is not known
                SKIP_KEY: "truncated_shard",
                "__key__": f"{url}#cut",
                "__url__": url,
                "detail": f"{url}: {where} after sample {after}; samples after it, if any, are lost",
            }
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        error = err
    if error is not None:
        missing = max(1, expected - count) if expected is not None else 1
        detail = f"{url}: {type(error).__name__}: {error}"
        for i in range(missing):
            yield {
                SKIP_KEY: "corrupt_shard",
                "__key__": f"{url}#missing{i}",
                "__url__": url,
                "detail": detail,
            }
    elif expected is not None and count < expected:
        for i in range(expected - count):
            yield {
                SKIP_KEY: "truncated_shard",
                "__key__": f"{url}#missing{i}",
                "__url__": url,
                "detail": f"{url}: {count} of {expected} samples",
            }
