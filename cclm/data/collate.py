"""Examples -> the batch dicts :meth:`cclm.model.cross_view.CrossViewModel.forward` takes (see its docstring).

Every text (a caption, both sides of a parallel pair) first goes through the model's configured normaliser
(``model.text.normalize``, :func:`cclm.data.normalize.normalizer_for`): the identity by default, which leaves
case and punctuation to the tokenizer, or the reference's ``pre_caption`` (lower-case, punctuation removed).
Tokenisation is then by tokens (``truncation=True, max_length``); with an XLM-R-style tokenizer that is ``<s>``,
at most ``max_length - 2`` tokens and ``</s>``, the layout of the CCLM reference's ``[CLS] + tokens[:max_tokens
- 1]`` cut to ``max_tokens - 1`` plus EOS. Padding is to the longest sequence of the batch. ``max_length`` and the
MLM masking spec may differ per view (``"image"``: the caption; ``"text"``: both sides of a pair). MLM masking
(:mod:`cclm.data.masking`) runs here, i.e. in the loader workers, with a generator seeded per batch so that a
resumed stream masks exactly as the uninterrupted one would have. The batch's ``texts`` / ``other_texts`` are the
texts as read, before the normaliser.

Images: the batch tensor is [B,3,H,W] in channels-last memory (``torch.channels_last``: each pixel's three
bytes side by side, as the decoded HWC arrays hold them), so making it is one plain copy of each example's array
instead of a transposing one (about half the collation time). Every operation sees the [B,3,H,W] shape; the
model's first step turns it into floats. Inside a DataLoader worker the tensor is allocated in shared memory (as
torch's ``default_collate`` does), so handing the batch to the main process does not copy it again. Its pages are
populated with one ``madvise(MADV_POPULATE_WRITE)`` call (Linux 5.14+) before the copy instead of faulting in one by
one: allocating and filling a 64-image 224 px batch takes about 4.5 ms instead of 8 (elsewhere the pages fault in
as before).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import mmap
import random
import sys
from collections.abc import Mapping

import numpy as np
import torch
from torch.utils.data import get_worker_info

from cclm.data.masking import MaskingSpec, mask_tokens
from cclm.data.normalize import Normalizer, normalize_all
from cclm.data.tokenize import BatchEncoder

VIEWS = ("image", "text")
REGION = "region"  # region batches read their texts with the image view's settings unless given their own


def group_id(key: str) -> int:
    """A stable signed 64-bit id for a sample key (equal keys = same image / same sentence pair)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little", signed=True)


MADV_POPULATE_WRITE = 23  # <linux/mman.h>, Linux 5.14+


@functools.cache
def _madvise():
    if not sys.platform.startswith(
        "linux"
    ):  # the advice number is Linux's; elsewhere it means something else
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):  # no C library to call (not Linux/glibc-like)
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def populate(storage: torch.UntypedStorage) -> bool:
    """Fault in every page of a freshly mapped (shared-memory) ``storage`` for writing, in one system call.
    False where the kernel or platform cannot (the pages then fault in on first write, as without it); the
    contents are unchanged either way."""
    madvise = _madvise()
    if madvise is None or storage.nbytes() == 0:
        return False
    start = storage.data_ptr() & ~(mmap.PAGESIZE - 1)  # whole pages of the storage's own mapping
    return madvise(start, storage.data_ptr() + storage.nbytes() - start, MADV_POPULATE_WRITE) == 0


def stack_images(arrays: list[np.ndarray]) -> torch.Tensor:
    """uint8 HWC arrays of one shape -> a uint8 tensor [B, C, H, W] in channels-last memory (see the module
    docstring)."""
    shape = (len(arrays), *arrays[0].shape)
    if get_worker_info() is not None:
        storage = torch.UntypedStorage._new_shared(math.prod(shape))
        populate(storage)
        images = torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)
    else:
        images = torch.empty(shape, dtype=torch.uint8)
    out = images.numpy()
    for i, array in enumerate(arrays):
        out[i] = array
    return images.permute(0, 3, 1, 2)


def _per_view(value, name: str) -> dict:
    """One value for every view, or a mapping that names each of the two views (and optionally "region")."""
    if isinstance(value, Mapping):
        missing = [v for v in VIEWS if v not in value]
        if missing:
            raise ValueError(f"Collator: {name} names no value for view(s) {missing}")
        return {**{v: value[v] for v in VIEWS}, REGION: value.get(REGION, value["image"])}
    return dict.fromkeys((*VIEWS, REGION), value)


class Collator:
    """Batches of either view, and region batches. ``max_length`` and ``masking`` are one value for every view
    or a mapping ``{"image": ..., "text": ...}`` (and ``"region"``, else the image view's); ``normalizer`` (str -> str, picklable for loader workers) is applied to
    every text before tokenising (None: the identity)."""

    def __init__(
        self,
        tokenizer,
        max_length: int | Mapping[str, int],
        masking: MaskingSpec | Mapping[str, MaskingSpec],
        normalizer: Normalizer | None = None,
    ):
        self.tokenizer = tokenizer
        self._encode = BatchEncoder(tokenizer)
        self.max_length = {v: int(n) for v, n in _per_view(max_length, "max_length").items()}
        self.masking = _per_view(masking, "masking")
        self.normalizer = normalizer

    def _tokenize(self, texts: list[str], view: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.normalizer is not None:
            texts = normalize_all(self.normalizer, texts)
        return self._encode(texts, self.max_length[view])

    def _text_fields(self, texts: list[str], seed: int, view: str) -> dict:
        ids, mask = self._tokenize(texts, view)
        generator = torch.Generator().manual_seed(seed)
        mlm_ids, mlm_labels = mask_tokens(ids, self.masking[view], generator, attention_mask=mask)
        return {"text_ids": ids, "text_mask": mask, "mlm_ids": mlm_ids, "mlm_labels": mlm_labels}

    def image_batch(self, examples: list[dict], seed: int) -> dict:
        batch = {
            "images": stack_images([e["image"] for e in examples]),
            **self._text_fields([e["text"] for e in examples], seed, "image"),
        }
        batch["group_ids"] = torch.tensor([group_id(e["key"]) for e in examples], dtype=torch.int64)
        batch["langs"] = [e["lang"] for e in examples]
        batch["keys"] = [e["key"] for e in examples]
        batch["texts"] = [e["text"] for e in examples]
        return batch

    def text_batch(self, examples: list[dict], seed: int) -> dict:
        batch = self._text_fields([e["text"] for e in examples], seed, "text")
        batch["other_ids"], batch["other_mask"] = self._tokenize([e["other"] for e in examples], "text")
        batch["group_ids"] = torch.tensor([group_id(e["key"]) for e in examples], dtype=torch.int64)
        batch["langs"] = [e["lang"] for e in examples]
        batch["other_langs"] = [e["other_lang"] for e in examples]
        batch["keys"] = [e["key"] for e in examples]
        batch["texts"] = [e["text"] for e in examples]
        batch["other_texts"] = [e["other"] for e in examples]
        return batch

    def region_batch(self, examples: list[dict], seed: int, batch_size: int) -> dict:
        """Region examples (:func:`cclm.data.regions.region_example`) -> a region batch: ``batch_size`` of their
        targets (:func:`cclm.data.regions.collate_regions`, drawn with ``seed``) with the text fields, tokenised
        and masked as the image view's. Without ``image_atts``: the model draws them from ``boxes`` on its own
        token grid."""
        from cclm.data.regions import collate_regions  # regions builds on this module

        batch = collate_regions(examples, batch_size, random.Random(seed))
        batch.update(self._text_fields(batch["texts"], seed, REGION))
        return batch
