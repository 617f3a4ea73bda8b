"""Image transforms that decode straight to the crop.

Train: random resized crop (area ``scale`` x aspect 3/4..4/3, bicubic, as torchvision's ``RandomResizedCrop``
in the reference), a horizontal flip that is skipped when the caption names a side ("left"/"links"/"gauche"/"左"
...), then optionally :class:`RandAugment` (the CCLM reference's ``RandomAugment(2, 7)``: its ten ops, magnitude
of 10). Eval: the whole image resized to the square input, no crop -- the pixels of
:func:`cclm.data.images.load_image`, which evaluation, tasks and inference use. Both return C-contiguous ``uint8``
HWC arrays; normalisation with the CLIP mean/std happens in the model (on the accelerator), so workers ship 4x
fewer bytes.

Speed: the crop box is chosen from the image header before decoding, then a JPEG is decoded with
``Image.draft`` at the largest DCT reduction (1/2, 1/4, 1/8) that still leaves at least ``size`` pixels across
the box, and ``Image.resize(box=...)`` resamples only the box. Randomness comes from a ``random.Random`` passed
in, so a sample's augmentation is a function of the seed and its position in the stream (exact resume).

Memory: a loader worker calls :func:`reuse_image_buffers`, so that PIL keeps a few freed image buffers for the
next sample instead of handing them back to the allocator; otherwise a worker, whose heap also holds its shuffle
buffer's raw samples, page-faults fresh memory for most decodes (~50 faults and ~0.2 ms of system time a sample).
A flip is PIL's ``transpose`` of the 224 px crop (~0.04 ms), never a mirrored numpy view: copying a view whose
3-byte pixels run backwards into the batch is an element-by-element copy, ~0.37 ms an image instead of ~0.01.
"""

from __future__ import annotations

import io
import math
import random
import re

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

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


def as_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB. Greyscale wider than 8 bits (16-bit PNG or TIFF: modes ``I;16*`` and ``I``; float
    ``F``) is scaled to 0..255 first: PIL's own conversion clips it, which turns nearly every pixel white."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        peak = values.max(initial=0.0)
        if img.mode.startswith("I;16") or (img.mode == "I" and peak > 255):
            values = values / 257.0  # 65535 -> 255
        elif img.mode == "F" and peak <= 1.0:
            values = values * 255.0  # float images in 0..1
        img = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def resize_box(img: Image.Image, size: int, box: Box) -> Image.Image:
    """The one resampling step of every transform: ``box`` of ``img`` to an RGB ``size`` x ``size`` image."""
    img = as_rgb(img)
    return img.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)


def to_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- RandAugment
# The CCLM reference's RandomAugment(2, 7) op list (ALBEF's augmentation): photometric ops without colour or
# solarize/posterize, and small geometric ops.
RANDAUGMENT_OPS = (
    "Identity",
    "AutoContrast",
    "Equalize",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
)
MAX_MAGNITUDE = 10
FILL = (128, 128, 128)  # what the geometric ops move in from outside the image
MAX_SHEAR = 0.3  # shear factor at magnitude 10
MAX_TRANSLATE = 10.0  # pixels at magnitude 10 (absolute, as the reference, whatever the image size)
MAX_ROTATE = 30.0  # degrees at magnitude 10
SIGNED_OPS = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"})


def enhance_factor(magnitude: float) -> float:
    """Brightness/Sharpness factor: 0.1 .. 1.9 over magnitude 0 .. 10, no sign (magnitude 7 gives 1.36)."""
    return magnitude / MAX_MAGNITUDE * 1.8 + 0.1


def _affine(img: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
    """``out(x, y) = img(matrix @ (x, y, 1))`` in pixel-index coordinates (pixel centres at integers, as OpenCV's
    ``warpAffine``, which the reference uses); PIL's ``transform`` works with pixel centres at ``i + 0.5``."""
    a, b, c, d, e, f = matrix
    c -= (a + b - 1) / 2
    f -= (d + e - 1) / 2
    return img.transform(
        img.size, Image.Transform.AFFINE, (a, b, c, d, e, f), Image.Resampling.BILINEAR, fillcolor=FILL
    )


def _shift(img: Image.Image, dx: int, dy: int) -> Image.Image:
    """``out(x, y) = img(x + dx, y + dy)``, grey outside: what :func:`_affine` gives for whole pixels."""
    w, h = img.size
    out = Image.new(img.mode, img.size, FILL)
    if abs(dx) < w and abs(dy) < h:
        box = (max(dx, 0), max(dy, 0), min(w, w + dx), min(h, h + dy))
        out.paste(img.crop(box), (max(-dx, 0), max(-dy, 0)))
    return out


def apply_op(img: Image.Image, name: str, magnitude: float, negative: bool = False) -> Image.Image:
    """One RandAugment op at ``magnitude`` (0..10); ``negative`` flips the sign of a shear, translation or
    rotation (the other ops have none). Geometric ops resample bilinearly and fill with grey 128, as the
    reference's: ShearX moves row ``y`` by ``shear * y`` pixels to the right, ShearY column ``x`` by ``shear * x``
    down, TranslateX/Y move the content left/up by the offset, Rotate turns counter-clockwise about the centre."""
    sign = -1.0 if negative else 1.0
    level = magnitude / MAX_MAGNITUDE
    if name == "Identity":
        return img
    if name == "AutoContrast":
        # PIL's, which the reference's OpenCV version means to equal; that one has a bug (it negates the channel
        # minimum as uint8, so a channel whose minimum is above 0 turns all 255), not reproduced here.
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Brightness":
        return ImageEnhance.Brightness(img).enhance(enhance_factor(magnitude))
    if name == "Sharpness":
        # PIL's clips to 0..255; the reference's OpenCV version does not (a pixel pushed past either end wraps).
        return ImageEnhance.Sharpness(img).enhance(enhance_factor(magnitude))
    if name == "ShearX":
        return _affine(img, (1, -sign * level * MAX_SHEAR, 0, 0, 1, 0))
    if name == "ShearY":
        return _affine(img, (1, 0, 0, -sign * level * MAX_SHEAR, 1, 0))
    if name in ("TranslateX", "TranslateY"):
        offset = sign * magnitude * MAX_TRANSLATE / MAX_MAGNITUDE
        dx, dy = (offset, 0.0) if name == "TranslateX" else (0.0, offset)
        if offset.is_integer():  # whole pixels (every integer magnitude): a copy, 100x faster than resampling
            return _shift(img, int(dx), int(dy))
        return _affine(img, (1, 0, dx, 0, 1, dy))
    if name == "Rotate":
        # about pixel-index point (W/2, H/2), as OpenCV's getRotationMatrix2D in the reference
        w, h = img.size
        return img.rotate(
            sign * level * MAX_ROTATE,
            Image.Resampling.BILINEAR,
            center=((w + 1) / 2, (h + 1) / 2),
            fillcolor=FILL,
        )
    raise ValueError(f"unknown RandAugment op {name!r}; known: {', '.join(RANDAUGMENT_OPS)}")


class RandAugment:
    """The CCLM reference's ``RandomAugment(N=ops, M=magnitude)``: ``ops`` names drawn uniformly with replacement
    from ``op_names``; each is applied with probability ``prob`` at the fixed ``magnitude`` (of 10), a geometric
    op with a random sign. All randomness comes from the ``random.Random`` passed per call."""

    def __init__(
        self,
        ops: int = 2,
        magnitude: float = 7,
        op_names: tuple[str, ...] = RANDAUGMENT_OPS,
        prob: float = 0.5,
    ):
        if isinstance(ops, bool) or not isinstance(ops, int) or ops < 0:
            raise ValueError(f"randaugment_ops must be an integer >= 0, got {ops!r}")
        if isinstance(magnitude, bool) or not isinstance(magnitude, (int, float)) or not 0 <= magnitude <= 10:
            raise ValueError(f"randaugment_magnitude must be in 0..{MAX_MAGNITUDE}, got {magnitude!r}")
        if not 0 <= prob <= 1:
            raise ValueError(f"RandAugment probability must be in [0, 1], got {prob}")
        unknown = [name for name in op_names if name not in RANDAUGMENT_OPS]
        if unknown or not op_names:
            raise ValueError(
                f"RandAugment ops must be a non-empty subset of {RANDAUGMENT_OPS}, got {op_names}"
            )
        self.ops, self.magnitude, self.op_names, self.prob = ops, magnitude, tuple(op_names), prob

    def sample(self, rng: random.Random) -> list[tuple[str, bool]]:
        """The ops to apply to one image, in order, each with its sign (True: negative)."""
        chosen = [self.op_names[rng.randrange(len(self.op_names))] for _ in range(self.ops)]
        applied = []
        for name in chosen:
            if rng.random() < self.prob:
                applied.append((name, name in SIGNED_OPS and rng.random() < 0.5))
        return applied

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        for name, negative in self.sample(rng):
            img = apply_op(img, name, self.magnitude, negative)
        return img


# -------------------------------------------------------------------------------------------------- transforms
class TrainTransform:
    """Random resized crop (bicubic, area ``scale_min``..1), a horizontal flip with probability 1/2 (with
    ``hflip_careful``, never when the caption names a side; without, every pair as the reference), then
    (``randaugment``) :class:`RandAugment` with ``randaugment_ops`` ops at ``randaugment_magnitude`` -- the order
    of the reference's pretraining transform."""

    def __init__(
        self,
        size: int,
        scale_min: float = 0.5,
        hflip: bool = True,
        randaugment: bool = False,
        randaugment_ops: int = 2,
        randaugment_magnitude: float = 7,
        hflip_careful: bool = True,
    ):
        if not 0 < scale_min <= 1:
            raise ValueError(f"crop_scale_min must be in (0, 1], got {scale_min}")
        self.size, self.scale, self.hflip, self.randaugment = size, (scale_min, 1.0), hflip, randaugment
        self.hflip_careful = hflip_careful
        # validated even when off, so a bad config fails at start-up rather than when switched on
        self._randaugment = RandAugment(randaugment_ops, randaugment_magnitude)

    def __call__(self, data: bytes, text: str, lang: str, rng: random.Random) -> np.ndarray:
        img = decode_crop(data, self.size, lambda w, h: random_resized_box(w, h, rng, self.scale))
        flip = self.hflip and rng.random() < 0.5 and (not self.hflip_careful or flip_allowed(text, lang))
        if flip:  # before RandAugment: its geometric ops do not commute with a flip
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.randaugment:
            img = self._randaugment(img, rng)
        return to_array(img)


class EvalTransform:
    """The pipeline's evaluation transform: the bytes path of :func:`cclm.data.images.load_image`, as an array."""

    def __init__(self, size: int):
        self.size = size

    def __call__(
        self, data: bytes, text: str = "", lang: str = "", rng: random.Random | None = None
    ) -> np.ndarray:
        return to_array(decode_crop(data, self.size, whole_image))
