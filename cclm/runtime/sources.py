"""A resumable batch source over a map-style dataset, epoch after epoch, for the trainer (fine-tuning, cViL).

Each epoch's order is a permutation drawn from ``seed + epoch`` (never from the global RNG), split across ranks
like ``DistributedSampler`` (padded so that every rank takes the same number of batches), and the position
inside the epoch is part of the state: a resumed run starts at the next unseen batch, without decoding the
ones before it. DataLoader workers get their seeds from the same per-epoch generator.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset


class EpochBatches:
    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        collate_fn: Callable[[list[Any]], dict[str, Any]],
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = False,
        num_workers: int = 0,
        view: str = "task",
    ):
        if len(dataset) == 0:
            raise ValueError("no training examples")
        self.dataset, self.batch_size, self.collate_fn = dataset, int(batch_size), collate_fn
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.shuffle, self.drop_last, self.num_workers = shuffle, drop_last, num_workers
        self.views = (view,)
        self.epoch, self.position = 0, 0  # batches of this epoch already handed out
        self._iterator: Iterator | None = None

    # --------------------------------------------------------------------------------------------- order
    def _rank_indices(self, epoch: int) -> list[int]:
        n = len(self.dataset)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            order = list(range(n))
        total = math.ceil(n / self.world_size) * self.world_size
        order = (order * math.ceil(total / n))[:total]  # pad: every rank takes the same number of batches
        return order[self.rank :: self.world_size]

    def _batches(self, epoch: int) -> list[list[int]]:
        indices = self._rank_indices(epoch)
        batches = [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        if self.drop_last and len(batches) > 1 and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def __len__(self) -> int:
        """Batches per epoch on this rank (arithmetic: no permutation is drawn)."""
        per_rank = math.ceil(len(self.dataset) / self.world_size)
        full, rest = divmod(per_rank, self.batch_size)
        return full + (1 if rest and not (self.drop_last and full > 0) else 0)

    @property
    def epochs_done(self) -> float:
        """Epochs consumed so far, fractional (what evaluation records are stamped with)."""
        return self.epoch + self.position / len(self)

    def _open(self) -> Iterator:
        remaining = self._batches(self.epoch)[self.position :]
        loader = DataLoader(
            self.dataset,
            batch_sampler=remaining,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed + self.epoch),
            worker_init_fn=_ignore_stop_signal if self.num_workers else None,
            pin_memory=torch.cuda.is_available(),  # page-locked batches: asynchronous copies to the GPU
        )
        return iter(loader)

    # ---------------------------------------------------------------------------------------- the source
    def view_for_step(self, step: int) -> str:
        return self.views[0]

    def next_batch(self, view: str | None = None) -> dict[str, Any]:
        if self._iterator is None:
            self._iterator = self._open()
        try:
            batch = next(self._iterator)
        except StopIteration:
            self.epoch, self.position = self.epoch + 1, 0
            self._iterator = self._open()
            batch = next(self._iterator)
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.close()
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def close(self) -> None:
        self._iterator = None


class StageView:
    """One view of a source under another name: a recipe stage (``nlt``) drawing the text view of a
    :class:`cclm.data.pipeline.PretrainData`, so that the model's ``forward(batch, "nlt")`` gets its batches."""

    def __init__(self, source, name: str, view: str):
        self.source, self.name, self.view = source, name, view
        self.views = (name,)

    def view_for_step(self, step: int) -> str:
        return self.name

    def next_batch(self, view: str | None = None) -> dict[str, Any]:
        return self.source.next_batch(self.view)

    def state_dict(self) -> Any:
        return self.source.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.source.load_state_dict(state)

    def skip_counts(self) -> dict[str, int]:
        return self.source.skip_counts() if hasattr(self.source, "skip_counts") else {}

    def close(self) -> None:
        self.source.close()


def _ignore_stop_signal(_worker_id: int) -> None:
    """SLURM signals every process of a job step: the trainer handles SIGUSR1 (save and stop), a worker ignores
    it."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
