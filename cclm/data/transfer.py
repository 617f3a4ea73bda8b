"""How a batch crosses from a DataLoader worker to the main process.

torch sends every tensor of a worker's batch through shared memory. Under its default ``file_descriptor``
strategy each tensor's descriptor travels over its own authenticated socket connection (multiprocessing's resource
sharer): about 1 ms of CPU a tensor between the two processes, more than the tensor itself is worth for the small
integer fields of a batch (token ids, attention masks, MLM labels, group ids: ~20 KB each at batch 64). So a
worker sends a tensor of at most :data:`INLINE_BYTES` that is not already in shared memory as a plain array inside
the pickled batch (:func:`to_wire`), and the main process turns it back into a tensor without another copy
(:func:`from_wire`); the images, which the collator builds in shared memory, still travel as one descriptor. With
``pin_memory`` the loader's pinning thread pins an inlined field as it pins a tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

INLINE_BYTES = 1 << 20


@dataclass(frozen=True)
class Inline:
    """A small CPU tensor's values as a numpy array, pickled with the batch instead of through shared memory."""

    array: np.ndarray

    def tensor(self) -> torch.Tensor:
        return torch.from_numpy(self.array)

    def pin_memory(self, *_args, **_kwargs) -> torch.Tensor:
        """What the DataLoader's pinning thread calls for an object that has this method."""
        return self.tensor().pin_memory()


# dtypes numpy holds as they are (not bfloat16, the float8s, quantized or complex32 ones)
NUMPY_DTYPES = frozenset(
    {
        torch.bool,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.float16,
        torch.float32,
        torch.float64,
        torch.complex64,
        torch.complex128,
    }
)


def _inlined(value) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and value.device.type == "cpu"
        and value.layout == torch.strided
        and value.dtype in NUMPY_DTYPES
        and not value.is_shared()
        and not value.requires_grad
        and not value.is_conj()
        and not value.is_neg()
        and value.nbytes <= INLINE_BYTES
    )


def to_wire(batch: dict) -> dict:
    """In a loader worker: the batch with its small tensors as :class:`Inline` arrays (other values as they are)."""
    return {key: Inline(value.numpy()) if _inlined(value) else value for key, value in batch.items()}


def from_wire(batch: dict) -> dict:
    """In the main process: the batch as the collator made it (every :class:`Inline` a tensor again)."""
    return {key: value.tensor() if isinstance(value, Inline) else value for key, value in batch.items()}
