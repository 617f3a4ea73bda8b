"""Images of task annotations: a reference (named root + relative path), its resolution against the configured
image folders, the check that lists every missing image before training starts, and the training augmentation of
fine-tuning (:class:`TaskAugment`). Images are decoded by the project's one loader,
:func:`cclm.data.images.load_image` (dev, test and translate-test images always; training images without
``data.augment``), or by the pretraining augmentation, :class:`cclm.data.transforms.TrainTransform`."""

from __future__ import annotations

import io
import math
import os
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from cclm.config import ConfigError
from cclm.data.images import DECODE_ERRORS, MissingImageError, UnreadableImage, decode_error_reason
from cclm.data.transforms import TrainTransform, mentions_side
from cclm.errors import DataError
from cclm.runtime.env import node_name

# The image folders IGLUE's and the retrieval tasks' annotations name (keys of data.image_roots); a task module
# that names another adds it here.
ROOT_NAMES = ("coco", "flickr30k", "gqa", "images", "marvl", "nlvr2", "wit")


class ImageRootMissing(ConfigError, KeyError):
    """An image root that the annotations name but ``data.image_roots`` lacks."""

    def __str__(self) -> str:  # a KeyError's own str() quotes its message
        return str(self.args[0])


@dataclass(frozen=True, order=True)
class ImageRef:
    """An image as annotations name it: ``root`` is a key of ``data.image_roots`` (None: ``path`` is absolute)."""

    root: str | None
    path: str

    def resolve(self, roots: Mapping[str, str]) -> Path:
        if self.root is None:
            return Path(self.path)
        if self.root not in roots:
            raise ImageRootMissing(
                f"config key 'data.image_roots.{self.root}' must be set (folder of the {self.root} images)"
            )
        return Path(roots[self.root]) / self.path


def missing_images(refs: Iterable[ImageRef], roots: Mapping[str, str]) -> list[Path]:
    """Every distinct image among ``refs`` that is not a file, sorted."""
    return sorted({path for path in (ref.resolve(roots) for ref in set(refs)) if not path.is_file()})


# path -> (size, mtime) and the reason it does not decode ("" when it does): xGQA names one image in many
# questions, and a run checks its files more than once (few-shot languages share test images)
_decode_checked: dict[Path, tuple[tuple[int, int], str]] = {}


def decode_problem(path: Path) -> str:
    """Why the image file at ``path`` does not decode ("" when it does). A JPEG is decoded at 1/8 scale (its DCT
    draft): every byte of the entropy-coded data is still read, so a truncated or corrupt file fails as it would
    in training, at under 3 ms for a 640x480 photo."""
    stat = path.stat()
    stamp = (stat.st_size, stat.st_mtime_ns)
    cached = _decode_checked.get(path)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    try:
        with Image.open(io.BytesIO(path.read_bytes())) as image:
            if image.format == "JPEG":
                image.draft("RGB", (math.ceil(image.width / 8), math.ceil(image.height / 8)))
            image.load()
        problem = ""
    except DECODE_ERRORS as err:
        problem = decode_error_reason(err)
    _decode_checked[path] = (stamp, problem)
    return problem


def decode_threads(processes_on_host: int) -> int:
    """Threads for one process's image check when ``processes_on_host`` ranks of this host check at once: up to
    8, and no more than the host's cores shared among them."""
    return max(1, min(8, (os.cpu_count() or 1) // max(1, processes_on_host)))


def undecodable_images(paths: Iterable[Path], workers: int | None = None) -> list[tuple[Path, str]]:
    """(path, reason) of every image file among ``paths`` that does not decode, sorted. Decoded on threads (PIL
    releases the GIL while it decodes)."""
    paths = sorted(set(paths))
    workers = workers or decode_threads(1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = list(pool.map(decode_problem, paths, chunksize=64))
    return [(path, problem) for path, problem in zip(paths, problems) if problem]


def require_images(refs: Iterable[ImageRef], roots: Mapping[str, str], show: int = 20) -> None:
    """Fail before training when images are missing or do not decode, listing the first ``show`` and the total.

    With several ranks, a collective: every rank checks that the files exist, the ranks of each host share the
    decoding (each host still decodes every image once: image roots may be node-local copies), and every rank
    raises the same error for the problems any rank found (a rank raising alone would leave the others waiting
    in the next collective)."""
    hint = "(`cclm iglue check-images CONFIG` lists them all"
    several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    paths, missing, error = [], [], None
    try:
        paths = sorted({ref.resolve(roots) for ref in set(refs)})
        # is_file() raises what is not "no such file": EIO, ESTALE (a stale NFS mount), EACCES on one node
        missing = [(path, "") for path in paths if not path.is_file()]
    except Exception as err:  # reported by every rank, not raised here alone
        if not several:
            raise
        error = err
    if several:
        hosts, missing = _union_over_ranks(missing, error)
    if missing:
        raise MissingImageError(  # one line: the CLI prints a user error on one line
            f"{_count(missing)} image(s) missing: {_listed(missing, show)} {hint}; "
            "set data.image_roots to your image folders)"
        )
    if several:
        rank = dist.get_rank()
        peers = [r for r, host in enumerate(hosts) if host == hosts[rank]]
        bad, error = [], None
        try:
            bad = undecodable_images(paths[peers.index(rank) :: len(peers)], decode_threads(len(peers)))
        except Exception as err:  # reported by every rank, not raised here alone
            error = err
        _, bad = _union_over_ranks(bad, error)
    else:
        bad = undecodable_images(paths)
    if bad:
        raise DataError(
            f"{_count(bad)} of {len(paths)} image(s) do not decode: {_listed(bad, show)} {hint}; "
            "replace or remove them)"
        )


def _union_over_ranks(
    found: list[tuple[Path, str]], error: Exception | None = None
) -> tuple[list[str], list[tuple[Path, str]]]:
    """Every rank's node (:func:`~cclm.runtime.env.node_name`), and the (path, reason) that any rank found,
    sorted; where nodes disagree, the reason names the nodes that found it. A collective; every rank raises the error of a rank whose check failed."""
    cause = "" if error is None else f"{type(error).__name__}: {error}"
    reports: list = [None] * dist.get_world_size()
    dist.all_gather_object(reports, (node_name(), found, cause))
    failed = [f"rank {r} ({h}): {c}" for r, (h, _, c) in enumerate(reports) if c]
    if failed:
        more = f"; {len(failed) - 1} more rank(s) failed too" if len(failed) > 1 else ""
        raise RuntimeError(f"the image check failed on {failed[0]}{more}") from error
    hosts = [h for h, _, _ in reports]
    seen: dict[tuple[Path, str], set[str]] = {}
    for h, items, _ in reports:
        for item in items:
            seen.setdefault(item, set()).add(h)
    union = []
    for (path, reason), where in sorted(seen.items()):
        if where != set(hosts):
            reason = "; ".join(filter(None, [reason, f"on {', '.join(sorted(where))}"]))
        union.append((path, reason))
    return hosts, union


def _count(problems: list[tuple[Path, str]]) -> int:
    return len({path for path, _ in problems})


def _listed(problems: list[tuple[Path, str]], show: int) -> str:
    listed = ", ".join(f"{path} ({reason})" if reason else str(path) for path, reason in problems[:show])
    more = f", ... and {len(problems) - show} more" if len(problems) > show else ""
    return listed + more


class TaskAugment:
    """The reference's fine-tuning augmentation of training images (``dataset/__init__.py`` ``train_transform``):
    a random resized crop (area ``scale_min``..1 of the image, bicubic), a horizontal flip with probability 1/2,
    then RandAugment(2, 7) -- the pretraining :class:`~cclm.data.transforms.TrainTransform`.

    With ``hflip_careful`` (the default) flips are careful, as in pretraining: an image is never flipped when its
    text names a side in the example's language ("left", "links", ...; a language without a word list is never
    flipped), nor when the example's label does in English (``label_names``: an xGQA answer "left" or "right").
    Without, flips are the reference's: every image with probability 1/2, except where the task's
    ``reference_side_words`` occur (exact, case-sensitive substrings) in the text or the label's name -- GQA's
    "left" and "right" in the question or answer (the reference's ``vqa_dataset``).

    Reproducible: the randomness of one image is ``random.Random`` seeded with (``seed``, ``epoch``, ``index``,
    ``slot``): ``index`` the example's position in the training set, ``slot`` the image's position in the example
    (MaRVL's two images). The loader sets ``epoch`` (:meth:`set_epoch`) before each epoch, so a resumed
    fine-tuning run, and a loader with any number of workers, augment exactly as the uninterrupted run."""

    def __init__(
        self,
        size: int,
        seed: int,
        *,
        scale_min: float = 0.5,
        hflip: bool = True,
        hflip_careful: bool = True,
        randaugment: bool = True,
        label_names: Sequence[str] = (),
        reference_side_words: Sequence[str] = (),
    ):
        self.size, self.seed, self.epoch = int(size), int(seed), 0
        self.transform = TrainTransform(
            self.size, scale_min, hflip=hflip, randaugment=randaugment, hflip_careful=hflip_careful
        )
        self.no_flip = TrainTransform(self.size, scale_min, hflip=False, randaugment=randaugment)
        self.side_words = () if hflip_careful else tuple(reference_side_words)
        names_side = (lambda name: mentions_side(name, "en")) if hflip_careful else self.names_reference_side
        self.side_labels = frozenset(i for i, name in enumerate(label_names) if names_side(str(name)))

    @classmethod
    def from_config(
        cls,
        data_cfg,
        size: int,
        seed: int,
        label_names: Sequence[str] = (),
        reference_side_words: Sequence[str] = (),
    ) -> TaskAugment | None:
        """The augmentation a fine-tuning ``data`` section asks for (``augment``, ``crop_scale_min``, ``hflip``,
        ``hflip_careful``, ``randaugment``); None without ``data.augment``. ``reference_side_words``: the task's
        (its module's ``REFERENCE_SIDE_WORDS``)."""
        if not getattr(data_cfg, "augment", False):
            return None
        return cls(
            size,
            seed,
            scale_min=float(data_cfg.crop_scale_min),
            hflip=bool(data_cfg.hflip),
            hflip_careful=bool(data_cfg.hflip_careful),
            randaugment=bool(data_cfg.randaugment),
            label_names=label_names,
            reference_side_words=reference_side_words,
        )

    def names_reference_side(self, text: str) -> bool:
        return any(word in text for word in self.side_words)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def rng(self, index: int, slot: int = 0) -> random.Random:
        """The randomness of image ``slot`` of training example ``index`` in this epoch (a string seed: the same in
        every process, whatever ``PYTHONHASHSEED``)."""
        return random.Random(f"cclm-finetune-augment:{self.seed}:{self.epoch}:{int(index)}:{int(slot)}")

    def load(
        self, path: Path, text: str, lang: str, index: int, slot: int = 0, label: int | None = None
    ) -> torch.Tensor:
        """The augmented image at ``path`` as uint8 [3, size, size] (errors as :func:`~cclm.data.images.load_image`:
        :class:`MissingImageError`, :class:`UnreadableImage`)."""
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise MissingImageError(f"image not found: {path}") from None
        keep_sides = label in self.side_labels or self.names_reference_side(text)
        transform = self.no_flip if keep_sides else self.transform
        try:
            pixels = transform(data, text, lang, self.rng(index, slot))
        except DECODE_ERRORS as err:
            reason = re.sub(r" <_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(err)) or type(err).__name__
            raise UnreadableImage(path, reason) from err
        return torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(2, 0, 1).contiguous()
