"""A batch crosses from a loader worker to the main process with its small tensors pickled inline and its images
in shared memory (cclm.data.transfer): what arrives is exactly what the collator made."""

from __future__ import annotations

import io
import pickle
from multiprocessing.reduction import ForkingPickler

import pytest
import torch
import torch.multiprocessing  # noqa: F401  (registers torch's shared-memory reductions with ForkingPickler)
from torch.utils.data._utils.pin_memory import pin_memory

from cclm.data.pipeline import PretrainData
from cclm.data.stream import STREAM_KEY
from cclm.data.transfer import INLINE_BYTES, Inline, from_wire, to_wire
from tests.test_data_pipeline import data_cfg, write_image_shards, write_parallel_shards


def sent(batch: dict) -> dict:
    """What the main process unpickles from a worker's queue."""
    buffer = io.BytesIO()
    ForkingPickler(buffer, pickle.HIGHEST_PROTOCOL).dump(batch)
    return pickle.loads(buffer.getvalue())


def sample_batch() -> dict:
    images = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(2 * 4 * 4 * 3))
    return {
        "images": images.view(2, 4, 4, 3).permute(0, 3, 1, 2),
        "text_ids": torch.arange(10, dtype=torch.int64).view(2, 5),
        "text_mask": torch.ones(2, 5, dtype=torch.int64),
        "is_image": torch.tensor([True, False]),
        "boxes": torch.rand(2, 4),
        "big": torch.zeros(INLINE_BYTES // 4 + 1, dtype=torch.float32),
        "langs": ["en", "de"],
        STREAM_KEY: {"worker": 0, "epoch": 0, "offset": 2, "skips": {}},
    }


def test_small_tensors_travel_inline_and_come_back_identical():
    batch = sample_batch()
    wire = to_wire(batch)
    inlined = {key for key, value in wire.items() if isinstance(value, Inline)}
    # shared-memory images and a tensor above the limit keep torch's shared-memory path
    assert inlined == {"text_ids", "text_mask", "is_image", "boxes"}
    back = from_wire(sent(wire))
    assert back.keys() == batch.keys()
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            assert back[key].dtype == value.dtype and back[key].shape == value.shape
            assert torch.equal(back[key], value), key
        else:
            assert back[key] == value


def test_the_pinning_thread_pins_an_inlined_field_as_a_tensor(monkeypatch):
    pinned = []

    def fake_pin(self, *args, **kwargs):  # a CPU-only build cannot pin: record what would be pinned
        pinned.append(self)
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    out = from_wire(pin_memory(sent(to_wire(sample_batch()))))
    assert all(isinstance(out[key], torch.Tensor) for key in ("text_ids", "text_mask", "is_image", "boxes"))
    assert len(pinned) == 6  # the four inlined fields and the two tensors sent through shared memory
    assert torch.equal(out["text_ids"], torch.arange(10).view(2, 5))


@pytest.mark.parametrize("view", ["image", "text"])
def test_a_loader_workers_batches_equal_the_same_stream_read_in_process(tmp_path, tiny_tokenizer, view):
    write_image_shards(tmp_path / "ic", n=12, per_shard=4)
    write_parallel_shards(tmp_path / "pt", n=12, per_shard=4)
    cfg = data_cfg(image=tmp_path / "ic", text=tmp_path / "pt", num_workers=1, image_bs=4)
    loaded = PretrainData(cfg, tiny_tokenizer, 32, image_size=16, epochs=1)
    raw = next(loaded._iterator(view))  # as the worker sent it
    assert isinstance(raw["text_ids"], Inline)
    if view == "image":
        assert isinstance(raw["images"], torch.Tensor) and raw["images"].is_shared()
    first = from_wire(raw)
    first.pop(STREAM_KEY)
    from_loader = [first] + [loaded.next_batch(view) for _ in range(2)]
    loaded.close()

    reference = PretrainData(cfg, tiny_tokenizer, 32, image_size=16, epochs=1)
    in_process = []
    for batch in reference._stream(view):  # the same plan (one worker), read without a loader
        batch.pop(STREAM_KEY)
        in_process += [batch] if batch else []
        if len(in_process) == 3:
            break
    assert len(from_loader) == len(in_process) == 3
    for ours, expected in zip(from_loader, in_process):
        assert ours.keys() == expected.keys()
        for key, value in expected.items():
            if isinstance(value, torch.Tensor):
                assert isinstance(ours[key], torch.Tensor) and ours[key].dtype == value.dtype, key
                assert torch.equal(ours[key], value), key
            else:
                assert ours[key] == value, key


def test_tensors_numpy_cannot_hold_as_they_are_keep_the_shared_memory_path():
    batch = {
        "bf16": torch.ones(3, dtype=torch.bfloat16),
        "fp8": torch.zeros(3).to(torch.float8_e4m3fn),
        "conj": torch.tensor([1 + 2j]).conj(),
        "sparse": torch.eye(3).to_sparse(),
        "grad": torch.ones(2, requires_grad=True),
        "plain": torch.ones(2),
    }
    wire = to_wire(batch)
    assert [key for key, value in wire.items() if isinstance(value, Inline)] == ["plain"]
