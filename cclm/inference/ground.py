"""Grounding: the box in an image that a text describes, from the box head of a model pretrained with region
batches (``model.objectives.bbox``; docs/regions.md), in any language the model reads.

    from cclm.inference.ground import ground
    box = ground(model, tokenizer, "street.jpg", "the dog on the left")   # (x0, y0, x1, y1) in pixels

    cclm ground MODEL IMAGE TEXT [--out box.png]        # prints the box; draws it on the image as a PNG
    cclm ground MODEL --eval heldout/de/grounding.jsonl # accuracy (IoU >= 0.5), per language
    cclm ground MODEL --eval heldout                    # every heldout/<lang>/grounding.jsonl

The model reads the whole image resized to its square input (:func:`cclm.data.images.load_image`, the pixels
evaluation and search see) and the text as it was trained to (its normaliser); the box head predicts a normalised
``cxcywh`` box over the fused [CLS] of the text attending to the whole image (the reference's ``predict_bbox``),
which is mapped back to the image's own pixels.

Evaluation is RefCOCO-style: a prediction is correct when its IoU with the annotated box is at least 0.5. The
file is JSON lines ``{"image", "box": [x0, y0, x1, y1] (pixels), "text", "lang"}`` with ``image`` relative to
the file's folder (the synthetic world's ``heldout/<lang>/grounding.jsonl``).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from cclm.data.images import ImageInput, load_image, open_image
from cclm.data.normalize import normalizer_for
from cclm.errors import UserError
from cclm.evaluation.retrieval import tokenize_texts
from cclm.jsonl import JsonFileError, read_jsonl
from cclm.model import CrossViewModel
from cclm.model.boxes import box_cxcywh_to_xyxy, denormalize_boxes

IOU_THRESHOLD = 0.5


class NoBoxHeadError(UserError):
    """The model was trained without a box head (``model.objectives.bbox=false``): it cannot ground."""


def image_size_of(item: ImageInput) -> tuple[int, int]:
    """(width, height) of an image in any form :func:`load_image` takes (a file's header is enough)."""
    if isinstance(item, torch.Tensor):
        return int(item.shape[-1]), int(item.shape[-2])
    if isinstance(item, Image.Image):
        return item.size
    source = io.BytesIO(bytes(item)) if isinstance(item, (bytes, bytearray, memoryview)) else item
    with Image.open(source) as image:
        return image.size


@torch.inference_mode()
def ground_boxes(
    model: CrossViewModel,
    tokenizer,
    images: Sequence[ImageInput],
    texts: Sequence[str],
    batch_size: int = 32,
) -> torch.Tensor:
    """The box of ``texts[i]`` in ``images[i]``, for every i: [N, 4] float32 ``xyxy`` pixels of each image (the
    same image may appear many times; it is decoded each time)."""
    if model.box_head is None:
        raise NoBoxHeadError(
            "this model has no box head: grounding needs a model pretrained with region batches "
            "(model.objectives.bbox=true, data.regions) or a converted 4M checkpoint"
        )
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} texts")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    size = int(model.cfg.vision.image_size)
    normalize = normalizer_for(model.cfg.text)
    pad = tokenizer.pad_token_id
    boxes = []
    try:
        for start in range(0, len(texts), batch_size):
            chunk_images, chunk_texts = images[start : start + batch_size], texts[start : start + batch_size]
            pixels = torch.stack([load_image(item, size) for item in chunk_images]).to(device)
            ids = tokenize_texts(tokenizer, chunk_texts, int(model.cfg.text.max_length), normalize)
            longest = max(len(row) for row in ids)
            text_ids = torch.tensor([row + [pad] * (longest - len(row)) for row in ids], device=device)
            text_mask = torch.tensor(
                [[1] * len(row) + [0] * (longest - len(row)) for row in ids], device=device
            )
            query, _ = model.encode_text(text_ids, text_mask)
            image_tokens, _ = model.encode_image(pixels)
            predicted = box_cxcywh_to_xyxy(model.predict_boxes(query, text_mask, image_tokens).float())
            predicted = predicted.clamp(0, 1)
            sizes = [image_size_of(item) for item in chunk_images]
            boxes += [denormalize_boxes(box, w, h) for box, (w, h) in zip(predicted.cpu(), sizes)]
    finally:  # a missing or undecodable image leaves the model as it found it
        model.train(was_training)
    return torch.stack(boxes) if boxes else torch.zeros(0, 4)


def ground(
    model: CrossViewModel, tokenizer, image: ImageInput, text: str
) -> tuple[float, float, float, float]:
    """The box (x0, y0, x1, y1), in pixels of ``image``, of what ``text`` describes."""
    x0, y0, x1, y1 = ground_boxes(model, tokenizer, [image], [text])[0].tolist()
    return (x0, y0, x1, y1)


def paired_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of ``boxes1[i]`` with ``boxes2[i]`` (``xyxy``, [N, 4] each) -> [N]: the diagonal of torchvision's
    ``box_iou`` without the N x N matrix."""
    lower = torch.max(boxes1[:, :2], boxes2[:, :2])
    upper = torch.min(boxes1[:, 2:], boxes2[:, 2:])
    intersection = (upper - lower).clamp(min=0).prod(dim=1)
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).prod(dim=1)
    area2 = (boxes2[:, 2:] - boxes2[:, :2]).prod(dim=1)
    return intersection / (area1 + area2 - intersection)


def read_grounding(path: str | os.PathLike) -> list[dict]:
    """The records of a grounding file (module docstring), ``image`` resolved against the file's folder; a line
    without a usable field fails naming ``file:line``."""
    path = Path(path)
    records = []
    for number, record in read_jsonl(path):
        box, text, image = record.get("box"), record.get("text"), record.get("image")
        good_box = (
            isinstance(box, list)
            and len(box) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)
            and box[2] > box[0]
            and box[3] > box[1]
        )
        if not good_box:
            raise JsonFileError(f"{path}:{number}: 'box' must be [x0, y0, x1, y1] with x0 < x1, y0 < y1")
        if not isinstance(text, str) or not text.strip():
            raise JsonFileError(f"{path}:{number}: 'text' must be a non-empty string")
        if not isinstance(image, str) or not image:
            raise JsonFileError(f"{path}:{number}: 'image' must name an image file")
        lang = record.get("lang") if isinstance(record.get("lang"), str) else "unknown"
        records.append(
            {"image": path.parent / image, "box": [float(v) for v in box], "text": text, "lang": lang}
        )
    if not records:
        raise JsonFileError(f"{path}: no grounding records")
    return records


def read_grounding_sets(path: str | os.PathLike) -> list[dict]:
    """The records of a grounding file, or of every ``<folder>/grounding.jsonl`` in a folder (the synthetic
    world's ``heldout``: one folder per language)."""
    path = Path(path)
    if not path.is_dir():
        return read_grounding(path)
    files = sorted(path.glob("*/grounding.jsonl")) or sorted(path.glob("grounding.jsonl"))
    if not files:
        raise JsonFileError(f"{path}: no grounding.jsonl in it or in its folders")
    return [record for file in files for record in read_grounding(file)]


def grounding_accuracy(
    model: CrossViewModel, tokenizer, records: Sequence[dict], batch_size: int = 32
) -> dict[str, float]:
    """RefCOCO-style accuracy (percent of IoU >= 0.5) per ``lang`` of ``records`` (:func:`read_grounding`)."""
    predicted = ground_boxes(
        model, tokenizer, [r["image"] for r in records], [r["text"] for r in records], batch_size
    )
    hits = paired_iou(predicted, torch.tensor([r["box"] for r in records])) >= IOU_THRESHOLD
    by_lang: dict[str, list[bool]] = defaultdict(list)
    for record, hit in zip(records, hits.tolist()):
        by_lang[record["lang"]].append(hit)
    return {lang: 100.0 * sum(h) / len(h) for lang, h in sorted(by_lang.items())}


def draw_box(
    image: ImageInput, box: Sequence[float], out: str | os.PathLike, label: str | None = None
) -> Path:
    """``image`` at its own size with ``box`` drawn on it (and ``label`` above it), written as a PNG."""
    canvas = (
        open_image(image)
        if not isinstance(image, torch.Tensor)
        else Image.fromarray(image.permute(1, 2, 0).numpy())
    )
    draw = ImageDraw.Draw(canvas)
    width = max(2, round(min(canvas.size) / 150))
    draw.rectangle([round(v) for v in box], outline=(255, 40, 40), width=width)
    if label:
        draw.text((box[0] + width, max(0, box[1] - 12)), label, fill=(255, 40, 40))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, format="PNG")
    return out


# ---------------------------------------------------------------------------------------------------- command
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cclm ground",
        description="Find the box a text describes in an image (models pretrained with regions), or evaluate "
        "grounding accuracy (IoU >= 0.5) on a grounding.jsonl file.",
    )
    parser.add_argument("model", help="a model folder, a registered pretrained name or hf-hub:ORG/NAME")
    parser.add_argument("image", nargs="?", help="the image file")
    parser.add_argument("text", nargs="?", help="what to find, in any language the model reads")
    parser.add_argument("--out", help="write the image with the box drawn on it to this PNG file")
    parser.add_argument(
        "--eval",
        dest="eval_file",
        help="a grounding.jsonl file, or a folder of <lang>/grounding.jsonl: print accuracy per language",
    )
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda:0 ...")
    parser.add_argument("--batch-size", type=int, default=32)
    return parser


def main(argv: list[str]) -> int:
    from cclm.inference.api import load_model_tokenizer, resolve_model_folder
    from cclm.runtime.env import resolve_device

    parser = _parser()
    args = parser.parse_args(argv[1:])
    if bool(args.eval_file) == bool(args.image and args.text):
        parser.error("give IMAGE and TEXT, or --eval FILE")
    model, tokenizer = load_model_tokenizer(resolve_model_folder(args.model))
    model.to(resolve_device(args.device))
    if args.eval_file:
        records = read_grounding_sets(args.eval_file)
        accuracy = grounding_accuracy(model, tokenizer, records, args.batch_size)
        print(json.dumps({"grounding_accuracy": accuracy}, ensure_ascii=False))
        return 0
    box = ground(model, tokenizer, args.image, args.text)
    print(json.dumps({"box": [round(v, 1) for v in box]}))
    if args.out:
        print(f"drew the box on {draw_box(args.image, box, args.out, args.text)}", file=sys.stderr)
    return 0
