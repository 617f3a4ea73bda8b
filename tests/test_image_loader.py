"""One image loader: a PNG file, its bytes and the PIL image give identical pixels, and so do a JPEG file, its bytes
and the PIL image opened from it, through every entry point that loads images: the data pipeline's evaluation
transform, the retrieval evaluation's gallery, the dual-encoder retrieval of the recipes, the IGLUE task
datasets, the inference API and the search index. Each is compared with one reference call."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cclm.data.images import MissingImageError, UnreadableImage, load_image
from cclm.data.transforms import EvalTransform
from cclm.evaluation.datasets import RetrievalSet
from cclm.evaluation.run import run_retrieval
from cclm.inference.api import CCLM
from cclm.inference.search import ImageFiles
from cclm.model import CrossViewModel
from cclm.recipes.dual_encoder import dual_encoder_metrics
from cclm.tasks.batching import CaptionImagePairs, ClassificationDataset
from cclm.tasks.images import ImageRef
from cclm.tasks.task_data import ClassificationExample, RetrievalData

SIZE = 32  # the tiny model's input


def picture(width: int = 48, height: int = 40, mode: str = "RGB") -> Image.Image:
    """Smooth gradients with a sharp-edged block: resampling differences of any kind change its pixels."""
    x = np.linspace(0, 5, width)[None, :] + np.zeros((height, 1))
    y = np.linspace(0, 3, height)[:, None] + np.zeros((1, width))
    pixels = np.stack([128 + 100 * np.sin(x + y), 128 + 100 * np.cos(1.7 * x), 128 + 90 * np.sin(2 * y)], -1)
    pixels[height // 4 : height // 2, width // 3 : width // 2] = (250, 250, 20)
    return Image.fromarray(pixels.astype(np.uint8)).convert(mode)


@pytest.fixture
def files(tmp_path):
    """A PNG file and a JPEG file, and the references: the loader on the PIL images. The PNG is large enough for
    resizing to reduce it first (``reducing_gap``), the JPEG small enough to be decoded at full size."""
    png, jpg = tmp_path / "scene.png", tmp_path / "scene.jpg"
    source = picture(400, 300)
    source.save(png)
    picture().save(jpg, quality=90)
    with Image.open(jpg) as opened:
        jpeg_reference = load_image(opened, SIZE)
    return {png: load_image(source, SIZE), jpg: jpeg_reference}


def forms(path):
    """Every way a caller can hand over the image of ``path``."""
    return [path, str(path), path.read_bytes(), Image.open(path)]


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
@pytest.mark.parametrize("width", [48, 400])
def test_file_bytes_and_pil_image_give_identical_pixels(tmp_path, mode, width):
    source = picture(width, 3 * width // 4, mode)
    source.save(tmp_path / "a.png")
    reference = load_image(source, SIZE)
    assert reference.dtype == torch.uint8 and reference.shape == (3, SIZE, SIZE)
    for item in forms(tmp_path / "a.png"):
        assert torch.equal(load_image(item, SIZE), reference)
    assert load_image(reference, SIZE) is reference  # an already-made tensor passes through
    with pytest.raises(ValueError, match=r"uint8 \[3, 32, 32\]"):
        load_image(reference.float(), SIZE)


def test_jpeg_file_bytes_and_opened_image_are_identical(files):
    jpg = next(p for p in files if p.suffix == ".jpg")
    for item in forms(jpg):
        assert torch.equal(load_image(item, SIZE), files[jpg])


def test_the_whole_image_is_resized_without_a_crop(tmp_path):
    wide = Image.new("RGB", (96, 24), (200, 30, 30))
    wide.paste((20, 20, 220), (72, 0, 96, 24))
    wide.save(tmp_path / "wide.png")
    pixels = load_image(tmp_path / "wide.png", SIZE)
    assert pixels[2, :, -1].float().mean() > 180 and pixels[0, :, 0].float().mean() > 180


def test_large_jpegs_are_draft_decoded_from_files_only(tmp_path):
    """A JPEG file at least twice the input size is decoded at a reduced DCT scale (the fast path); its bytes give
    the same pixels, a PIL image decoded at full size nearly the same ones. Lossless files are never drafted."""
    big = picture(200, 160)
    big.save(tmp_path / "big.jpg", quality=90)
    big.save(tmp_path / "big.png")
    from_file = load_image(tmp_path / "big.jpg", SIZE)
    assert torch.equal(load_image((tmp_path / "big.jpg").read_bytes(), SIZE), from_file)
    with Image.open(tmp_path / "big.jpg") as opened:
        full_decode = load_image(opened, SIZE)
    assert (from_file.float() - full_decode.float()).abs().mean() < 3
    assert torch.equal(load_image(tmp_path / "big.png", SIZE), load_image(big, SIZE))


def test_missing_and_undecodable_files_name_the_file(tmp_path):
    with pytest.raises(MissingImageError, match="gone.jpg") as missing:
        load_image(tmp_path / "gone.jpg", SIZE)
    assert isinstance(missing.value, FileNotFoundError)
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(UnreadableImage, match=r"cannot decode image .*notes.jpg") as bad:
        load_image(tmp_path / "notes.jpg", SIZE)
    assert isinstance(bad.value, ValueError) and isinstance(bad.value, OSError)
    picture().save(tmp_path / "cut.jpg", quality=95)
    data = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableImage, match=r"cut.jpg: .*truncated"):
        load_image(tmp_path / "cut.jpg", SIZE)
    with pytest.raises(UnreadableImage, match=r"\(image bytes\)"):
        load_image(b"not an image either", SIZE)


# ------------------------------------------------------------------------------------------- entry points
def test_pipeline_eval_transform(files):
    for path, reference in files.items():
        array = EvalTransform(SIZE)(path.read_bytes())
        assert torch.equal(torch.from_numpy(array.copy()).permute(2, 0, 1), reference)


def test_retrieval_evaluation_gallery(files, tiny_model_cfg, tiny_tokenizer):
    model = CrossViewModel(tiny_model_cfg).eval()
    seen = []
    encode_image = model.encode_image
    model.encode_image = lambda pixels: seen.append(pixels.clone()) or encode_image(pixels)
    gallery = [
        (item, f"{path.name}/{n}", ["a red circle"]) for path in files for n, item in enumerate(forms(path))
    ]
    retrieval_set = RetrievalSet.from_entries("forms", "en", gallery)
    run_retrieval(model, retrieval_set, tiny_tokenizer, SIZE, batch_size=len(gallery), rerank=False)
    pixels = torch.cat(seen)
    assert len(pixels) == len(gallery)
    for row, (_, key, _) in zip(pixels, gallery):
        reference = next(ref for path, ref in files.items() if key.startswith(path.name))
        assert torch.equal(row, reference)


def test_dual_encoder_retrieval_of_the_recipes(files):
    seen = []
    gallery = [(item, f"{path.name}/{n}", ["x"]) for path in files for n, item in enumerate(forms(path))]

    def encode_images(pixels):
        seen.append(pixels)
        return torch.ones(len(pixels), 4)

    dual_encoder_metrics(
        encode_images,
        lambda texts: torch.ones(len(texts), 4),
        RetrievalSet.from_entries("f", "en", gallery),
        SIZE,
    )
    references = [ref for path, ref in files.items() for _ in forms(path)]
    assert all(torch.equal(row, ref) for row, ref in zip(torch.cat(seen), references))


def test_task_datasets(files):
    for path, reference in files.items():
        ref = ImageRef(None, str(path))
        single = ClassificationDataset([ClassificationExample("0", "text", (ref,), 0, "en")], {}, SIZE)
        assert torch.equal(single[0]["images"], reference)
        pair = ClassificationDataset([ClassificationExample("1", "text", (ref, ref), 1, "en")], {}, SIZE)
        assert torch.equal(pair[0]["images"], torch.stack([reference, reference]))
        pairs = CaptionImagePairs(RetrievalData(str(path), [ref], ["0"], ["text"], [0], {"en"}), {}, SIZE)
        assert torch.equal(pairs[0]["images"], reference)


def test_inference_api_and_search_index(files, tiny_model_cfg, tiny_tokenizer):
    engine = CCLM(CrossViewModel(tiny_model_cfg), tiny_tokenizer, torch.device("cpu"), torch.float32)
    for path, reference in files.items():
        items = forms(path)
        assert torch.equal(engine.image_tensor(items), reference.expand(len(items), -1, -1, -1))
        assert all(torch.equal(engine.transform(item), reference) for item in items)
        feats = engine.encode_images(items)
        torch.testing.assert_close(feats, feats[:1].expand_as(feats), atol=0, rtol=0)
        relative, pixels, error = ImageFiles(path.parent, [path.name], engine.transform)[0]
        assert (relative, error) == (path.name, None) and torch.equal(pixels, reference)
