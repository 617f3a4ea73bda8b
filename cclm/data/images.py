"""The one image loader of evaluation, task datasets, inference and search: an image in any form becomes a uint8
tensor [3, size, size], the whole image resized (bicubic) to the model's square input without a crop, as the
ALBEF/CCLM evaluation does (nothing a caption mentions is cut off); the model normalises. Training augmentation is
:class:`cclm.data.transforms.TrainTransform`; the data pipeline's :class:`~cclm.data.transforms.EvalTransform`
is the bytes path of this loader.

Inputs: a path (``str`` or ``os.PathLike``), the bytes of an image file, a PIL image, or a uint8 tensor that
already is [3, size, size]. Every form ends in the same resampling call
(:func:`cclm.data.transforms.resize_box` over the whole image), so the pixels depend only on the decoded image:
a file, its bytes and the PIL image opened from it give identical tensors. One exception buys speed: a JPEG file
(or its bytes) whose shorter side is at least twice ``size`` is decoded at a reduced DCT scale (``Image.draft``,
about 2x faster at 224 px, as in the data pipeline), which a PIL image decoded at full size cannot repeat; those
two differ by about one grey level on average.

Errors: a missing file raises :class:`MissingImageError` (a ``FileNotFoundError``) naming it; a file that is not a
decodable image (not an image at all, truncated, corrupt, a decompression bomb) raises :class:`UnreadableImage`
naming it, a ``ValueError`` and, like PIL's own decoding errors, an ``OSError``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

from cclm.data.transforms import as_rgb, decode_crop, resize_box, whole_image

ImageInput = Union[str, os.PathLike, bytes, Image.Image, torch.Tensor]
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
EXIF_ORIENTATION = 0x0112
ORIENTATIONS = {  # EXIF orientation -> the turn that shows the image upright
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class MissingImageError(FileNotFoundError):
    """An image file that is not there (e.g. an annotation names a file missing from its image root)."""


class UnreadableImage(ValueError, OSError):
    """A file that is not a decodable image (not an image, truncated, corrupt, a decompression bomb)."""

    def __init__(self, source, reason: str):
        super().__init__(f"cannot decode image {source}: {reason}")
        self.path, self.reason = source, reason


def load_image(item: ImageInput, size: int) -> torch.Tensor:
    """``item`` as uint8 [3, size, size]: RGB, the whole image resized to the square input (see the module)."""
    if isinstance(item, torch.Tensor):
        return _checked(item, size)
    return to_tensor(resized(item, size))


def resized(item: str | os.PathLike | bytes | Image.Image, size: int) -> Image.Image:
    """The RGB ``size`` x ``size`` PIL image whose pixels :func:`load_image` returns."""
    if isinstance(item, Image.Image):
        with _decoding(getattr(item, "filename", "") or "(PIL image)"):
            return resize_box(item, size, whole_image(*item.size))
    if isinstance(item, (bytes, bytearray, memoryview)):
        source, data = "(image bytes)", bytes(item)
    else:
        source = Path(item)
        data = _read(source)
    with _decoding(source):
        return decode_crop(data, size, whole_image)


def open_image(item: str | os.PathLike | Image.Image, upright: bool = False) -> Image.Image:
    """The full-size RGB image of a path or a PIL image, decoded completely (for thumbnails); ``upright``: turned
    as its EXIF orientation says."""
    if isinstance(item, Image.Image):
        with _decoding(getattr(item, "filename", "") or "(PIL image)"):
            return _turned(_own_rgb(item), exif_orientation(item) if upright else 1)
    path = Path(item)
    data = _read(path)
    with _decoding(path), Image.open(io.BytesIO(data)) as image:
        return _turned(_own_rgb(image), exif_orientation(image) if upright else 1)


def load_upright(path: str | os.PathLike, size: int) -> torch.Tensor:
    """:func:`load_image` of a photo as it is meant to be seen: turned as its EXIF orientation says (phones store
    portrait photos sideways). Evaluation and training read the stored pixels, as the reference does; the photo
    search reads them this way. A file without an orientation is read exactly as :func:`load_image` reads it."""
    path = Path(path)
    with _decoding(path), Image.open(path) as image:  # the header only
        orientation = exif_orientation(image)
    if orientation == 1:
        return load_image(path, size)
    return load_image(open_image(path, upright=True), size)


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1 = as stored). A damaged EXIF block reads as 1: the pixels are still good."""
    try:
        return int(image.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # PIL's EXIF parser raises SyntaxError, struct.error, TypeError, ... on damaged blocks
        return 1


def _turned(image: Image.Image, orientation: int) -> Image.Image:
    turn = ORIENTATIONS.get(orientation)
    return image if turn is None else image.transpose(turn)


def _own_rgb(image: Image.Image) -> Image.Image:
    """An RGB image decoded in full that the caller owns (never ``image`` itself, which may be closed next)."""
    rgb = as_rgb(image)
    return rgb.copy() if rgb is image else rgb


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def _checked(image: torch.Tensor, size: int) -> torch.Tensor:
    if image.dtype != torch.uint8 or image.ndim != 3 or tuple(image.shape) != (3, size, size):
        raise ValueError(
            f"image tensors must be uint8 [3, {size}, {size}], got {image.dtype} {tuple(image.shape)}"
        )
    return image


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise MissingImageError(f"image not found: {path}") from None


@contextlib.contextmanager
def _decoding(source):
    try:
        yield
    except DECODE_ERRORS as err:
        raise UnreadableImage(source, decode_error_reason(err)) from err


def decode_error_reason(err: Exception) -> str:
    """PIL's message for an image that does not decode, without the in-memory stream's repr it names (the
    caller names the file instead)."""
    return re.sub(r" <_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(err)) or type(err).__name__
