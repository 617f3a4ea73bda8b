"""A resumable stream of batches over WebDataset shards (one view), for a ``torch`` DataLoader.

Per epoch the shard list is shuffled with ``(seed, epoch)`` and dealt out to ``world_size x num_workers`` global
workers (global worker = ``rank * num_workers + worker``); with fewer shards than global workers, every worker
reads all shards and keeps every n-th sample instead. Each worker streams its shards' raw samples through a
seeded shuffle buffer, then decodes, tokenises, masks and batches them itself, so a DataLoader with
``batch_size=None`` just forwards finished batches (their small tensors inlined: :mod:`cclm.data.transfer`).
Epochs follow each other inside a worker without a break (a batch may span two epochs), so no shard is re-read to
fill a last batch.

Resampled mode (multi-node runs with many shards): each global worker draws its shards with replacement, in
blocks of ``ceil(shards / global workers)`` draws seeded by ``(seed, worker, block)``; a block plays the role
of an epoch.

Exact resume. Everything random is a function of the seed and a sample's *position*: (epoch, index in the
worker's shuffled stream). Every batch carries the position after its last sample; a resumed worker replays its
current epoch's raw samples through the same shuffle buffer and drops everything before that position without
decoding it. The DataLoader takes batches from its workers round-robin, so a resumed loader is rotated to start
at the worker that was next. The guarantee holds in both modes as long as the seed, shards, world size and
number of workers are unchanged (see :mod:`cclm.data.pipeline`).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from torch.utils.data import IterableDataset, get_worker_info

from cclm.data.shards import iter_tar_samples
from cclm.data.skips import SkipCounter, SkipSample
from cclm.data.transfer import to_wire
from cclm.data.transforms import reuse_image_buffers
from cclm.errors import DataError

STREAM_KEY = "_stream"
# An example may carry counts of parts of its sample it left out ({reason: n}, e.g. a region sample's unusable
# regions); the stream adds them to its skip counts.
DROPPED_KEY = "dropped"


def derive_seed(*parts) -> int:
    """A 63-bit seed from any mix of ints and strings (stable across processes, unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


def buffered_shuffle(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Reservoir-style shuffle with a buffer of ``size`` items (``size <= 1``: keep the order)."""
    if size <= 1:
        yield from items
        return
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(size)
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


@dataclass
class StreamPlan:
    view: str
    urls: list[str]
    sizes: dict[str, int | None]
    batch_size: int
    seed: int = 42
    rank: int = 0
    world_size: int = 1
    num_workers: int = 1  # logical workers: max(1, DataLoader workers)
    shard_shuffle: bool = True
    shuffle_buffer: int = 1000
    resampled: bool = False
    epochs: int | None = None  # None = endless
    start: dict[int, dict] = field(default_factory=dict)  # logical worker -> {"epoch", "offset", "skips"}
    rotation: int = 0  # physical worker w plays logical worker (w + rotation) % num_workers
    languages: str = ""  # the stream's language filter as configured (``data.image_caption.languages=[de]``)

    @property
    def global_workers(self) -> int:
        return self.world_size * self.num_workers

    @property
    def split_by_sample(self) -> bool:
        return not self.resampled and len(self.urls) < self.global_workers


class ShardStream(IterableDataset):
    """Yields finished batches (dicts) with a ``_stream`` entry: ``{"worker", "epoch", "offset", "skips"}``."""

    def __init__(
        self,
        plan: StreamPlan,
        make_example: Callable[[dict, random.Random], dict],
        collate: Callable[[list[dict], int], dict],
    ):
        super().__init__()
        if not plan.urls:
            raise ValueError(f"{plan.view}: no shards to read")
        if plan.batch_size < 1:
            raise ValueError(f"{plan.view}: batch_size must be >= 1")
        self.plan, self.make_example, self.collate = plan, make_example, collate

    # ------------------------------------------------------------------------------------------- shard plans
    def epoch_shards(self, epoch: int, global_worker: int) -> list[str]:
        p = self.plan
        if p.resampled:
            rng = random.Random(derive_seed(p.seed, p.view, "resample", global_worker, epoch))
            return [rng.choice(p.urls) for _ in range(math.ceil(len(p.urls) / p.global_workers))]
        order = list(p.urls)
        if p.shard_shuffle:
            random.Random(derive_seed(p.seed, p.view, "shards", epoch)).shuffle(order)
        return order if p.split_by_sample else order[global_worker :: p.global_workers]

    def raw_samples(self, epoch: int, global_worker: int) -> Iterator[dict]:
        p = self.plan
        index = 0
        for url in self.epoch_shards(epoch, global_worker):
            for sample in iter_tar_samples(url, p.sizes.get(url)):
                if not p.split_by_sample or index % p.global_workers == global_worker:
                    yield sample
                index += 1

    def any_usable(self, epoch: int, read: frozenset[str] = frozenset()) -> bool:
        """Whether any sample of any shard but ``read`` (shards this reader just read whole in vain) is usable:
        asked once after an epoch in which this reader found none. It takes the shards in the epoch's shuffled
        order and stops at the first usable sample: at most one pass over the data, and a few shards where only
        part of the data is usable (a language filter over a mix of corpora)."""
        p = self.plan
        order = list(p.urls)
        random.Random(derive_seed(p.seed, p.view, "shards", epoch)).shuffle(order)
        for url in order:
            if url in read:
                continue
            for sample in iter_tar_samples(url, p.sizes.get(url)):
                try:
                    self.make_example(sample, random.Random(0))
                except SkipSample:
                    continue
                return True
        return False

    # ------------------------------------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical, count = (info.id, info.num_workers) if info is not None else (0, 1)
        if count != self.plan.num_workers:
            raise RuntimeError(f"stream planned for {self.plan.num_workers} workers but runs in {count}")
        batches = self.worker_batches((physical + self.plan.rotation) % count)
        if info is None:
            yield from batches
            return
        reuse_image_buffers()  # a loader worker: the process is ours to tune
        for batch in batches:  # the consumer (PretrainData) undoes this with transfer.from_wire
            yield to_wire(batch)

    def worker_batches(self, worker: int) -> Iterator[dict]:
        p = self.plan
        global_worker = p.rank * p.num_workers + worker
        start = p.start.get(worker, {})
        start_epoch, start_offset = int(start.get("epoch", 0)), int(start.get("offset", 0))
        skips = SkipCounter(start.get("skips"), where=f"{p.view} rank {p.rank} worker {worker}")
        pending: list[dict] = []
        epoch = start_epoch
        while p.epochs is None or epoch < p.epochs:
            rng = random.Random(derive_seed(p.seed, p.view, "shuffle", global_worker, epoch))
            stream = buffered_shuffle(self.raw_samples(epoch, global_worker), p.shuffle_buffer, rng)
            skip_until = start_offset if epoch == start_epoch else 0
            index, usable = -1, 0
            for index, sample in enumerate(stream):
                if index < skip_until:
                    continue  # fast-forward: already consumed before the restart; not decoded
                sample_rng = random.Random(derive_seed(p.seed, p.view, "sample", global_worker, epoch, index))
                try:
                    example = self.make_example(sample, sample_rng)
                except SkipSample as skip:
                    skips.add(skip.reason, skip.detail)
                else:
                    for reason, n in (example.pop(DROPPED_KEY, None) or {}).items():
                        skips.add(reason, sample.get("__key__", ""), n=n)
                    pending.append(example)
                    usable += 1
                if len(pending) == p.batch_size:
                    yield self._emit(pending, worker, global_worker, epoch, index + 1, skips)
                    pending = []
            # (a resumed epoch used its samples before the restart)
            if not usable and p.epochs is None and skip_until == 0:
                self._check_not_starved(index < 0, global_worker, epoch, skips)
            epoch += 1
        # Only reached with a finite number of epochs: the last partial batch, or a trailer carrying the final
        # skip counts (skips after the last full batch would otherwise go unreported).
        if pending:
            yield self._emit(pending, worker, global_worker, epoch, 0, skips)
        else:
            yield {STREAM_KEY: {"worker": worker, "epoch": epoch, "offset": 0, "skips": skips.as_dict()}}

    def _check_not_starved(self, kept_none: bool, global_worker: int, epoch: int, skips: SkipCounter) -> None:
        """After an epoch without a usable sample, an endless stream fails if this worker can never yield again: no
        sample of any shard is usable. One bounded pass (:meth:`any_usable`) tells, as skip reasons (a missing
        caption, a filtered language, a damaged shard) do not change between epochs. One damaged or empty shard
        among good ones only costs the epoch it is dealt in (the worker goes on with the next), so it never stops
        a multi-GPU run; a fixed deal (``shard_shuffle`` off) that is all bad fails at once, as no later epoch
        changes it. With fewer shards than readers (each keeps every n-th sample) it also fails when this reader's
        n-th position is past the end of the data (``kept_none``). A resumed epoch does not count (its samples
        before the restart were not looked at)."""
        p = self.plan
        fixed_deal = not p.resampled and not p.shard_shuffle
        if p.split_by_sample and kept_none:
            raise DataError(
                f"{p.view}: reader {global_worker} gets no sample: the {p.global_workers} readers (ranks x data "
                "workers) keep every n-th sample of fewer samples than that; use fewer data workers or more data"
            )
        # with fewer shards than readers, this reader kept only some samples of its shards
        read = frozenset() if p.split_by_sample else frozenset(self.epoch_shards(epoch, global_worker))
        if not fixed_deal and self.any_usable(epoch, read):
            return
        named = sorted(self.epoch_shards(epoch, global_worker) if fixed_deal else set(p.urls))
        shards = ", ".join(named[:3]) + (f" and {len(named) - 3} more" if len(named) > 3 else "")
        check = f"check {p.languages} against the shards" if p.languages else "check the shards"
        if p.languages and p.view == "text":
            check += "; a pair is read only when both its languages are listed"
        what = (
            f"{len(named)} shard(s) dealt to worker {global_worker}"
            if fixed_deal
            else f"all {len(named)} shard(s)"
        )
        raise DataError(
            f"{p.view}: no usable sample in {what} (up to epoch {epoch}; skipped: {skips.as_dict() or 'none'}; "
            f"shards: {shards}); the stream would never yield a batch ({check})"
        )

    def _emit(self, examples, worker, global_worker, epoch, offset, skips: SkipCounter) -> dict:
        p = self.plan
        batch = self.collate(examples, derive_seed(p.seed, p.view, "mask", global_worker, epoch, offset))
        batch[STREAM_KEY] = {"worker": worker, "epoch": epoch, "offset": offset, "skips": skips.as_dict()}
        return batch
