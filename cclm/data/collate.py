"""Examples -> the batch dicts :meth:`cclm.model.cross_view.CrossViewModel.forward` takes (see its docstring).

Tokenisation is by tokens (``truncation=True, max_length``) with the tokenizer's own normalisation: no
lowercasing or punctuation stripping, which would damage cased multilingual vocabularies. Padding is to the
longest sequence of the batch. MLM masking (:mod:`cclm.data.masking`) runs here, i.e. in the loader workers, with a
generator seeded per batch so that a resumed stream masks exactly as the uninterrupted one would have.

Images: each example's HWC array is copied once, transposed, straight into the batch tensor [B,3,H,W]; inside a
DataLoader worker that tensor is allocated in shared memory (as torch's ``default_collate`` does), so handing
the batch to the main process does not copy it again.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
from torch.utils.data import get_worker_info

from cclm.data.masking import MaskingSpec, mask_tokens


def group_id(key: str) -> int:
    """A stable signed 64-bit id for a sample key (equal keys = same image / same sentence pair)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little", signed=True)


def stack_images(arrays: list[np.ndarray]) -> torch.Tensor:
    """uint8 HWC arrays of one shape -> a contiguous uint8 tensor [B, C, H, W] (see the module docstring)."""
    height, width, channels = arrays[0].shape
    shape = (len(arrays), channels, height, width)
    if get_worker_info() is not None:
        storage = torch.UntypedStorage._new_shared(math.prod(shape))
        images = torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)
    else:
        images = torch.empty(shape, dtype=torch.uint8)
    out = images.numpy()
    for i, array in enumerate(arrays):
        out[i] = array.transpose(2, 0, 1)
    return images


class Collator:
    def __init__(self, tokenizer, max_length: int, masking: MaskingSpec):
        self.tokenizer, self.max_length, self.masking = tokenizer, max_length, masking

    def _tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(
            texts, padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return enc["input_ids"].long(), enc["attention_mask"].long()

    def _text_fields(self, texts: list[str], seed: int) -> dict:
        ids, mask = self._tokenize(texts)
        generator = torch.Generator().manual_seed(seed)
        mlm_ids, mlm_labels = mask_tokens(ids, self.masking, generator)
        return {"text_ids": ids, "text_mask": mask, "mlm_ids": mlm_ids, "mlm_labels": mlm_labels}

    def image_batch(self, examples: list[dict], seed: int) -> dict:
        batch = {
            "images": stack_images([e["image"] for e in examples]),
            **self._text_fields([e["text"] for e in examples], seed),
        }
        batch["group_ids"] = torch.tensor([group_id(e["key"]) for e in examples], dtype=torch.int64)
        batch["langs"] = [e["lang"] for e in examples]
        batch["keys"] = [e["key"] for e in examples]
        batch["texts"] = [e["text"] for e in examples]
        return batch

    def text_batch(self, examples: list[dict], seed: int) -> dict:
        batch = self._text_fields([e["text"] for e in examples], seed)
        batch["other_ids"], batch["other_mask"] = self._tokenize([e["other"] for e in examples])
        batch["group_ids"] = torch.tensor([group_id(e["key"]) for e in examples], dtype=torch.int64)
        batch["langs"] = [e["lang"] for e in examples]
        batch["other_langs"] = [e["other_lang"] for e in examples]
        batch["keys"] = [e["key"] for e in examples]
        batch["texts"] = [e["text"] for e in examples]
        batch["other_texts"] = [e["other"] for e in examples]
        return batch
