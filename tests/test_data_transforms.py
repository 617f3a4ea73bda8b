"""Transforms: draft-mode decoding matches a full decode, crops follow torchvision's rules, side words block the
flip in each language, and randomness comes only from the generator passed in."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image

from cclm.data.transforms import (
    EvalTransform,
    TrainTransform,
    decode_crop,
    flip_allowed,
    mentions_side,
    random_resized_box,
)


def photo_like(width=640, height=480) -> bytes:
    x = np.linspace(0, 6, width)[None, :] + np.zeros((height, 1))
    y = np.linspace(0, 4, height)[:, None] + np.zeros((1, width))
    pixels = np.stack([128 + 100 * np.sin(x + y), 128 + 100 * np.cos(x * 1.3), 128 + 90 * np.sin(y * 2)], -1)
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def test_draft_decode_matches_full_decode_of_the_crop():
    data = photo_like()
    box = (100, 50, 500, 450)
    fast = np.asarray(decode_crop(data, 64, lambda w, h: box)).astype(int)
    full = Image.open(io.BytesIO(data)).convert("RGB").crop(box).resize((64, 64), Image.Resampling.BICUBIC)
    assert np.abs(fast - np.asarray(full).astype(int)).mean() < 3


def test_random_resized_box_respects_scale_and_ratio():
    rng = random.Random(0)
    for _ in range(200):
        left, top, right, bottom = random_resized_box(640, 480, rng, (0.3, 1.0))
        w, h = right - left, bottom - top
        assert 0 <= left and right <= 640 and 0 <= top and bottom <= 480
        assert 0.3 * 640 * 480 * 0.97 <= w * h <= 640 * 480
        assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02


@pytest.mark.parametrize(
    ("text", "lang", "side"),
    [
        ("a red circle on the left", "en", True),
        ("a bright red circle", "en", False),
        ("ein roter Kreis links von einem Quadrat", "de", True),
        ("un cercle à droite", "fr", True),
        ("un círculo a la izquierda", "es", True),
        ("左に大きい赤い丸", "ja", True),
        ("蓝色正方形的上面有一个红色圆形", "zh", False),
        ("copyright reserved", "en", False),  # "right" inside a word is not a side
    ],
)
def test_side_words(text, lang, side):
    assert mentions_side(text, lang) is side
    assert flip_allowed(text, lang) is (not side)


def test_unknown_languages_are_never_flipped():
    assert mentions_side("anything", "xx") is None and not flip_allowed("anything", "xx")


def test_train_transform_never_flips_side_captions_and_is_seeded():
    data = photo_like(96, 96)
    transform = TrainTransform(32, scale_min=1.0, hflip=True)
    for seed in range(20):
        left = transform(data, "on the left", "en", random.Random(seed))
        plain = transform(data, "a circle", "en", random.Random(seed))
        unflipped = EvalTransform(32)(data)
        rng = random.Random(seed)
        random_resized_box(96, 96, rng, (1.0, 1.0))
        flips = rng.random() < 0.5
        # a square image with scale 1 and aspect ~1 gives (nearly) the whole image
        assert np.abs(left.astype(int) - unflipped.astype(int)).mean() < 12
        if flips:
            assert np.abs(plain.astype(int) - unflipped[:, ::-1].astype(int)).mean() < 12
        np.testing.assert_array_equal(plain, transform(data, "a circle", "en", random.Random(seed)))
    augmented = TrainTransform(32, randaugment=True)
    a = augmented(data, "x", "en", random.Random(3))
    np.testing.assert_array_equal(a, augmented(data, "x", "en", random.Random(3)))


def test_batch_images_are_the_transposed_arrays_in_shared_memory_inside_a_worker(monkeypatch):
    import torch

    import cclm.data.collate as collate

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (5, 7, 3), dtype=np.uint8) for _ in range(4)]
    arrays[1] = arrays[1][:, ::-1]  # a flipped training image is a mirrored view
    expected = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    in_process = collate.stack_images(arrays)
    assert torch.equal(in_process, expected) and in_process.is_contiguous() and not in_process.is_shared()
    # in a DataLoader worker the batch is built in shared memory, so sending it to the main process copies nothing
    monkeypatch.setattr(collate, "get_worker_info", lambda: object())
    in_worker = collate.stack_images(arrays)
    assert torch.equal(in_worker, expected) and in_worker.is_contiguous() and in_worker.is_shared()


def test_reusing_image_buffers_changes_no_pixel_and_never_lowers_a_larger_limit():
    from cclm.data.transforms import WORKER_IMAGE_BUFFERS, reuse_image_buffers

    data = photo_like(300, 200)
    before = TrainTransform(64)(data, "a circle", "en", random.Random(1))
    limit = Image.core.get_blocks_max()
    try:
        Image.core.set_blocks_max(0)
        reuse_image_buffers()
        assert Image.core.get_blocks_max() == WORKER_IMAGE_BUFFERS
        for _ in range(3):  # decode with recycled (dirty) buffers
            np.testing.assert_array_equal(
                TrainTransform(64)(data, "a circle", "en", random.Random(1)), before
            )
        Image.core.set_blocks_max(WORKER_IMAGE_BUFFERS + 5)
        reuse_image_buffers()
        assert Image.core.get_blocks_max() == WORKER_IMAGE_BUFFERS + 5
    finally:
        Image.core.set_blocks_max(limit)


def test_a_flip_mirrors_the_unflipped_crop_exactly():
    data = photo_like(300, 200)
    flipped = 0
    for seed in range(12):
        out = TrainTransform(48, hflip=True)(data, "a circle", "en", random.Random(seed))
        plain = TrainTransform(48, hflip=False)(data, "a circle", "en", random.Random(seed))
        flipped += not np.array_equal(out, plain)
        assert np.array_equal(out, plain) or np.array_equal(out, plain[:, ::-1])
    assert 0 < flipped < 12
