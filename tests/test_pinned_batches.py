"""Batches reach a GPU asynchronously only from page-locked memory (issue 16): the training data loaders pin
their batches in the loader's own thread whenever CUDA is present, and never on a CPU-only machine (where
pinning has nothing to do)."""

from __future__ import annotations

import pytest
import torch

from cclm.data import pipeline
from cclm.runtime import sources


class _Captured(Exception):
    pass


def _capture(monkeypatch, module) -> dict:
    seen: dict = {}

    def fake_loader(*args, **kwargs):
        seen.update(kwargs)
        raise _Captured

    monkeypatch.setattr(module, "DataLoader", fake_loader)
    return seen


@pytest.mark.parametrize("cuda", [True, False])
def test_pretraining_batches_are_pinned_exactly_when_cuda_is_there(
    monkeypatch, cuda, tmp_path, tiny_tokenizer
):
    from tests.test_data_pipeline import data_cfg, write_image_shards

    write_image_shards(tmp_path / "ic", n=4, per_shard=4)
    # one worker: the loader path (the inline path of num_workers=0 has no loader thread to pin in)
    cfg = data_cfg(image=tmp_path / "ic" / "shard-000000.tar", num_workers=1)
    data = pipeline.PretrainData(cfg, tiny_tokenizer, 16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    seen = _capture(monkeypatch, pipeline)
    with pytest.raises(_Captured):
        data.next_batch("image")
    assert seen["pin_memory"] is cuda


@pytest.mark.parametrize("cuda", [True, False])
def test_task_batches_are_pinned_exactly_when_cuda_is_there(monkeypatch, cuda):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    seen = _capture(monkeypatch, sources)
    batches = sources.EpochBatches(list(range(8)), batch_size=4, collate_fn=list, seed=0, num_workers=0)
    with pytest.raises(_Captured):
        batches.next_batch()
    assert seen["pin_memory"] is cuda
