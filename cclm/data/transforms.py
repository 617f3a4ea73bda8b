"""Image transforms that decode straight to the crop.

Train: random resized crop (area ``scale`` x aspect 3/4..4/3, as torchvision's ``RandomResizedCrop``), a
horizontal flip that is skipped when the caption names a side ("left"/"links"/"gauche"/"左"...), optional
RandAugment. Eval: the whole image resized to the square input, no crop -- the pixels of
:func:`cclm.data.images.load_image`, which evaluation, tasks and inference use. Both return ``uint8`` HWC arrays
(a flipped training image without RandAugment is a mirrored view, with a negative stride: wrap it in
``np.ascontiguousarray`` before ``torch.from_numpy``); normalisation with the CLIP mean/std happens in the model
(on the accelerator), so workers ship 4x fewer bytes.

Speed: the crop box is chosen from the image header before decoding, then a JPEG is decoded with
``Image.draft`` at the largest DCT reduction (1/2, 1/4, 1/8) that still leaves at least ``size`` pixels across
the box, and ``Image.resize(box=...)`` resamples only the box. Randomness comes from a ``random.Random`` passed
in, so a sample's augmentation is a function of the seed and its position in the stream (exact resume).

Memory: a loader worker calls :func:`reuse_image_buffers`, so that PIL keeps a few freed image buffers for the
next sample instead of handing them back to the allocator; otherwise a worker, whose heap also holds its shuffle
buffer's raw samples, page-faults fresh memory for most decodes (~50 faults and ~0.2 ms of system time a sample).
"""

from __future__ import annotations

import io
import math
import random
import re

import numpy as np
from PIL import Image

from cclm.data.languages import base_language

# Words that make a caption depend on left/right; a caption containing one is never flipped. Languages not listed
# are never flipped (a wrong flip would teach the model wrong facts; a missing flip only loses an augmentation).
SIDE_WORDS: dict[str, tuple[str, ...]] = {
    "en": ("left", "right"),
    "de": ("links", "rechts", "linke", "rechte"),
    "fr": ("gauche", "droite", "droit"),
    "es": ("izquierda", "derecha", "izquierdo", "derecho"),
    "it": ("sinistra", "destra", "sinistro", "destro"),
    "pt": ("esquerda", "direita", "esquerdo", "direito"),
    "nl": ("links", "rechts", "linker", "rechter"),
    "ru": ("лев", "прав"),
    "uk": ("лів", "прав"),
    "pl": ("lew", "praw"),
    "tr": ("sol", "sağ"),
    "id": ("kiri", "kanan"),
    "vi": ("trái", "phải"),
    "ar": ("يسار", "يمين", "اليسار", "اليمين"),
    "el": ("αριστερ", "δεξι"),
    "bn": ("বাম", "ডান"),
    "ta": ("இடது", "வலது"),
    "sw": ("kushoto", "kulia"),
    "et": ("vasak", "parem"),
    "ko": ("왼", "오른"),
    "ja": ("左", "右"),
    "zh": ("左", "右"),
    "hi": ("बाएं", "दाएं", "बाईं", "दाईं"),
}
# Scripts without spaces, and stems that inflect (ru "левый/слева"): match substrings; others match word starts.
_SUBSTRING_LANGS = {"ja", "zh", "ko", "ru", "uk", "pl", "el", "ar", "bn", "ta", "hi"}
_WORD_PATTERNS = {
    lang: re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\w*", re.IGNORECASE)
    for lang, words in SIDE_WORDS.items()
    if lang not in _SUBSTRING_LANGS
}


def mentions_side(text: str, lang: str) -> bool | None:
    """True when ``text`` names left or right in language ``lang``; None when the language has no word list."""
    base = base_language(lang)
    if base not in SIDE_WORDS:
        return None
    if base in _SUBSTRING_LANGS:
        lowered = text.lower()
        return any(word in lowered for word in SIDE_WORDS[base])
    return bool(_WORD_PATTERNS[base].search(text))


def flip_allowed(text: str, lang: str) -> bool:
    return mentions_side(text, lang) is False


# PIL image buffers a worker keeps for reuse: a sample needs about three at once (decode, reduce, resample); each
# is at most PIL's block size (16 MiB), so the cache holds at most 64 MiB and, at 224 px, usually a few MiB.
WORKER_IMAGE_BUFFERS = 4


def reuse_image_buffers(count: int = WORKER_IMAGE_BUFFERS) -> None:
    """Let PIL keep up to ``count`` freed image buffers of this process for reuse (never lowers a larger limit,
    e.g. one set with the ``PILLOW_BLOCKS_MAX`` environment variable). Pixels do not change."""
    Image.core.set_blocks_max(max(count, Image.core.get_blocks_max()))


# -------------------------------------------------------------------------------------------------- crops
Box = tuple[float, float, float, float]


def random_resized_box(
    width: int,
    height: int,
    rng: random.Random,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Box:
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return (left, top, left + w, top + h)
    # Fallback: the whole image cropped to the nearest allowed aspect ratio, centred.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return (left, top, left + w, top + h)


def whole_image(width: int, height: int) -> Box:
    """The evaluation box: the whole image, resized to the square input without cropping (as the ALBEF/CCLM
    evaluation does), so nothing a caption mentions is cut off."""
    return (0, 0, width, height)


def decode_crop(data: bytes, size: int, choose_box) -> Image.Image:
    """Decode image bytes to an RGB ``size`` x ``size`` image of the box ``choose_box(width, height)``."""
    img = Image.open(io.BytesIO(data))
    width, height = img.size
    box = choose_box(width, height)
    if img.format == "JPEG":
        reduce = min((box[2] - box[0]) / size, (box[3] - box[1]) / size)
        if reduce >= 2:
            img.draft("RGB", (math.ceil(width / reduce), math.ceil(height / reduce)))
            fx, fy = img.size[0] / width, img.size[1] / height
            box = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
    return resize_box(img, size, box)


def resize_box(img: Image.Image, size: int, box: Box) -> Image.Image:
    """The one resampling step of every transform: ``box`` of ``img`` to an RGB ``size`` x ``size`` image."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)


def to_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.uint8)


class TrainTransform:
    def __init__(self, size: int, scale_min: float = 0.5, hflip: bool = True, randaugment: bool = False):
        if not 0 < scale_min <= 1:
            raise ValueError(f"crop_scale_min must be in (0, 1], got {scale_min}")
        self.size, self.scale, self.hflip, self.randaugment = size, (scale_min, 1.0), hflip, randaugment
        self._randaugment = None

    def __call__(self, data: bytes, text: str, lang: str, rng: random.Random) -> np.ndarray:
        img = decode_crop(data, self.size, lambda w, h: random_resized_box(w, h, rng, self.scale))
        flip = self.hflip and rng.random() < 0.5 and flip_allowed(text, lang)
        if self.randaugment:  # its geometric ops do not commute with a flip: flip the image first
            if flip:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            return to_array(self._apply_randaugment(img, rng.getrandbits(63)))
        pixels = to_array(img)
        # a mirrored view (negative stride) instead of a flipped copy; the batch's one copy reads it as it is
        return pixels[:, ::-1] if flip else pixels

    def _apply_randaugment(self, img: Image.Image, seed: int) -> Image.Image:
        import torch
        from torchvision.transforms import RandAugment

        if self._randaugment is None:
            self._randaugment = RandAugment()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self._randaugment(img)


class EvalTransform:
    """The pipeline's evaluation transform: the bytes path of :func:`cclm.data.images.load_image`, as an array."""

    def __init__(self, size: int):
        self.size = size

    def __call__(
        self, data: bytes, text: str = "", lang: str = "", rng: random.Random | None = None
    ) -> np.ndarray:
        return to_array(decode_crop(data, self.size, whole_image))
