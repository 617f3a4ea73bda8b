"""Use a trained cross-view model: embed images and texts, score image-text pairs, retrieve.

    import cclm
    model = cclm.load("path/to/model")            # a save_pretrained folder (config, weights, tokenizer)
    image_feats = model.encode_images(["a.jpg", "b.jpg"])
    text_feats = model.encode_texts(["a red circle", "ein roter Kreis"])
    probs = model.match(["a.jpg"], ["a red circle"])  # ITM probability that the text describes the image
    hits = model.retrieve(["ein roter Kreis"], ["a.jpg", "b.jpg"], k=1)  # -> Retrieved(scores, indices)

Features are the L2-normalised ITC/TTC projections (the ones the contrastive loss trains), so a dot product is
a cosine similarity. Everything runs batched under ``torch.inference_mode``, on CPU or GPU; on a GPU with bf16
support the weights are cast to bf16 (``dtype="auto"``), and results always come back as float32 on the CPU.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Union

import torch
from PIL import Image
from tqdm.auto import tqdm

from cclm.data.transforms import EvalTransform, to_array
from cclm.model import CrossViewModel

ImageLike = Union[str, os.PathLike, Image.Image]
MATCH = 1  # index of the "match" class of the ITM head


class Retrieved(NamedTuple):
    """Top-k of each query, best first: ``scores`` [Q, k] (cosine, or ITM probability after re-ranking) and
    ``indices`` [Q, k] into the gallery."""

    scores: torch.Tensor
    indices: torch.Tensor


# ------------------------------------------------------------------------------------------------ images
class UnreadableImage(ValueError):
    """A file that is not a decodable image (not an image at all, truncated, corrupt, a decompression bomb)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"cannot decode image {path}: {reason}")
        self.path, self.reason = path, reason


def _reason(err: BaseException) -> str:
    return re.sub(r" <_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(err)) or type(err).__name__


class ImageLoader:
    """Path or PIL image -> uint8 [3, size, size]: the evaluation transform of the data pipeline (the whole image
    resized to the square input, see :class:`cclm.data.transforms.EvalTransform`), so inference sees exactly the pixels
    that evaluation sees. Files are decoded completely here: an unreadable, truncated or corrupt file raises
    ``UnreadableImage`` (a ``ValueError``) naming it (a missing file raises ``FileNotFoundError``). Normalisation happens in the model."""

    def __init__(self, size: int):
        self.size = size
        self.from_bytes = EvalTransform(size)

    def __call__(self, item: ImageLike) -> torch.Tensor:
        if isinstance(item, Image.Image):
            image = item.convert("RGB")
            array = to_array(image.resize((self.size, self.size), Image.Resampling.BICUBIC, reducing_gap=3.0))
        else:
            path = Path(item)
            data = path.read_bytes()
            try:
                array = self.from_bytes(data)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                raise UnreadableImage(path, _reason(err)) from err
        return torch.from_numpy(array.copy()).permute(2, 0, 1)


def eval_transform(image_size: int) -> ImageLoader:
    return ImageLoader(image_size)


def open_image(item: ImageLike) -> Image.Image:
    """An RGB PIL image from a path or a PIL image, fully decoded (``UnreadableImage`` for a bad file)."""
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    path = Path(item)
    if not path.exists():
        raise FileNotFoundError(path)
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise UnreadableImage(path, _reason(err)) from err


# ------------------------------------------------------------------------------------------------- model
def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``"auto"``: bf16 on a GPU that supports it, else float32 (bf16 matmuls are slow on most CPUs)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_ok else torch.float32
    names = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
    }
    if dtype not in names:
        raise ValueError(f"unknown dtype '{dtype}', expected auto or one of {sorted(names)}")
    return names[dtype]


def load_model_tokenizer(path: str | os.PathLike) -> tuple[CrossViewModel, Any]:
    """The model of a ``save_pretrained`` folder and its tokenizer (saved in the same folder, as the project's
    convention; else the tokenizer named in the model config, e.g. a hub name)."""
    from cclm.data.tokenize import load_tokenizer

    path = Path(path)
    model = CrossViewModel.from_pretrained(path)
    if (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists():
        return model, load_tokenizer(str(path))
    fallback = model.cfg.text.tokenizer or model.cfg.text.name_or_path
    if not fallback:
        raise FileNotFoundError(
            f"model folder {path} has no tokenizer files and its config names no tokenizer; save it there with "
            "tokenizer.save_pretrained(folder)"
        )
    return model, load_tokenizer(fallback)


def batched(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass
class CCLM:
    """A trained cross-view model ready for inference: model, tokenizer and evaluation transform."""

    model: CrossViewModel
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype

    def __post_init__(self):
        self.model = self.model.to(device=self.device, dtype=self.dtype).eval()
        self.image_size = int(self.model.cfg.vision.image_size)
        self.max_length = int(self.model.cfg.text.max_length)
        self.transform = eval_transform(self.image_size)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "auto",
    ) -> CCLM:
        model, tokenizer = load_model_tokenizer(path)
        device = resolve_device(device)
        return cls(model, tokenizer, device, resolve_dtype(dtype, device))

    # ------------------------------------------------------------------------------------------ inputs
    def image_tensor(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """uint8 [B, 3, S, S] on the model's device, through the evaluation transform."""
        return torch.stack([self.transform(item) for item in images]).to(self.device)

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string")
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def _progress(self, total: int, batch_size: int, progress: bool | None, desc: str):
        show = total > 4 * batch_size if progress is None else progress
        return tqdm(total=total, desc=desc, unit="item", disable=not show)

    # ------------------------------------------------------------------------------------------ features
    @torch.inference_mode()
    def encode_images(
        self, images: Sequence[ImageLike], batch_size: int = 32, progress: bool | None = None
    ) -> torch.Tensor:
        """Normalised image features [N, embed_dim] (float32, CPU). Paths are decoded a batch at a time."""
        out = []
        with self._progress(len(images), batch_size, progress, "images") as bar:
            for chunk in batched(images, batch_size):
                out.append(self.model.encode_image(self.image_tensor(chunk))[1].float().cpu())
                bar.update(len(chunk))
        return torch.cat(out) if out else torch.empty(0, self.model.cfg.embed_dim)

    @torch.inference_mode()
    def encode_texts(
        self, texts: Sequence[str], batch_size: int = 64, progress: bool | None = None
    ) -> torch.Tensor:
        """Normalised text features [N, embed_dim] (float32, CPU), for text in any language."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string")
        out = []
        with self._progress(len(texts), batch_size, progress, "texts") as bar:
            for chunk in batched(texts, batch_size):
                out.append(self.model.encode_text(*self.tokenize(chunk))[1].float().cpu())
                bar.update(len(chunk))
        return torch.cat(out) if out else torch.empty(0, self.model.cfg.embed_dim)

    # ------------------------------------------------------------------------------------------ matching
    @torch.inference_mode()
    def match(
        self,
        images: Sequence[ImageLike],
        texts: Sequence[str],
        batch_size: int = 16,
        progress: bool | None = None,
    ) -> torch.Tensor:
        """ITM probability [N] that ``texts[i]`` describes ``images[i]``. One image (or one text) is paired with
        every item of the other list."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string")
        images, texts = list(images), list(texts)
        if len(texts) == 1 and len(images) > 1:
            texts = texts * len(images)
        if len(images) != len(texts) and len(images) != 1:
            raise ValueError(
                f"match() needs as many images as texts (or one of either): {len(images)} vs {len(texts)}"
            )
        shared_image = self.model.encode_image(self.image_tensor(images))[0] if len(images) == 1 else None
        out = []
        with self._progress(len(texts), batch_size, progress, "pairs") as bar:
            for start in range(0, len(texts), batch_size):
                chunk = texts[start : start + batch_size]
                if shared_image is None:
                    image_tokens = self.model.encode_image(
                        self.image_tensor(images[start : start + batch_size])
                    )[0]
                else:
                    image_tokens = shared_image.expand(len(chunk), -1, -1)
                out.append(self._itm_probability(chunk, image_tokens))
                bar.update(len(chunk))
        return torch.cat(out) if out else torch.empty(0)

    def _itm_probability(self, texts: Sequence[str], image_tokens: torch.Tensor) -> torch.Tensor:
        ids, mask = self.tokenize(texts)
        text_tokens = self.model.encode_text(ids, mask)[0]
        memory_mask = torch.ones(image_tokens.shape[:2], dtype=mask.dtype, device=self.device)
        fused = self.model.fuse(text_tokens, mask, image_tokens, memory_mask)
        return self.model.itm_logits(fused).float().softmax(dim=-1)[:, MATCH].cpu()

    # ------------------------------------------------------------------------------------------ retrieval
    def retrieve(
        self,
        queries: Sequence[str] | Sequence[ImageLike],
        gallery: Sequence | torch.Tensor,
        k: int = 10,
        rerank: bool = False,
        rerank_k: int | None = None,
        batch_size: int = 32,
    ) -> Retrieved:
        """Top-``k`` gallery items for each query by cosine similarity of the ITC features.

        Text queries (``str``) search an image gallery; image queries (PIL images or ``pathlib.Path``: a ``str``
        query is always text) search a text gallery. ``gallery`` may be the items
        themselves or their features from :meth:`encode_images` / :meth:`encode_texts` ([G, embed_dim]).
        ``rerank=True`` re-scores each query's top ``rerank_k`` (default ``k``) candidates with the ITM head and
        returns the top ``k`` by ITM probability; this needs the gallery items, not only their features.
        """
        if isinstance(queries, str):
            raise TypeError("queries must be a list, not one string")
        text_queries = all(isinstance(q, str) for q in queries)
        query_feats = (
            self.encode_texts(queries, batch_size)
            if text_queries
            else self.encode_images(queries, batch_size)
        )
        gallery_feats = (
            gallery
            if isinstance(gallery, torch.Tensor)
            else (
                self.encode_images(gallery, batch_size)
                if text_queries
                else self.encode_texts(gallery, batch_size)
            )
        )
        if gallery_feats.ndim != 2 or gallery_feats.shape[1] != query_feats.shape[1]:
            raise ValueError(
                f"gallery features must be [G, {query_feats.shape[1]}], got {tuple(gallery_feats.shape)}"
            )
        similarity = query_feats @ gallery_feats.float().t()
        k = min(k, similarity.shape[1])
        if not rerank:
            scores, indices = similarity.topk(k, dim=1)
            return Retrieved(scores, indices)
        if isinstance(gallery, torch.Tensor):
            raise ValueError("rerank=True needs the gallery items (images or texts), not their features")
        depth = max(k, min(rerank_k or k, similarity.shape[1]))
        candidates = similarity.topk(depth, dim=1).indices
        probs = torch.stack(
            [
                self._rerank_one(query, [gallery[int(i)] for i in row], text_queries, batch_size)
                for query, row in zip(queries, candidates)
            ]
        )
        order = probs.argsort(dim=1, descending=True)[:, :k]
        return Retrieved(probs.gather(1, order), candidates.gather(1, order))

    def _rerank_one(self, query, candidates: list, text_query: bool, batch_size: int) -> torch.Tensor:
        if text_query:
            return self.match(candidates, [query], batch_size=batch_size, progress=False)
        return self.match([query], candidates, batch_size=batch_size, progress=False)


def load(
    path: str | os.PathLike, device: str | torch.device | None = None, dtype: str | torch.dtype = "auto"
) -> CCLM:
    """Load a ``save_pretrained`` folder as a ready :class:`CCLM` (model, tokenizer, evaluation transform)."""
    return CCLM.from_pretrained(path, device=device, dtype=dtype)
