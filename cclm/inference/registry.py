"""The released CCLM checkpoints by name, as open_clip names its pretrained weights.

    import cclm
    cclm.list_pretrained()                   # ['cclm-3m-base', 'cclm-4m-base', 'cclm-x2vlm-base', ...]
    cclm.pretrained_info("cclm-4m-base")     # where it is published and how it is imported
    model = cclm.load("cclm-4m-base", checkpoint="~/Downloads/cclm_4m_epoch_29.th")   # first time
    model = cclm.load("cclm-4m-base")        # afterwards: from the cache

Each entry records the published URL, the digest where the publisher gives one, and the settings that import it
with ``cclm convert-reference`` (:class:`ImportSettings`). ``load`` downloads the checkpoint into the cache
(``$CCLM_CACHE``, else ``~/.cache/cclm``), checks its sha256, converts it once into a model folder and loads that
folder every later time, without touching the checkpoint again.

Cache layout::

    checkpoints/<file>          the released checkpoint, as downloaded (or as the user gave it: not copied)
    checkpoints/<file>.sha256   its digest, ``sha256sum -c`` format
    checkpoints/<file>.url      the URL it was downloaded from: a file (and digest) of another URL is not reused
    checkpoints/<file>.part     an interrupted download, resumed by the next call
    models/<name>/              the converted model folder; ``pretrained.json`` in it, written last, says which
                                checkpoint digest, settings and converter made it (others convert again)
    locks/<name>.lock           one process downloads and converts at a time (the ranks of a job wait for it)

No publisher of these checkpoints gives a digest. The first download (or the first file a user passes) that
converts is therefore recorded in ``<file>.sha256`` and every later use of that file is verified against it: a changed or
damaged file is refused until the record is deleted. The 3M/4M checkpoints are published on Google Drive,
whose large files sit behind an interactive virus-scan page: they cannot be fetched by a program, so ``load``
says where to download them by hand and how to pass the file. The X2-VLM-based releases are listed for
completeness but their BEiT vision encoder is another layout that ``convert-reference`` refuses, so ``load``
refuses them before downloading anything.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cclm.errors import UserError
from cclm.inference.download import ChecksumMismatch, download, part_path, sha256_of

log = logging.getLogger("cclm.inference")

CACHE_VARIABLE = "CCLM_CACHE"
DEFAULT_CACHE = Path("~/.cache/cclm")
MARKER = "pretrained.json"
DISTRIBUTION = "cclm"  # the installed package whose version a converted folder records
GOOGLE_DRIVE = (
    "Google Drive serves files this large only after an interactive virus-scan confirmation page, so cclm "
    "cannot download it"
)


class PretrainedError(UserError):
    """An unknown name, a checkpoint that must be downloaded by hand, or one that cannot be imported."""


class ManualDownloadRequired(PretrainedError):
    """The checkpoint's published URL cannot be fetched by a program; the message says what to do instead."""


@dataclass(frozen=True)
class ImportSettings:
    """The ``cclm convert-reference`` options that import a released checkpoint (the arguments of
    :func:`cclm.inference.convert_reference.convert`; ``config`` None = its default ``base_swin.yaml``)."""

    config: str | None = None
    tokenizer: str | None = "xlm-roberta-large"
    position_ids: str = "reference"
    normalize: str = "pre_caption"
    max_words: int = 40
    image_size: int | None = None
    allow_missing_mlm_head: bool = False
    text_heads: int | None = None
    vision_heads: int | None = None
    vision_act: str = "quick_gelu"

    def command(self, checkpoint: str = "CHECKPOINT", out: str = "OUT") -> str:
        """The equivalent command line."""
        args = [f"cclm convert-reference {checkpoint} {out}"]
        for key, value in asdict(self).items():
            default = getattr(ImportSettings, key)
            if value != default:
                flag = "--" + key.replace("_", "-")
                args.append(flag if value is True else f"{flag} {'none' if value is None else value}")
        return " ".join(args)


@dataclass(frozen=True)
class Pretrained:
    """One released checkpoint: where it is published and how it is imported."""

    name: str
    description: str
    url: str
    filename: str  # its name in the cache
    sha256: str | None = None  # the publisher's digest; None: recorded on first download, verified afterwards
    manual_download: str | None = None  # why the URL cannot be fetched by a program
    unsupported: str | None = None  # why convert-reference cannot import it
    settings: ImportSettings = field(default_factory=ImportSettings)
    source: str = "zengyan-97/CCLM README.md"

    def describe(self) -> dict[str, Any]:
        """The entry as plain data (what ``cclm.pretrained_info`` returns)."""
        info = asdict(self)
        info["convert_command"] = self.settings.command(self.filename, f"models/{self.name}")
        info["downloadable"] = self.manual_download is None and self.unsupported is None
        return info


_PAPER = "Zeng et al., Cross-View Language Modeling (ACL 2023)"
_CCLM_SWIN = (
    "Swin-B at 224 px (window 7) + 12 of xlm-roberta-large's layers (6 text, 6 fusion with cross-attention), "
    "30 epochs on 8 A100s, batch 1024"
)
_X2VLM = (
    "X2-VLM-based release with a BEiT vision encoder: another layout, which convert-reference refuses (load it "
    "with zengyan-97/X2-VLM's own code)"
)

_REGISTRY: dict[str, Pretrained] = {}


def register_pretrained(entry: Pretrained, overwrite: bool = False) -> Pretrained:
    """Add an entry (a checkpoint of your own, a mirror with a direct URL); an existing name needs
    ``overwrite=True``."""
    if entry.name in _REGISTRY and not overwrite:
        raise PretrainedError(f"a pretrained checkpoint named '{entry.name}' is already registered")
    if "/" in entry.name or entry.name.startswith("hf-hub:") or "/" in entry.filename:
        raise PretrainedError(f"'{entry.name}' / '{entry.filename}': names and file names cannot hold '/'")
    _REGISTRY[entry.name] = entry
    return entry


def unregister_pretrained(name: str) -> None:
    _REGISTRY.pop(name, None)


for _entry in (
    Pretrained(
        name="cclm-3m-base",
        description=f"CCLM (3M setting), {_CCLM_SWIN}; {_PAPER}",
        url="https://drive.google.com/file/d/1sR-yyWnSFeyfSNo9K5O9VL-e_VOCHnk5/view?usp=sharing",
        filename="cclm-3m-base.th",
        manual_download=GOOGLE_DRIVE,
    ),
    Pretrained(
        name="cclm-4m-base",
        description=f"CCLM (4M setting, with object and region annotations), {_CCLM_SWIN}; {_PAPER}",
        url="https://drive.google.com/file/d/1fZxxJMq_f3NpxM7qDDAHGULVwolN0Lbi/view?usp=sharing",
        filename="cclm-4m-base.th",
        manual_download=GOOGLE_DRIVE,
    ),
    Pretrained(
        name="cclm-x2vlm-base",
        description="CCLM trained on X2-VLM (base), June 2023 release",
        url="http://tosv.byted.org/obj/lab-robot-public/x2vlm_ckpts_2release/cclm_x2vlm_base.th",
        filename="cclm_x2vlm_base.th",
        unsupported=_X2VLM,
    ),
    Pretrained(
        name="cclm-x2vlm-large",
        description="CCLM trained on X2-VLM (large), June 2023 release",
        url="http://tosv.byted.org/obj/lab-robot-public/x2vlm_ckpts_2release/cclm_x2vlm_large.th",
        filename="cclm_x2vlm_large.th",
        unsupported=_X2VLM,
    ),
):
    register_pretrained(_entry)


def list_pretrained() -> list[str]:
    """The names :func:`cclm.load` accepts besides folders and ``hf-hub:ORG/NAME``."""
    return list(_REGISTRY)


def get_pretrained(name: str) -> Pretrained:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise PretrainedError(
            f"no pretrained checkpoint named '{name}'; known: {', '.join(_REGISTRY)}"
        ) from None


def pretrained_info(name: str) -> dict[str, Any]:
    """What the registry knows about ``name``: URL, digest, import settings, the convert command."""
    return get_pretrained(name).describe()


def is_pretrained_name(name: Any) -> bool:
    return isinstance(name, str) and name in _REGISTRY


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$CCLM_CACHE``, else ``~/.cache/cclm``."""
    return Path(cache_dir or os.environ.get(CACHE_VARIABLE) or DEFAULT_CACHE).expanduser()


# ------------------------------------------------------------------------------------------------- digests
def _record_path(checkpoint_file: Path) -> Path:
    return checkpoint_file.with_name(checkpoint_file.name + ".sha256")


def _url_path(checkpoint_file: Path) -> Path:
    return checkpoint_file.with_name(checkpoint_file.name + ".url")


def _from_other_url(entry: Pretrained, cache: Path) -> bool:
    """Whether the cached download (and the digest recorded for it) came from another URL than the entry's:
    an entry re-registered at a new URL publishes other bytes under the same file name. A file without a
    ``.url`` record (put there by hand, or by an older cclm) is taken as the entry's unless the folder converted
    from it names another URL."""
    try:
        url = _url_path(cache / "checkpoints" / entry.filename).read_text(encoding="utf-8").strip()
    except FileNotFoundError:  # cached by an older cclm: the URL its conversion records, if any
        try:
            url = json.loads((cache / "models" / entry.name / MARKER).read_text(encoding="utf-8"))["url"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
    return url != entry.url


def _record_url(entry: Pretrained, path: Path) -> None:
    record = _url_path(path)
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_name(record.name + ".tmp")
    tmp.write_text(entry.url + "\n", encoding="utf-8")
    os.replace(tmp, record)


def recorded_digest(entry: Pretrained, cache: Path) -> str | None:
    """The publisher's digest, else the one recorded when the checkpoint was first seen (at the entry's URL),
    else None."""
    if entry.sha256:
        return entry.sha256.lower()
    record = _record_path(cache / "checkpoints" / entry.filename)
    if record.is_file() and not _from_other_url(entry, cache):
        return record.read_text(encoding="utf-8").split()[0].lower()
    return None


def _record(entry: Pretrained, cache: Path, digest: str) -> None:
    record = _record_path(cache / "checkpoints" / entry.filename)
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_name(record.name + ".tmp")
    tmp.write_text(f"{digest}  {entry.filename}\n", encoding="utf-8")
    os.replace(tmp, record)
    _record_url(entry, record.with_name(entry.filename))  # the digest is the entry's at its URL now
    log.warning(
        "%s: the publisher gives no sha256; recorded %s in %s, and later uses of the checkpoint are checked "
        "against it",
        entry.name,
        digest,
        record,
    )


def _verified(entry: Pretrained, cache: Path, path: Path) -> str:
    """sha256 of ``path``, checked against the known digest when there is one (a first digest is recorded by
    :func:`pretrained_folder` only once the file converted: a damaged first file must not become the reference)."""
    expected = recorded_digest(entry, cache)
    digest = sha256_of(path)
    if expected is not None and digest != expected:
        where = (
            "published"
            if entry.sha256
            else f"recorded in {_record_path(cache / 'checkpoints' / entry.filename)}"
        )
        raise ChecksumMismatch(
            f"{path}: sha256 {digest} differs from the one {where} ({expected}) for {entry.name}: the file is "
            "damaged or another file"
            + ("" if entry.sha256 else "; delete the record if you mean to use this file instead")
        )
    return digest


# ------------------------------------------------------------------------------------------------- fetch
def manual_download_message(entry: Pretrained, cache: Path) -> str:
    target = cache / "checkpoints" / entry.filename
    return (
        f"{entry.name} is published at {entry.url}; {entry.manual_download}. Download it in a browser and pass "
        f"it: cclm.load('{entry.name}', checkpoint='path/to/file.th') (or put it at {target}); it is checked, "
        "converted once and loaded from the cache afterwards"
    )


def fetch_checkpoint(
    entry: Pretrained, cache: Path, checkpoint: str | os.PathLike | None = None
) -> tuple[Path, str]:
    """The checkpoint file of ``entry`` and its sha256, verified against the published or recorded digest when
    there is one: ``checkpoint`` (a file the user downloaded), else the cached download, else a fresh download.
    Records nothing (:func:`record_first_digest`)."""
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise PretrainedError(f"checkpoint file not found: {path}")
        return path, _verified(entry, cache, path)
    path = cache / "checkpoints" / entry.filename
    other_url = _from_other_url(entry, cache)
    if path.is_file() and not other_url:
        digest = _verified(entry, cache, path)
        if not _url_path(path).exists():  # cached by an older cclm: from now on a changed URL is noticed
            _record_url(entry, path)
        return path, digest
    if entry.manual_download:
        raise ManualDownloadRequired(manual_download_message(entry, cache))
    if other_url:  # the file, a part of it and its digest are another URL's: none may be reused or resumed
        log.warning("%s: the cached %s came from another URL; downloading %s", entry.name, path, entry.url)
        for stale in (path, part_path(path), _record_path(path)):
            stale.unlink(missing_ok=True)
    _record_url(entry, path)  # before the download: it names where a .part left by an interruption comes from
    log.info("downloading %s from %s", entry.name, entry.url)
    expected = recorded_digest(entry, cache)
    return path, download(entry.url, path, sha256=expected, check=readable_checkpoint(entry.filename))


def readable_checkpoint(filename: str) -> Callable[[Path], None]:
    """The check :func:`download` runs on a download whose length the server did not announce (and with no
    digest to prove it whole): the file reads as the checkpoint ``filename`` is, safetensors by its suffix, else
    ``torch.load(weights_only=True)`` (memory-mapped for a zip-format file, so only its index is read; a zip cut
    short has no central directory and fails)."""

    def check(path: Path) -> None:
        if filename.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(path), framework="pt"):
                pass
        else:
            import torch

            torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))

    return check


def record_first_digest(entry: Pretrained, cache: Path, digest: str) -> None:
    """Record ``digest`` as the checkpoint's when neither the publisher nor an earlier use gave one; called once
    the file has converted, so a file cut short is never recorded."""
    if recorded_digest(entry, cache) is None:
        _record(entry, cache, digest)


# ------------------------------------------------------------------------------------------------- convert
def _file_identity(path: Path) -> dict[str, Any]:
    """Where a checkpoint file is and its size and modification time: the same file, unchanged, is not hashed
    again when it is passed once more (every rank of a job may pass it)."""
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


@functools.cache
def converter_version() -> str:
    """What made a converted folder: the cclm version and a digest of the converter's sources (its module, the
    resizing it applies, its default template), so that an upgrade that changes what ``convert-reference``
    produces (a tensor it now keeps, a fixed mapping) converts cached folders again instead of serving the old
    conversion, in an editable install too, whose version does not change."""
    from importlib.metadata import PackageNotFoundError, version

    from cclm.inference import convert_reference
    from cclm.model import resize

    try:
        release = version(DISTRIBUTION)
    except PackageNotFoundError:  # run from a source tree that is not installed
        release = "source"
    sources = hashlib.sha256()
    for path in (convert_reference.__file__, resize.__file__, convert_reference.DEFAULT_CONFIG):
        sources.update(Path(path).read_bytes())
    return f"{release}+{sources.hexdigest()[:16]}"


def _template_digest(entry: Pretrained) -> str | None:
    """The digest of the entry's own template config (its content may change under one path)."""
    path = Path(entry.settings.config).expanduser() if entry.settings.config else None
    return hashlib.sha256(path.read_bytes()).hexdigest() if path is not None and path.is_file() else None


def _marker(entry: Pretrained, source: Path, digest: str) -> dict[str, Any]:
    return {
        "name": entry.name,
        "url": entry.url,
        "sha256": digest,
        "settings": asdict(entry.settings),
        "converter": converter_version(),
        "template_sha256": _template_digest(entry),
        "source": _file_identity(source),
    }


def _made_by(folder: Path, entry: Pretrained) -> dict[str, Any] | None:
    """The marker of a finished conversion made with the entry's current settings and this converter, else
    None."""
    try:
        made = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if made.get("settings") != asdict(entry.settings) or made.get("url") != entry.url:
        return None
    if made.get("converter") != converter_version() or made.get("template_sha256") != _template_digest(entry):
        return None
    return made


def _up_to_date(folder: Path, entry: Pretrained, checkpoint: str | os.PathLike | None) -> bool:
    made = _made_by(folder, entry)
    if made is None:
        return False
    if checkpoint is None:
        return True
    path = Path(checkpoint).expanduser()
    return path.is_file() and made.get("source") == _file_identity(path)


def convert_into_cache(entry: Pretrained, source: Path, digest: str, folder: Path) -> Path:
    """Convert ``source`` with the entry's settings into a temporary folder, then rename it to ``folder``."""
    from cclm.inference.convert_reference import ConversionError, convert

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.converting-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        convert(source, tmp, **asdict(entry.settings))
        (tmp / MARKER).write_text(json.dumps(_marker(entry, source, digest), indent=1), encoding="utf-8")
    except BaseException as err:  # never leave a half-written folder behind, whatever stopped the conversion
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, ConversionError):
            raise PretrainedError(f"{entry.name}: cannot convert {source}: {err}") from None
        raise
    if folder.exists():
        shutil.rmtree(folder)  # made with other settings (checked under the lock)
    os.replace(tmp, folder)
    return folder


def pretrained_folder(
    name: str, checkpoint: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """The converted model folder of the registered checkpoint ``name``: from the cache when it was converted
    before with the same settings (from the same ``checkpoint`` file, unchanged, when one is given: it is then
    not read), else fetched (``checkpoint``: a file you downloaded), verified and converted. One process at a
    time per name (a file lock)."""
    from filelock import FileLock

    entry = get_pretrained(name)
    if entry.unsupported:
        raise PretrainedError(f"{entry.name} ({entry.url}) cannot be imported: {entry.unsupported}")
    cache = cache_root(cache_dir)
    folder = cache / "models" / entry.name
    if _up_to_date(folder, entry, checkpoint):
        return folder
    (cache / "locks").mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / "locks" / f"{entry.name}.lock")):
        if _up_to_date(folder, entry, checkpoint):  # another process finished it meanwhile
            return folder
        source, digest = fetch_checkpoint(entry, cache, checkpoint)
        made = _made_by(folder, entry)
        if made is None or made.get("sha256") != digest:  # else: the same weights from another file
            log.info("converting %s (%s)", entry.name, entry.settings.command(str(source), str(folder)))
            try:
                convert_into_cache(entry, source, digest, folder)
            except PretrainedError as err:
                # a download never proven whole (no digest recorded yet): it may have been cut short
                if checkpoint is None and recorded_digest(entry, cache) is None:
                    raise PretrainedError(
                        f"{err}; if {source} is a download cut short (e.g. by an older cclm), delete it and run "
                        "again to download it anew"
                    ) from None
                raise
        record_first_digest(entry, cache, digest)
        return folder
