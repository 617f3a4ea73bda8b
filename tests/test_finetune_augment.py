"""Fine-tuning augmentation (``data.augment``: crop, careful flip, RandAugment on training images only, the same
for the same seed, epoch and example) and the task's token cap (``data.max_length``)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from cclm.config import ConfigError, FinetuneDataConfig
from cclm.data.images import MissingImageError, UnreadableImage, load_image
from cclm.tasks.batching import (
    CaptionImagePairs,
    ClassificationDataset,
    TaskBatches,
    TaskCollator,
    training_dataset,
)
from cclm.tasks.images import ImageRef, TaskAugment
from cclm.tasks.task_data import ClassificationExample, RetrievalData

SIZE = 32


def examples(paths, text="a photo of things", lang="en", label=0):
    return [
        ClassificationExample(str(i), text, (ImageRef(None, str(p)),), label, lang)
        for i, p in enumerate(paths)
    ]


def items(dataset) -> list[torch.Tensor]:
    return [dataset[i]["images"] for i in range(len(dataset))]


def test_augmented_training_items_differ_from_evaluation_items(images):
    train = ClassificationDataset(examples(images), {}, SIZE, TaskAugment(SIZE, seed=1))
    evaluation = ClassificationDataset(examples(images), {}, SIZE)  # dev/test: never an augmentation
    for augmented, plain, path in zip(items(train), items(evaluation), images):
        assert augmented.dtype == torch.uint8 and augmented.shape == (3, SIZE, SIZE)
        assert torch.equal(plain, load_image(path, SIZE))  # the evaluation pixels, exactly
        assert not torch.equal(augmented, plain)


def test_same_seed_epoch_and_index_give_the_same_pixels(images):
    def run(seed, epoch):
        dataset = ClassificationDataset(examples(images), {}, SIZE, TaskAugment(SIZE, seed=seed))
        dataset.set_epoch(epoch)
        return items(dataset)

    first, again = run(7, 2), run(7, 2)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    # reading an item twice, or in another order, does not change it
    dataset = ClassificationDataset(examples(images), {}, SIZE, TaskAugment(SIZE, seed=7))
    dataset.set_epoch(2)
    assert torch.equal(dataset[3]["images"], first[3]) and torch.equal(dataset[0]["images"], first[0])
    # another epoch or seed augments differently
    assert not any(torch.equal(a, b) for a, b in zip(first, run(7, 3)))
    assert not any(torch.equal(a, b) for a, b in zip(first, run(8, 2)))


def test_resumed_batches_augment_as_the_uninterrupted_run(images):
    def batches(workers=0):
        dataset = ClassificationDataset(examples(images), {}, SIZE, TaskAugment(SIZE, seed=3))
        return TaskBatches(dataset, 2, _stack, seed=3, num_workers=workers)

    source = batches()
    uninterrupted = [source.next_batch() for _ in range(6)]  # three epochs of two batches
    assert not torch.equal(uninterrupted[0], uninterrupted[2])  # epochs differ
    resumed = batches()
    resumed.load_state_dict({"epoch": 1, "position": 1})
    for expected in uninterrupted[3:]:
        assert torch.equal(resumed.next_batch(), expected)
    # a loader worker holds a copy of the dataset made after the epoch was set
    with_worker = batches(workers=1)
    for expected in uninterrupted[:3]:
        assert torch.equal(with_worker.next_batch(), expected)
    with_worker.close()


def _stack(items):
    return torch.stack([item["images"] for item in items])


def _coverage(image: torch.Tensor) -> float:
    """Fraction of a gradient image's area an output shows: red encodes x, green y."""
    red, green = image[0].float(), image[1].float()
    return float((red.max() - red.min()) / 255 * (green.max() - green.min()) / 255)


@pytest.mark.parametrize("scale_min", [0.2, 0.8])
def test_crops_respect_the_crop_scale(tmp_path, scale_min):
    side = 256
    ramp = np.arange(side, dtype=np.float64) * 255 / (side - 1)
    pixels = np.zeros((side, side, 3), dtype=np.uint8)
    pixels[..., 0] = np.round(ramp)[None, :]
    pixels[..., 1] = np.round(ramp)[:, None]
    path = tmp_path / "gradient.png"
    Image.fromarray(pixels).save(path)
    augment = TaskAugment(SIZE, seed=0, scale_min=scale_min, hflip=False, randaugment=False)
    dataset = ClassificationDataset(examples([path] * 40), {}, SIZE, augment)
    shown = [_coverage(image) for image in items(dataset)]
    edge = ((SIZE - 1) / SIZE) ** 2  # output pixel centres stop half a pixel inside the crop
    assert min(shown) >= scale_min * edge - 0.03
    assert max(shown) <= 1.0
    if scale_min < 0.5:
        assert min(shown) < 0.5  # small crops do happen
    assert augment.transform.scale == (scale_min, 1.0)


def _flipped(images, text="a photo of things", lang="en", label=0, label_names=()):
    """For each image: True when the flipping augmentation mirrored it (else it equals the one that never flips)."""
    flags = []
    options = {"scale_min": 0.6, "randaugment": False, "label_names": label_names}
    flipping = ClassificationDataset(
        examples(images, text, lang, label), {}, SIZE, TaskAugment(SIZE, 5, **options)
    )
    never = ClassificationDataset(
        examples(images, text, lang, label), {}, SIZE, TaskAugment(SIZE, 5, hflip=False, **options)
    )
    for epoch in range(4):
        flipping.set_epoch(epoch)
        never.set_epoch(epoch)
        for a, b in zip(items(flipping), items(never)):
            assert torch.equal(a, b) or torch.equal(a, b.flip(-1))
            flags.append(not torch.equal(a, b))
    return flags


def test_flips_are_careful_about_left_and_right(images):
    assert any(_flipped(images))  # a caption without sides: some images are mirrored
    assert not any(_flipped(images, "the dog on the left is asleep"))
    assert not any(_flipped(images, "links steht ein Hund", lang="de"))
    assert not any(_flipped(images, "un texte", lang="xx"))  # a language without a word list: never
    # an answer that names a side (xGQA "left"): never flipped, whatever the question says
    assert not any(_flipped(images, "which side is the dog on?", label=1, label_names=["yes", "left"]))
    assert any(_flipped(images, "which side is the dog on?", label=0, label_names=["yes", "left"]))


def test_image_pairs_and_retrieval_sets(images):
    augment = TaskAugment(SIZE, seed=2)
    pair = ClassificationExample("p", "two images", (ImageRef(None, str(images[0])),) * 2, 1, "en")
    item = ClassificationDataset([pair], {}, SIZE, augment)[0]
    assert item["images"].shape == (2, 3, SIZE, SIZE)
    assert not torch.equal(item["images"][0], item["images"][1])  # each image of a pair draws its own crop

    def data(name):
        refs = [ImageRef(None, str(p)) for p in images[:2]]
        return RetrievalData(name, refs, ["0", "1"], ["a cat", "a dog", "another cat"], [0, 1, 0], {"en"})

    train = training_dataset("retrieval", [data("a"), data("b")], {}, SIZE, augment)
    assert len(train) == 6 and [train[i]["group"] for i in range(6)] == [0, 1, 0, 2, 3, 2]
    # the same image and caption in two files: different training examples, different crops
    assert not torch.equal(train[0]["images"], train[3]["images"])
    train.set_epoch(1)
    assert augment.epoch == 1
    plain = CaptionImagePairs(data("a"), {}, SIZE)
    assert torch.equal(plain[0]["images"], load_image(images[0], SIZE))


def test_augmentation_comes_from_the_data_config(images):
    assert TaskAugment.from_config(FinetuneDataConfig(), SIZE, seed=1) is None  # off by default
    cfg = FinetuneDataConfig(augment=True, crop_scale_min=0.7, hflip=False, randaugment=False)
    augment = TaskAugment.from_config(cfg, SIZE, seed=1, label_names=["left", "no"])
    assert augment.transform.scale == (0.7, 1.0) and not augment.transform.hflip
    assert not augment.transform.randaugment and augment.side_labels == {0}
    on = TaskAugment.from_config(FinetuneDataConfig(augment=True), SIZE, seed=1)
    assert on.transform.hflip and on.transform.randaugment and on.transform.scale == (0.5, 1.0)
    with pytest.raises(ValueError, match="crop_scale_min"):
        TaskAugment.from_config(FinetuneDataConfig(augment=True, crop_scale_min=0.0), SIZE, seed=1)
    with pytest.raises(ValueError, match="px"):
        ClassificationDataset(examples(images), {}, SIZE * 2, on)


def test_augmented_loading_names_missing_and_broken_files(tmp_path):
    augment = TaskAugment(SIZE, seed=0)
    with pytest.raises(MissingImageError, match="nope.jpg"):
        augment.load(tmp_path / "nope.jpg", "text", "en", 0)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(UnreadableImage, match="broken.jpg"):
        augment.load(broken, "text", "en", 0)


def _backbone(max_length: int, positions: int = 514):
    return SimpleNamespace(
        cfg=SimpleNamespace(text=SimpleNamespace(max_length=max_length, normalize="none")),
        encoder_config=SimpleNamespace(max_position_embeddings=positions, pad_token_id=1),
    )


def test_max_length_caps_the_task_texts(tiny_tokenizer):
    long_text = " ".join(["a red circle above a blue square"] * 10)
    items = [{"text": long_text, "images": torch.zeros(3, 4, 4, dtype=torch.uint8), "label": 0}]
    model_length = TaskCollator.for_model(_backbone(40), tiny_tokenizer)
    assert model_length.max_length == 40 and model_length(items)["text_ids"].shape[1] == 40
    capped = TaskCollator.for_model(_backbone(40), tiny_tokenizer, max_length=12)
    batch = capped(items)
    assert capped.max_length == 12 and batch["text_ids"].shape[1] == 12 and batch["text_mask"].sum() == 12
    # 0 = the model's; a task cap above the model's holds up to the position table (the reference's 80 on models
    # pretrained at 40), and past it is refused
    assert TaskCollator.for_model(_backbone(40), tiny_tokenizer, max_length=0).max_length == 40
    assert TaskCollator.for_model(_backbone(40), tiny_tokenizer, max_length=80).max_length == 80
    with pytest.raises(
        ConfigError, match=r"data.max_length=80: the text encoder has 66 positions \(at most 64"
    ):
        TaskCollator.for_model(_backbone(40, positions=66), tiny_tokenizer, max_length=80)
    short = capped([{**items[0], "text": "a red circle"}])
    assert short["text_ids"].shape[1] < 12  # padding only to the longest text
