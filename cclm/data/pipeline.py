"""``PretrainData``: the two training streams (image-caption, parallel text), the optional region stream, their
mixing, skip counts and exact-resume state. This is the one place that shows the whole data path:

    shards ─► split by rank/worker ─► shuffle ─► PIL decode to the crop ─► flip/RandAugment ─► normalise text
           ─► tokenise ─► mask ─► batch (all in DataLoader workers) ─► next_batch(view), view_for_step(step)
           picks the view

Per view. Each stream (``data.image_caption``, ``data.parallel_text``) may set its own ``max_length`` (tokens per
text, ``<s>`` and ``</s>`` included; default: the ``max_length`` argument, i.e. ``model.text.max_length``) and
``max_masks`` (default ``data.masking.max_masks``); the CCLM reference uses 40 / 12 for captions and 64 / 20 for
parallel text. Texts go through the model's normaliser (``normalizer``) before tokenising; a caption it turns into
nothing is not drawn, and a sample left without a caption, or a pair either side of which normalises to nothing,
is skipped and counted as ``empty_after_normalize``.

Regions (``data.regions``, multi-grained pretraining as CCLM-4M; docs/regions.md). A third stream of region
shards: ``max_images`` samples at a time, each cropped around one of its boxes, flipped (carefully) and given up to
``max_regions`` targets (:func:`cclm.data.regions.region_example`), then ``batch_size`` of their targets drawn into
one region batch (:meth:`cclm.data.collate.Collator.region_batch`), texts tokenised and masked as the image view's
(``data.regions.max_length``, else the image stream's). Region batches take the place of image-caption batches:
:meth:`PretrainData.view_for_step` answers "region" instead of "image" with probability ``data.regions.prob``
(the reference's 0.5), again a pure function of (seed, step). The region stream is not one of :attr:`views` (the
views a schedule counts); :meth:`views_for_step` gives a step's views for the ``sum`` schedule. Regions a sample
cannot use are counted like skipped samples (``region_bad_box``, ``region_filtered_language``, ...).

Resume guarantee. ``state_dict()`` records, per view, how many batches were taken and each worker's position
(epoch, index in its shuffled stream) and skip counts; ``load_state_dict()`` on a freshly built object makes
the next batches exactly those an uninterrupted run would have produced -- no repeats, no skips -- provided the
seed, shard list, world size, rank and number of workers are the same. This holds in resampled mode too (its
shard draws are seeded). If the topology changed, a non-resampled run refuses to resume (it could not keep the
no-repeat promise); a resampled run warns and continues with a fresh stream seeded by (seed, batches taken),
which is statistically equivalent but not the same sequence. State is per rank: save one per rank.

Unfinished conversions. Converters publish a shard folder's ``manifest.json`` last, so a local shard that no
manifest beside it lists is what an interrupted conversion (or a partial copy) leaves: it is read with a warning
naming it, or refused with ``data.unlisted_shards=refuse``. Remote shards (``pipe:``, URLs) cannot be checked;
one info line says so.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import os
import random
import signal
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from cclm.config import ConfigError, UnlistedShards, ViewSchedule, check_regions_config
from cclm.data.collate import REGION, Collator
from cclm.data.examples import image_caption_example, parallel_example
from cclm.data.languages import language_allowed, normalize_language
from cclm.data.masking import MaskingSpec
from cclm.data.normalize import Normalizer
from cclm.data.regions import BOX_SAFE_OPS, RegionTransform, region_example
from cclm.data.shards import (
    VIEW_IMAGE_CAPTION,
    VIEW_PARALLEL,
    expand_shards,
    is_remote,
    manifest_language_pairs,
    manifest_languages,
    read_sizes,
    shard_manifests,
    unlisted_shards,
)
from cclm.data.skips import SkipSample
from cclm.data.stream import DROPPED_KEY, STREAM_KEY, ShardStream, StreamPlan, derive_seed
from cclm.data.transfer import from_wire
from cclm.data.transforms import EvalTransform, RandAugment, TrainTransform
from cclm.errors import CheckpointError, DataError

log = logging.getLogger("cclm.data")
VIEWS = ("image", "text")
STREAM_KEYS = {"image": "data.image_caption", "text": "data.parallel_text", REGION: "data.regions"}
# The manifest ``view`` of the shards each stream reads (region shards are image-caption shards with boxes)
SHARD_VIEWS = {"image": VIEW_IMAGE_CAPTION, "text": VIEW_PARALLEL, REGION: VIEW_IMAGE_CAPTION}
VIEW_KEYS = {VIEW_IMAGE_CAPTION: "data.image_caption", VIEW_PARALLEL: "data.parallel_text"}
STATE_VERSION = 1
TOPOLOGY_NAMES = {
    "shards": "shards (their names)",
    "shard_files": "shard_files (the shard files: other files or sizes, another corpus, or the folders in another "
    "order)",
}
SHOWN_SHARDS = 5  # unlisted shards named in a warning or error; the rest are counted


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)
    # SLURM signals every process of a job step: the trainer handles SIGUSR1 (save and stop), a worker ignores it
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _fingerprint(urls: list[str]) -> str:
    return hashlib.sha1("\n".join(os.path.basename(u) for u in urls).encode()).hexdigest()[:16]


def _files_fingerprint(urls: list[str]) -> str:
    """The shards as files, in order: each local shard's name and its folder's identity, the random ``id`` of
    the write that made it (``manifest.json``), else the file's size. Converters name every folder's shards alike
    (``shard-000000.tar`` ...), so names alone miss another corpus with as many shards, or two folders given in
    the other order; the same folder moved or copied elsewhere (a node-local copy) keeps it. A ``pipe:`` or URL
    shard counts by its name alone, as before (it may be moved to another mirror). One manifest read per
    folder; a stat per shard only where a folder's manifest has no ``id``."""
    manifests = shard_manifests(urls)
    parts = []
    for url in urls:
        if is_remote(url):
            parts.append(os.path.basename(url.rstrip("/")))
            continue
        path = Path(os.path.expanduser(url))
        write_id = (manifests.get(str(path.parent)) or {}).get("id")
        if write_id is None:
            try:
                write_id = path.stat().st_size
            except OSError:  # a file this process cannot stat: its name is what there is
                write_id = ""
        parts.append(f"{path.name}:{write_id}")
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]


def stream_languages(codes, urls: list[str], key: str, check_manifest: bool = True) -> frozenset[str]:
    """The normalised language filter of a stream (``EN`` -> ``en``; empty = every language). A code that is no
    language, or one its shards' manifest shows no data for, fails here, naming what the shards have: else every
    sample would be skipped and the stream would never yield a batch."""
    wanted = [str(code) for code in codes or ()]
    allowed = [normalize_language(code) for code in wanted]
    counts = manifest_languages(urls) if wanted and check_manifest else None
    held = None if counts is None else ", ".join(sorted(lang for lang, n in counts.items() if n)) or "none"
    not_codes = [f"'{code}'" for code, lang in zip(wanted, allowed) if lang is None]
    if not_codes:
        what = "is not a language code" if len(not_codes) == 1 else "are not language codes"
        shards = f"; the shards' manifest.json lists {held}" if held is not None else ""
        raise DataError(
            f"{key}.languages: {', '.join(not_codes)} {what} (ISO 639-1 or 639-3, e.g. en, de){shards}"
        )
    if counts is not None:
        missing = [
            lang
            for lang in allowed
            if not any(language_allowed(have, {lang}) and n for have, n in counts.items())
        ]
        if missing:
            raise DataError(
                f"{key}.languages: the shards hold no samples in {', '.join(missing)} (their manifest.json lists "
                f"{held}); fix the codes or drop them"
            )
    return frozenset(allowed)


def check_pairs(allowed: frozenset[str], urls: list[str], key: str) -> None:
    """A parallel-text filter must keep some pair, and a pair is kept only when both its languages are listed:
    ``[de]`` on en-de pairs keeps none. Checked where the shards' manifests count their language pairs."""
    pairs = manifest_language_pairs(urls) if allowed else None
    if not pairs or any(
        n and language_allowed(src, allowed) and language_allowed(tgt, allowed)
        for (src, tgt), n in pairs.items()
    ):
        return
    held = ", ".join(f"{src}-{tgt}" for (src, tgt), n in sorted(pairs.items()) if n)
    raise DataError(
        f"{key}.languages: no language pair of the shards has both sides in [{', '.join(sorted(allowed))}] "
        f"(their manifest.json lists {held}); a pair is read only when both its languages are listed"
    )


def check_view(urls: list[str], view: str, key: str) -> None:
    """Refuse local shards whose ``manifest.json`` says they hold the other view (the two streams' folders
    swapped): every sample would be skipped, and only after the stream had read them all."""
    for folder, manifest in shard_manifests(urls).items():
        held = (manifest or {}).get("view")
        if held in VIEW_KEYS and held != SHARD_VIEWS[view]:
            raise DataError(
                f"{key}: {folder} holds {held} shards (its manifest.json says view={held}); give it as "
                f"{VIEW_KEYS[held]}.shards"
            )


def check_listed(urls: list[str], policy: UnlistedShards | str, key: str) -> None:
    """Apply the ``data.unlisted_shards`` policy to the shards of the config key ``key``."""
    remote = sum(is_remote(url) for url in urls)
    if remote:
        log.info("%s: %d remote shard(s) (pipe: or URL) are read without a manifest check", key, remote)
    unlisted = unlisted_shards(urls)
    if not unlisted:
        return
    named = ", ".join(unlisted[:SHOWN_SHARDS])
    if len(unlisted) > SHOWN_SHARDS:
        named += f" and {len(unlisted) - SHOWN_SHARDS} more"
    message = (
        f"{key}: {len(unlisted)} shard(s) that no manifest.json beside them lists (an interrupted conversion "
        f"or an incomplete copy?): {named}"
    )
    if UnlistedShards(policy) == UnlistedShards.refuse:
        raise DataError(f"{message}; convert again, or set data.unlisted_shards=warn to read them anyway")
    log.warning("%s; reading them anyway (data.unlisted_shards=refuse refuses them)", message)


def _check_normalized(example: dict, normalizer: Normalizer | None, fields: tuple[str, ...]) -> dict:
    if normalizer is not None:
        for field in fields:
            if not normalizer(example[field]):
                raise SkipSample("empty_after_normalize", f"{example['key']}: {example[field][:80]!r}")
    return example


def _image_example(sample, rng, transform, allowed, normalizer=None):
    # captions the normaliser empties are dropped before the draw: the sample is skipped only when none is left
    return image_caption_example(sample, transform, allowed, rng, normalizer)


def _text_example(sample, rng, allowed, swap, normalizer=None):
    return _check_normalized(parallel_example(sample, allowed, swap, rng), normalizer, ("text", "other"))


def _region_example(sample, rng, transform, allowed, normalizer=None):
    example = region_example(sample, transform, allowed, rng)
    if normalizer is not None:
        kept = tuple(t for t in example["targets"] if normalizer(t.text))
        if not kept:
            raise SkipSample("empty_after_normalize", f"{example['key']}: every region text")
        if len(kept) < len(example["targets"]):
            example[DROPPED_KEY]["region_empty_after_normalize"] += len(example["targets"]) - len(kept)
        example["targets"] = kept
    return example


def region_transform(data_cfg, image_size: int, train: bool = True) -> RegionTransform:
    """The region stream's transform from ``data.regions``; with ``data.randaugment``, the RandAugment ops that
    keep boxes in place (the reference's region transform)."""
    regions = data_cfg.regions
    box_safe = None
    if train and data_cfg.randaugment:
        box_safe = RandAugment(
            data_cfg.randaugment_ops, data_cfg.randaugment_magnitude, op_names=BOX_SAFE_OPS
        )
    return RegionTransform(
        image_size,
        max_regions=int(regions.max_regions),
        min_perc_in_image=float(regions.min_perc_in_image),
        hflip=bool(regions.hflip) and train,
        careful_hflip=bool(regions.careful_hflip),
        randaugment=box_safe,
        code_switch=bool(regions.code_switch),
    )


# A region batch's parallel pairs (parallel_with_regions): its key <- the text batch's key
PARALLEL_PAIR_KEYS = {
    "parallel_ids": "text_ids",
    "parallel_mask": "text_mask",
    "parallel_other_ids": "other_ids",
    "parallel_other_mask": "other_mask",
}


class PretrainData:
    """Batches of both views for pretraining; see the module docstring for the resume guarantee.

    ``train=False`` gives the deterministic evaluation transform (whole image resized, no crop, no flip, no
    RandAugment) and never swaps parallel sides; ``epochs`` limits the stream (None = endless). ``max_length``
    is the token cap of a view whose stream sets none; ``normalizer`` (str -> str, picklable; None = identity)
    is the model's text normaliser; ``view_schedule`` (``train.view_schedule``) decides
    :meth:`view_for_step`. ``parallel_with_regions``: every region batch also carries the next parallel-text
    batch as ``parallel_ids/parallel_mask`` (side A) and ``parallel_other_ids/parallel_other_mask`` (side B), for
    the cross-lingual consistency objective (``model.objectives.xlc_weight``); the text stream's position is
    resumed as for text steps.
    """

    def __init__(
        self,
        data_cfg,
        tokenizer,
        max_length: int,
        image_size: int = 224,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 42,
        train: bool = True,
        epochs: int | None = None,
        normalizer: Normalizer | None = None,
        view_schedule: ViewSchedule | str = ViewSchedule.alternate,
        parallel_with_regions: bool = False,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.cfg, self.seed, self.rank, self.world_size = data_cfg, seed, rank, world_size
        self.num_workers = int(data_cfg.num_workers)
        streams = {"image": data_cfg.image_caption, "text": data_cfg.parallel_text}
        self._stream_cfgs = {v: streams[v] for v in VIEWS if streams[v] is not None}
        if not self._stream_cfgs:
            raise ValueError("data: set data.image_caption.shards and/or data.parallel_text.shards")
        weights = {v: float(c.weight) for v, c in self._stream_cfgs.items()}
        if min(weights.values()) < 0 or sum(weights.values()) <= 0:
            named = ", ".join(f"{STREAM_KEYS[v]}.weight={w:g}" for v, w in weights.items())
            raise ValueError(f"stream weights must be >= 0 with a positive sum, got {named}")
        # the views that take steps; a stream of weight 0 takes none (its batches may still serve as the parallel
        # pairs of region batches, parallel_with_regions)
        self.views = tuple(v for v, w in weights.items() if w > 0)
        self.regions = data_cfg.regions
        if self.regions is not None:
            check_regions_config(self.regions)
            if "image" not in self.views:
                raise ConfigError(
                    "data.regions: region batches take the place of image-caption batches; set "
                    "data.image_caption.shards too"
                )
        self._streams = tuple(self._stream_cfgs) + ((REGION,) if self.regions is not None else ())
        self.parallel_with_regions = bool(parallel_with_regions)
        if self.parallel_with_regions and (self.regions is None or "text" not in self._stream_cfgs):
            raise ConfigError(
                "model.objectives.xlc_weight > 0 puts parallel pairs over region batches' images: set "
                "data.regions and data.parallel_text.shards (data.parallel_text.weight=0 keeps the pairs out "
                "of text steps)"
            )
        try:
            self.view_schedule = ViewSchedule(getattr(view_schedule, "value", view_schedule))
        except ValueError:
            choices = ", ".join(m.value for m in ViewSchedule)
            raise ValueError(f"train.view_schedule must be one of {choices}, got {view_schedule!r}") from None
        if self.view_schedule == ViewSchedule.interleave and len(self.views) == 2:
            odd = {
                STREAM_KEYS[v]: float(c.weight) for v, c in self._stream_cfgs.items() if float(c.weight) != 1
            }
            if odd:
                named = ", ".join(f"{key}.weight={w:g}" for key, w in odd.items())
                raise ValueError(
                    f"train.view_schedule=interleave takes the two views strictly in turn and ignores stream "
                    f"weights: {named}; set them to 1.0 or use train.view_schedule=alternate"
                )
        self.max_lengths, masking = {}, {}
        for view in VIEWS:
            cfg = streams[view]
            view_max = max_length if cfg is None or cfg.max_length is None else cfg.max_length
            if int(view_max) < 2:
                raise ValueError(
                    f"{STREAM_KEYS[view]}.max_length must be >= 2 (<s> and </s>), got {view_max}"
                )
            self.max_lengths[view] = int(view_max)
            spec = dict(data_cfg.masking)
            if cfg is not None and cfg.max_masks is not None:
                spec["max_masks"] = cfg.max_masks
            try:
                masking[view] = MaskingSpec.from_tokenizer(tokenizer, **spec)
            except ValueError as err:
                override = cfg is not None and cfg.max_masks is not None and "max_masks" in str(err)
                where = f" ({STREAM_KEYS[view]}.max_masks={cfg.max_masks})" if override else ""
                raise ValueError(f"data.{err}{where}") from None
        if self.regions is not None:
            # region texts are read as captions (the reference's max_tokens, max_masks)
            region_max = self.regions.max_length
            self.max_lengths[REGION] = int(self.max_lengths["image"] if region_max is None else region_max)
            masking[REGION] = masking["image"]
        self.masking = masking
        self._normalizer = normalizer
        self._collator = Collator(tokenizer, self.max_lengths, masking, normalizer)
        if train:
            try:
                transform = TrainTransform(
                    image_size,
                    data_cfg.crop_scale_min,
                    data_cfg.hflip,
                    data_cfg.randaugment,
                    randaugment_ops=data_cfg.randaugment_ops,
                    randaugment_magnitude=data_cfg.randaugment_magnitude,
                    hflip_careful=data_cfg.hflip_careful,
                )
            except ValueError as err:
                raise ValueError(f"data.{err}") from None  # the messages start with the key
        else:
            transform = EvalTransform(image_size)
        self._transform, self._swap = transform, bool(data_cfg.swap_parallel) and train
        self._epochs = epochs
        self._region_transform = (
            None if self.regions is None else region_transform(data_cfg, image_size, train)
        )
        self._urls = {}
        for view in self._streams:
            key = f"{STREAM_KEYS[view]}.shards"
            shards = self.regions.shards if view == REGION else self._stream_cfgs[view].shards
            try:
                self._urls[view] = expand_shards(shards, key)
            except (FileNotFoundError, ValueError) as err:
                raise type(err)(f"{key}: {err}") from None
            check_view(self._urls[view], view, key)
            check_listed(self._urls[view], data_cfg.unlisted_shards, key)
        self._shard_files = {view: _files_fingerprint(urls) for view, urls in self._urls.items()}
        self._languages = {
            view: stream_languages(
                (self.regions if view == REGION else self._stream_cfgs[view]).languages,
                self._urls[view],
                STREAM_KEYS[view],
                check_manifest=view != REGION,  # a manifest counts the image captions, not the region ones
            )
            for view in self._streams
        }
        if "text" in self._streams:
            check_pairs(self._languages["text"], self._urls["text"], STREAM_KEYS["text"])
        self._sizes = {v: read_sizes(u) for v, u in self._urls.items()}
        self._reseed = 0
        self._state = {v: {"batches": 0, "workers": {}} for v in self._streams}
        self._iters: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------------ streams
    def _stream(self, view: str) -> ShardStream:
        cfg = self.regions if view == REGION else self._stream_cfgs[view]
        state = self._state[view]
        allowed = self._languages[view]
        logical = max(1, self.num_workers)
        plan = StreamPlan(
            view=view,
            urls=self._urls[view],
            sizes=self._sizes[view],
            # a region batch is made from max_images samples (each image encoded once)
            batch_size=int(cfg.max_images if view == REGION else cfg.batch_size),
            seed=derive_seed(self.seed, self._reseed) if self._reseed else self.seed,
            rank=self.rank,
            world_size=self.world_size,
            num_workers=logical,
            shard_shuffle=bool(self.cfg.shard_shuffle),
            shuffle_buffer=int(self.cfg.sample_shuffle_buffer),
            resampled=bool(self.cfg.resampled),
            epochs=self._epochs,
            start={int(k): v for k, v in state["workers"].items()},
            rotation=state["batches"] % logical,
            languages=f"{STREAM_KEYS[view]}.languages=[{','.join(sorted(allowed))}]" if allowed else "",
        )
        if plan.split_by_sample:
            log.warning(
                "%s: %d shards for %d readers (ranks x workers): every reader scans all shards; write "
                "more, smaller shards for efficiency",
                view,
                len(plan.urls),
                plan.global_workers,
            )
        if view == "image":
            make = functools.partial(
                _image_example, transform=self._transform, allowed=allowed, normalizer=self._normalizer
            )
            collate = self._collator.image_batch
        elif view == REGION:
            make = functools.partial(
                _region_example,
                transform=self._region_transform,
                allowed=allowed,
                normalizer=self._normalizer,
            )
            collate = functools.partial(self._collator.region_batch, batch_size=int(cfg.batch_size))
        else:
            make = functools.partial(
                _text_example, allowed=allowed, swap=self._swap, normalizer=self._normalizer
            )
            collate = self._collator.text_batch
        return ShardStream(plan, make, collate)

    def _iterator(self, view: str):
        if view not in self._iters:
            stream = self._stream(view)
            if self.num_workers == 0:
                self._iters[view] = iter(stream)
            else:
                loader = DataLoader(
                    stream,
                    batch_size=None,
                    num_workers=self.num_workers,
                    prefetch_factor=2,
                    worker_init_fn=_worker_init,
                    persistent_workers=False,
                    # page-locked batches from the loader's own thread, so the host-to-GPU copy is asynchronous
                    pin_memory=torch.cuda.is_available(),
                )
                self._iters[view] = iter(loader)
        return self._iters[view]

    def next_batch(self, view: str) -> dict:
        batch = self._take(view)
        if view == REGION and self.parallel_with_regions:
            pairs = self._take("text")
            batch.update({key: pairs[source] for key, source in PARALLEL_PAIR_KEYS.items()})
        return batch

    def _take(self, view: str) -> dict:
        if view not in self._streams:
            raise ValueError(f"view '{view}' is not available (have {self._streams})")
        state = self._state[view]
        while True:
            batch = from_wire(next(self._iterator(view)))
            meta = batch.pop(STREAM_KEY)
            state["workers"][str(int(meta["worker"]))] = {
                "epoch": int(meta["epoch"]),
                "offset": int(meta["offset"]),
                "skips": {k: int(v) for k, v in meta["skips"].items()},
            }
            if batch:  # an empty dict is a finite stream's trailer with its final skip counts
                state["batches"] += 1
                return batch

    def view_for_step(self, step: int) -> str:
        """The view of optimizer step ``step``, a pure function of (seed, step) so a resumed run picks the same
        views. "alternate": a draw weighted by the streams' ``weight``; "interleave": parallel text on even
        steps, image-caption on odd ones (the reference's order: its iteration does the text step first). With
        ``data.regions``, an image step is a region step with probability ``data.regions.prob``."""
        return self._region_or_image(step, self._base_view(step))

    def views_for_step(self, step: int) -> list[str]:
        """Every view of step ``step`` for the ``sum`` schedule (all views in one update): :attr:`views`, the
        image view a region view on a region step."""
        return [self._region_or_image(step, view) for view in self.views]

    def _base_view(self, step: int) -> str:
        if len(self.views) == 1:
            return self.views[0]
        if self.view_schedule == ViewSchedule.interleave:
            return "text" if int(step) % 2 == 0 else "image"
        weights = [float(self._stream_cfgs[v].weight) for v in self.views]
        draw = random.Random(derive_seed(self.seed, "view", int(step))).random() * sum(weights)
        return self.views[0] if draw < weights[0] else self.views[1]

    def _region_or_image(self, step: int, view: str) -> str:
        if view != "image" or self.regions is None:
            return view
        draw = random.Random(derive_seed(self.seed, REGION, int(step))).random()
        return REGION if draw < float(self.regions.prob) else view

    # -------------------------------------------------------------------------------------------- bookkeeping
    def skip_counts(self) -> dict[str, int]:
        """Skipped samples by reason, summed over views and workers (as of the batches taken so far)."""
        total: dict[str, int] = {}
        for state in self._state.values():
            for worker in state["workers"].values():
                for reason, n in worker["skips"].items():
                    total[reason] = total.get(reason, 0) + n
        return dict(sorted(total.items()))

    def _topology(self) -> dict:
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "resampled": bool(self.cfg.resampled),
            "seed": self.seed,
            "shards": {v: _fingerprint(u) for v, u in self._urls.items()},
            "shard_files": self._shard_files,
        }

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "topology": self._topology(),
            "reseed": self._reseed,
            "views": copy.deepcopy(self._state),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')!r} is not {STATE_VERSION}")
        self.close()
        saved, now = state["topology"], self._topology()
        views = {v: s for v, s in state["views"].items() if v in self._streams}
        # shard_files is not compared with a checkpoint of an earlier cclm, which did not record it
        changed = sorted(k for k in now if saved.get(k) != now[k] and (k != "shard_files" or k in saved))
        if changed:
            if not self.cfg.resampled:
                shown = [TOPOLOGY_NAMES.get(key, key) for key in changed]
                raise CheckpointError(
                    f"cannot resume the data stream exactly: {', '.join(shown)} changed since the "
                    "checkpoint (non-resampled mode promises no repeats/skips; restore the old "
                    "setting, or use data.resampled=true)"
                )
            log.warning("data topology changed (%s): resampled stream restarts with a fresh seed", changed)
            taken = sum(int(s["batches"]) for s in views.values())
            self._reseed = derive_seed(int(state.get("reseed", 0)), taken) or 1
            self._state = {v: {"batches": 0, "workers": {}} for v in self._streams}
            return
        self._reseed = int(state.get("reseed", 0))
        self._state = {v: {"batches": 0, "workers": {}} for v in self._streams}
        for view, s in views.items():
            self._state[view] = {
                "batches": int(s["batches"]),
                "workers": {str(k): dict(w) for k, w in s["workers"].items()},
            }

    def close(self) -> None:
        for it in self._iters.values():
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        self._iters.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown; nothing left to report to
            return
