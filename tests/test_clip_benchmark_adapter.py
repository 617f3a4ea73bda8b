"""The CLIP_benchmark adapter: the ``clip-benchmark`` package's own zero-shot retrieval harness, run on small local
datasets in its XM3600 (``crossmodal3600``) and Flickr30k-CN (``flickr30k``, zh) layouts with a tiny random cclm
model, gives exactly the recall of cclm's own ITC retrieval evaluation; and its command line runs cclm models."""

from __future__ import annotations

import json
import random

import pytest
import torch
from clip_benchmark.datasets.builder import build_dataset, get_dataset_collate_fn
from clip_benchmark.metrics import zeroshot_retrieval
from PIL import Image, ImageDraw

from cclm.evaluation.datasets import RetrievalSet
from cclm.evaluation.run import run_retrieval
from cclm.inference.api import load_model_tokenizer
from cclm.inference.clip_benchmark import load_for_clip_benchmark, main
from tests.conftest import SENTENCES

pytestmark = pytest.mark.usefixtures("one_thread")
RECALL_K = (1, 5, 10)
N_IMAGES = 14


def draw_images(folder, n: int = N_IMAGES, jpeg_only: bool = False) -> list[str]:
    """Noisy coloured shapes, PNG and small JPEG (smaller than twice the model's 32 px input, so no loader takes
    the reduced-DCT JPEG shortcut: both harnesses see the same pixels)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    paths = []
    for i in range(n):
        image = Image.effect_noise((48, 40), 40).convert("RGB")
        draw = ImageDraw.Draw(image)
        colour = tuple(rng.randrange(256) for _ in range(3))
        x, y = rng.randrange(0, 30), rng.randrange(0, 22)
        (draw.ellipse if i % 2 else draw.rectangle)((x, y, x + 16, y + 16), fill=colour)
        path = folder / f"{i:03d}.{'png' if i % 3 and not jpeg_only else 'jpg'}"
        image.save(path)
        paths.append(str(path))
    return paths


def captions(n: int, per_image: int) -> list[list[str]]:
    rng = random.Random(1)
    words = " ".join(SENTENCES).split()
    return [[" ".join(rng.sample(words, 6)) for _ in range(per_image)] for _ in range(n)]


def harness_metrics(
    dataset_name: str, root, language: str, pretrained, batch_size: int = 5, amp: bool = True
):
    """CLIP_benchmark's evaluation, as its CLI runs it: its dataset class, collate function and metric."""
    model, transform, tokenizer = load_for_clip_benchmark("cclm", str(pretrained), device="cpu")
    model.eval()
    dataset = build_dataset(
        dataset_name, root=str(root), transform=transform, language=language, task="zeroshot_retrieval"
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=get_dataset_collate_fn(dataset_name)
    )
    return zeroshot_retrieval.evaluate(model, loader, tokenizer, "cpu", amp=amp, recall_k_list=list(RECALL_K))


def cclm_metrics(model_dir, images: list[str], texts: list[list[str]], language: str) -> dict[str, float]:
    """cclm's own retrieval evaluation, ITC only (no ITM re-ranking)."""
    flat = [t for group in texts for t in group]
    txt2img = [i for i, group in enumerate(texts) for _ in group]
    img2txt, start = [], 0
    for group in texts:
        img2txt.append(list(range(start, start + len(group))))
        start += len(group)
    model, tokenizer = load_model_tokenizer(model_dir)
    retrieval_set = RetrievalSet("local", language, images, flat, txt2img, img2txt)
    size = int(model.cfg.vision.image_size)
    return run_retrieval(
        model, retrieval_set, tokenizer, size, rerank=False, batch_size=4, device="cpu"
    ).metrics


def assert_same_recall(harness: dict[str, float], ours: dict[str, float]) -> None:
    for k in RECALL_K:
        # CLIP_benchmark's image retrieval = caption queries (cclm's img_*), its text retrieval = image queries
        assert 100 * harness[f"image_retrieval_recall@{k}"] == pytest.approx(ours[f"img_r{k}"], abs=1e-4)
        assert 100 * harness[f"text_retrieval_recall@{k}"] == pytest.approx(ours[f"txt_r{k}"], abs=1e-4)
    values = [ours[f"{side}_r{k}"] for side in ("img", "txt") for k in RECALL_K]
    assert any(0 < v < 100 for v in values), values  # a comparison that could have failed


def test_xm3600_layout_gives_cclms_own_itc_recall(tiny_model_dir, tmp_path):
    root = tmp_path / "xm3600"
    images = draw_images(root / "images")
    texts = captions(N_IMAGES, per_image=1)
    # the annotation file clip_benchmark's crossmodal3600 builder writes for a language (one caption per image)
    annotation = {
        "image_paths": images,
        "annotations": [t[0] for t in texts],
        "indicies": list(range(N_IMAGES)),
    }
    (root / "crossmodal3600_captions-de.json").write_text(json.dumps(annotation, ensure_ascii=False))
    harness = harness_metrics("crossmodal3600", root, "de", tiny_model_dir)  # amp=True: the harness default
    assert_same_recall(harness, cclm_metrics(tiny_model_dir, images, texts, "de"))


def test_several_captions_per_image_flickr30k_zh_layout_gives_cclms_own_itc_recall(tiny_model_dir, tmp_path):
    root = tmp_path / "flickr30k"
    images = draw_images(root, jpeg_only=True)  # the layout names .jpg files
    texts = captions(N_IMAGES, per_image=3)
    lines = ["image,caption"] + [f"{p.split('/')[-1]},{t}" for p, group in zip(images, texts) for t in group]
    (root / "flickr30k_test_zh.txt").write_text("\n".join(lines) + "\n")
    harness = harness_metrics("flickr30k", root, "zh", tiny_model_dir, batch_size=4)
    assert_same_recall(harness, cclm_metrics(tiny_model_dir, images, texts, "zh"))


def test_the_clip_benchmark_command_line_scores_a_cclm_model_and_builds_the_table(tiny_model_dir, tmp_path):
    root = tmp_path / "xm3600"
    images = draw_images(root / "images")
    texts = captions(N_IMAGES, per_image=1)
    annotation = {
        "image_paths": images,
        "annotations": [t[0] for t in texts],
        "indicies": list(range(N_IMAGES)),
    }
    (root / "crossmodal3600_captions-ja.json").write_text(json.dumps(annotation, ensure_ascii=False))
    out = tmp_path / "results"
    out.mkdir()
    argv = [
        "eval",
        "--model_type", "cclm",
        "--model", "cclm-tiny",
        "--pretrained", str(tiny_model_dir),
        "--dataset", "crossmodal3600",
        "--dataset_root", str(root),
        "--language", "ja",
        "--recall_k", "1", "5", "10",
        "--batch_size", "6",
        "--num_workers", "0",
        "--output", str(out / "{dataset}_{language}_{model}.json"),
        "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((out / "crossmodal3600_ja_cclm-tiny.json").read_text())
    assert (
        result["model"] == "cclm-tiny"
        and result["task"] == "zeroshot_retrieval"
        and result["language"] == "ja"
    )
    assert_same_recall(result["metrics"], cclm_metrics(tiny_model_dir, images, texts, "ja"))
    assert main(["build", str(out), "--output", str(tmp_path / "table.csv")]) == 0
    header, row = (tmp_path / "table.csv").read_text().splitlines()[:2]
    assert {"model_fullname", "dataset", "language", "image_retrieval_recall@1"} <= set(header.split(","))
    assert f"cclm-tiny {tiny_model_dir}" in row
