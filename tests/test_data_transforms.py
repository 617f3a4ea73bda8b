"""Transforms: draft-mode decoding matches a full decode, crops follow torchvision's rules, side words block the
flip in each language, RandAugment's ops are the CCLM reference's (computed here with PIL directly), and randomness
comes only from the generator passed in."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

import cclm.data.transforms as transforms
from cclm.data.transforms import (
    RANDAUGMENT_OPS,
    EvalTransform,
    RandAugment,
    TrainTransform,
    apply_op,
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


def test_batch_images_are_the_arrays_in_channels_last_memory_and_shared_memory_inside_a_worker(monkeypatch):
    import torch

    import cclm.data.collate as collate

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (5, 7, 3), dtype=np.uint8) for _ in range(4)]
    arrays[1] = arrays[1][:, ::-1]  # any strided array (here a mirrored view) is copied as it reads
    expected = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    def check(images):
        assert images.shape == (4, 3, 5, 7) and torch.equal(images, expected)
        # one plain copy per image: the batch's memory is the HWC arrays one after the other
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert images.untyped_storage().nbytes() == expected.numel()
        flat = torch.frombuffer(bytearray(bytes(images.untyped_storage())), dtype=torch.uint8)
        assert torch.equal(flat, torch.from_numpy(np.stack(arrays).reshape(-1)))

    in_process = collate.stack_images(arrays)
    check(in_process)
    assert not in_process.is_shared()
    # in a DataLoader worker the batch is built in shared memory, so sending it to the main process copies nothing
    monkeypatch.setattr(collate, "get_worker_info", lambda: object())
    in_worker = collate.stack_images(arrays)
    check(in_worker)
    assert in_worker.is_shared()


def _kernel_populates() -> bool:
    """Linux 5.14 or later: MADV_POPULATE_WRITE exists."""
    import os
    import re
    import sys

    match = re.match(r"(\d+)\.(\d+)", os.uname().release) if sys.platform.startswith("linux") else None
    return bool(match) and (int(match[1]), int(match[2])) >= (5, 14)


@pytest.mark.skipif(not _kernel_populates(), reason="MADV_POPULATE_WRITE needs Linux 5.14 or later")
def test_populating_a_shared_batch_faults_its_pages_in_ahead():
    """The worker's batch memory is populated in one call, so the copy of the images into it takes (almost) no
    page faults."""
    import mmap
    import resource

    import torch

    from cclm.data import collate

    def faults_while_writing(storage) -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(0, dtype=torch.uint8).set_(storage).fill_(7)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    nbytes = 256 * mmap.PAGESIZE
    plain = torch.UntypedStorage._new_shared(nbytes)
    assert faults_while_writing(plain) >= 200  # every fresh page faults on first write
    populated = torch.UntypedStorage._new_shared(nbytes)
    assert collate.populate(populated)
    assert faults_while_writing(populated) < 20


def test_a_shared_batch_is_the_same_populated_or_not(monkeypatch):
    """Where the kernel or platform cannot populate (another system, an older kernel), the copy faults the pages
    in as before and the batch is the same."""
    import torch

    from cclm.data import collate

    assert collate.populate(torch.UntypedStorage(0)) is False
    collate._madvise.cache_clear()
    monkeypatch.setattr(collate.sys, "platform", "darwin")  # another meaning of advice 23 there: not called
    assert collate.populate(torch.UntypedStorage._new_shared(4096)) is False
    collate._madvise.cache_clear()
    monkeypatch.undo()

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (20, 20, 3), dtype=np.uint8) for _ in range(4)]
    monkeypatch.setattr(collate, "get_worker_info", lambda: object())
    expected = collate.stack_images(arrays)
    monkeypatch.setattr(collate, "_madvise", lambda: None)  # a platform without MADV_POPULATE_WRITE
    unpopulated = collate.stack_images(arrays)
    assert unpopulated.is_shared() and torch.equal(unpopulated, expected)
    assert torch.equal(expected, torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2))


def test_channels_last_batches_give_the_model_the_same_outputs_as_contiguous_ones(tiny_model_cfg):
    import torch

    from cclm.data.collate import stack_images
    from cclm.model import CrossViewModel

    torch.manual_seed(0)
    model = CrossViewModel(tiny_model_cfg, load_pretrained=False).eval()
    size = tiny_model_cfg.vision.image_size
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(3)]
    images = stack_images(arrays)
    with torch.no_grad():
        ours = model.vision(images)
        plain = model.vision(images.contiguous())
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)


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


def test_without_hflip_careful_side_captions_flip_as_the_reference_does():
    data = photo_like(300, 200)
    careless = TrainTransform(48, hflip=True, hflip_careful=False)
    flips = 0
    for seed in range(12):
        out = careless(data, "the dog on the left", "xx", random.Random(seed))
        same_draws = TrainTransform(48, hflip=True)(data, "a circle", "en", random.Random(seed))
        np.testing.assert_array_equal(out, same_draws)  # a side word or unknown language changes nothing
        flips += not np.array_equal(
            out, TrainTransform(48, hflip=False)(data, "x", "en", random.Random(seed))
        )
    assert 0 < flips < 12


def test_a_flip_mirrors_the_unflipped_crop_exactly():
    data = photo_like(300, 200)
    flipped = 0
    for seed in range(12):
        out = TrainTransform(48, hflip=True)(data, "a circle", "en", random.Random(seed))
        plain = TrainTransform(48, hflip=False)(data, "a circle", "en", random.Random(seed))
        flipped += not np.array_equal(out, plain)
        assert np.array_equal(out, plain) or np.array_equal(out, plain[:, ::-1])
        # a flipped copy, not a mirrored view: the batch copies it with one memcpy instead of byte by byte
        assert out.flags.c_contiguous
    assert 0 < flipped < 12


# ------------------------------------------------------------------------------------------------ RandAugment
GREY = (128, 128, 128)


def small_image(width=24, height=20, seed=0) -> Image.Image:
    """A low-contrast gradient with noise: every channel's minimum is above 0 and its maximum below 255."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    base = 60 + 80 * x + 40 * y * np.array([1.0, 0.5, -0.5])
    noise = rng.integers(-15, 16, (height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def pixel_affine(img: Image.Image, a, b, c, d, e, f) -> Image.Image:
    """out[y, x] = img at (a x + b y + c, d x + e y + f), pixel centres at integers (OpenCV's convention, which
    the reference's warpAffine uses); PIL's transform puts them at i + 0.5, hence the shift."""
    shifted = (a, b, c + (1 - a - b) / 2, d, e, f + (1 - d - e) / 2)
    return img.transform(img.size, Image.Transform.AFFINE, shifted, Image.Resampling.BILINEAR, fillcolor=GREY)


def reference_op(img: Image.Image, name: str, negative: bool) -> Image.Image:
    """The reference's op at magnitude 7 (of 10), written with PIL: enhance factor 0.7 * 1.8 + 0.1 = 1.36, shear
    0.7 * 0.3 = 0.21, translation 0.7 * 10 = 7 px, rotation 0.7 * 30 = 21 degrees, grey 128 fill; OpenCV's
    warpAffine maps out(p) = img(M^-1 p), so a shear factor s samples x - s y."""
    sign = -1 if negative else 1
    w, h = img.size
    return {
        "Identity": lambda: img,
        "AutoContrast": lambda: ImageOps.autocontrast(img),
        "Equalize": lambda: ImageOps.equalize(img),
        "Brightness": lambda: ImageEnhance.Brightness(img).enhance(1.36),
        "Sharpness": lambda: ImageEnhance.Sharpness(img).enhance(1.36),
        "ShearX": lambda: pixel_affine(img, 1, -0.21 * sign, 0, 0, 1, 0),
        "ShearY": lambda: pixel_affine(img, 1, 0, 0, -0.21 * sign, 1, 0),
        "TranslateX": lambda: pixel_affine(img, 1, 0, 7 * sign, 0, 1, 0),
        "TranslateY": lambda: pixel_affine(img, 1, 0, 0, 0, 1, 7 * sign),
        # counter-clockwise about pixel-index point (w/2, h/2), as OpenCV's getRotationMatrix2D
        "Rotate": lambda: img.rotate(
            21 * sign, Image.Resampling.BILINEAR, center=(w / 2 + 0.5, h / 2 + 0.5), fillcolor=GREY
        ),
    }[name]()


@pytest.mark.parametrize("negative", [False, True])
@pytest.mark.parametrize("name", RANDAUGMENT_OPS)
def test_each_op_is_the_reference_op_at_magnitude_7(name, negative):
    img = small_image()
    out = np.asarray(apply_op(img, name, 7, negative))
    np.testing.assert_array_equal(out, np.asarray(reference_op(img, name, negative)))
    assert out.shape == (20, 24, 3) and out.dtype == np.uint8


@pytest.mark.parametrize("magnitude", [0, 3.5, 7, 10])
@pytest.mark.parametrize("negative", [False, True])
@pytest.mark.parametrize("name", ["TranslateX", "TranslateY"])
def test_translation_by_whole_and_fractional_pixels_is_the_bilinear_warp(name, negative, magnitude):
    for img in (small_image(24, 20), small_image(6, 5)):  # offsets smaller and larger than the image
        offset = (-1 if negative else 1) * magnitude
        dx, dy = (offset, 0) if name == "TranslateX" else (0, offset)
        expected = pixel_affine(img, 1, 0, dx, 0, 1, dy)
        np.testing.assert_array_equal(
            np.asarray(apply_op(img, name, magnitude, negative)), np.asarray(expected)
        )


def test_the_ops_move_and_change_pixels_as_the_reference_does():
    img = small_image(24, 20)
    pixels = np.asarray(img).astype(int)

    def op(name, magnitude=10, negative=False):
        return np.asarray(apply_op(img, name, magnitude, negative)).astype(int)

    # translation: 10 px at magnitude 10, content moves left/up for a positive sign, grey comes in
    assert (
        np.array_equal(op("TranslateX")[:, :14], pixels[:, 10:]) and (op("TranslateX")[:, 14:] == 128).all()
    )
    assert np.array_equal(op("TranslateX", negative=True)[:, 10:], pixels[:, :14])
    assert np.array_equal(op("TranslateY")[:10], pixels[10:]) and (op("TranslateY")[10:] == 128).all()
    # shear about the top-left pixel: row 0 (ShearX) / column 0 (ShearY) stays, the far rows move by 0.3 per px
    assert np.array_equal(op("ShearX")[0], pixels[0]) and np.array_equal(op("ShearY")[:, 0], pixels[:, 0])
    assert (op("ShearX")[19, :5] == 128).all()  # row 19 moved right by 5.7 px: grey enters from the left
    assert (op("ShearX", negative=True)[19, -5:] == 128).all()
    # magnitude 0 moves nothing; brightness 0.1 darkens, 1.9 brightens (truncating, clipped at 255)
    for name in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"):
        assert np.abs(op(name, 0) - pixels).max() <= 1
    np.testing.assert_allclose(op("Brightness", 0), np.floor(pixels * 0.1), atol=1)
    np.testing.assert_allclose(op("Brightness", 10), np.minimum(np.floor(pixels * 1.9), 255), atol=1)
    # rotation is counter-clockwise: a dot right of the centre goes up
    dot = np.full((41, 41, 3), 128, np.uint8)  # on the fill's grey, so only the dot stands out
    dot[20, 35] = 255
    rotated = np.asarray(apply_op(Image.fromarray(dot), "Rotate", 10)).astype(int)[..., 0]
    ys, xs = np.nonzero(rotated > 150)
    assert ys.mean() < 15 and 30 < xs.mean() < 35  # 15 px at 30 degrees: (20 - 7.5, 20 + 13)
    # autocontrast stretches each channel to 0..255, equalize flattens the histogram
    stretched = op("AutoContrast", 7)
    assert (stretched.min(axis=(0, 1)) == 0).all() and (stretched.max(axis=(0, 1)) == 255).all()
    assert (op("Equalize", 7).std(axis=(0, 1)) > pixels.std(axis=(0, 1))).all()


def test_randaugment_draws_n_ops_with_replacement_each_applied_with_probability_half():
    names, counts, signs = [], [], set()
    for seed in range(2000):
        applied = RandAugment(ops=2, magnitude=7).sample(random.Random(seed))
        counts.append(len(applied))
        names += [name for name, _ in applied]
        signs |= {(name, neg) for name, neg in applied}
    assert set(names) == set(RANDAUGMENT_OPS)
    assert np.mean(counts) == pytest.approx(1.0, abs=0.06)  # 2 ops x probability 1/2
    assert set(counts) == {0, 1, 2}
    assert ("Rotate", True) in signs and ("Rotate", False) in signs and ("Identity", True) not in signs
    for n in (0, 1, 3, 5):
        always = RandAugment(ops=n, magnitude=7, prob=1.0)
        assert all(len(always.sample(random.Random(seed))) == n for seed in range(20))
    same = [RandAugment(ops=2, prob=1.0).sample(random.Random(s)) for s in range(400)]
    assert any(a[0] == b[0] for a, b in same)  # with replacement: the same op twice happens


def test_randaugment_applies_the_sampled_ops_in_order_and_is_reproducible_from_the_seed():
    img = small_image(32, 32)
    augment = RandAugment(ops=3, magnitude=7, prob=1.0)
    for seed in range(10):
        expected = img
        for name, negative in augment.sample(random.Random(seed)):
            expected = apply_op(expected, name, 7, negative)
        out = np.asarray(augment(img, random.Random(seed)))
        np.testing.assert_array_equal(out, np.asarray(expected))
        np.testing.assert_array_equal(out, np.asarray(augment(img, random.Random(seed))))
    assert np.array_equal(np.asarray(RandAugment(ops=0)(img, random.Random(0))), np.asarray(img))


@pytest.mark.parametrize("magnitude", [-1, -0.5, 10.5, 11, 100, float("nan")])
def test_magnitude_outside_0_to_10_is_refused(magnitude):
    with pytest.raises(ValueError, match="randaugment_magnitude"):
        RandAugment(2, magnitude)
    with pytest.raises(ValueError, match="randaugment_magnitude"):
        TrainTransform(32, randaugment=True, randaugment_magnitude=magnitude)


def test_magnitude_ends_and_op_count_are_checked():
    RandAugment(2, 0), RandAugment(2, 10), RandAugment(0, 7)
    for ops in (-1, 1.5, True):
        with pytest.raises(ValueError, match="randaugment_ops"):
            RandAugment(ops, 7)
    with pytest.raises(ValueError, match="unknown RandAugment op"):
        apply_op(small_image(), "Solarize", 7)


def test_train_transform_flips_then_augments_from_the_one_seeded_generator():
    def crop(data, rng):
        return decode_crop(data, 48, lambda w, h: random_resized_box(w, h, rng, (0.2, 1.0)))

    data = photo_like(300, 200)
    transform = TrainTransform(48, scale_min=0.2, hflip=True, randaugment=True, randaugment_ops=2)
    flipped = 0
    for seed in range(16):
        out = transform(data, "a circle", "en", random.Random(seed))
        rng = random.Random(seed)
        img = crop(data, rng)
        if rng.random() < 0.5:
            img, flipped = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), flipped + 1
        np.testing.assert_array_equal(out, np.asarray(RandAugment(2, 7)(img, rng)))
        np.testing.assert_array_equal(out, transform(data, "a circle", "en", random.Random(seed)))
        assert out.flags.c_contiguous and out.shape == (48, 48, 3)
        # a caption naming a side is never flipped, augmented or not
        side = transform(data, "the left circle", "en", random.Random(seed))
        rng = random.Random(seed)
        img = crop(data, rng)
        rng.random()
        np.testing.assert_array_equal(side, np.asarray(RandAugment(2, 7)(img, rng)))
    assert 0 < flipped < 16


def test_train_transform_crop_scale_and_bicubic_resampling(monkeypatch):
    boxes, resamples = [], []
    choose = transforms.random_resized_box

    def spy_box(width, height, rng, scale):
        boxes.append((width, height, scale, choose(width, height, rng, scale)))
        return boxes[-1][-1]

    resize = Image.Image.resize

    def spy_resize(self, size, resample=None, *args, **kwargs):
        resamples.append(resample)
        return resize(self, size, resample, *args, **kwargs)

    monkeypatch.setattr(transforms, "random_resized_box", spy_box)
    monkeypatch.setattr(Image.Image, "resize", spy_resize)
    data = photo_like(320, 240)
    transform = TrainTransform(32, scale_min=0.2, randaugment=True)
    for seed in range(50):
        transform(data, "x", "en", random.Random(seed))
    assert len(boxes) == 50 and all(scale == (0.2, 1.0) for _, _, scale, _ in boxes)
    areas = [(r - left) * (b - t) / (w * h) for w, h, _, (left, t, r, b) in boxes]
    assert min(areas) >= 0.2 * 0.97 and max(areas) <= 1.0 and min(areas) < 0.4
    assert resamples and set(resamples) == {Image.Resampling.BICUBIC}
    with pytest.raises(ValueError, match="crop_scale_min"):
        TrainTransform(32, scale_min=0.0)
