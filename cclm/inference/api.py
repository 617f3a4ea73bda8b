"""Use a trained cross-view model: embed images and texts, score image-text pairs, retrieve.

    import cclm
    model = cclm.load("path/to/model")            # a save_pretrained folder (config, weights, tokenizer)
    model = cclm.load("cclm-4m-base")             # a released checkpoint by name (cclm.list_pretrained())
    model = cclm.load("hf-hub:org/name")          # a cclm model pushed to the Hugging Face Hub
    model = cclm.load("path/to/model", image_size=384)  # at another resolution (Swin window scaled: 7 -> 12)
    image_feats = model.encode_images(["a.jpg", "b.jpg"])
    text_feats = model.encode_texts(["a red circle", "ein roter Kreis"])
    probs = model.match(["a.jpg"], ["a red circle"])  # ITM probability that the text describes the image
    hits = model.retrieve(["ein roter Kreis"], ["a.jpg", "b.jpg"], k=1)  # -> Retrieved(scores, indices)
    hits = model.retrieve(["a.jpg", "b.jpg"], ["a red circle", "a star"], k=1)  # image queries, text gallery

Features are the L2-normalised ITC/TTC projections (the ones the contrastive loss trains), so a dot product is
a cosine similarity. Everything runs batched under ``torch.inference_mode``, on CPU or GPU; on a GPU with bf16
support the weights are cast to bf16 (``dtype="auto"``), and results always come back as float32 on the CPU.

Texts are read as the model was trained to read them: its text normaliser (``model.cfg.text.normalize``, saved
with the model) is applied before tokenising, as in evaluation and fine-tuning. With ``pre_caption`` (the CCLM
reference's, carried by converted reference checkpoints) "A Dog, Running!" and "a dog running" are the same
query; with ``none`` the tokenizer sees the text as given.
"""

from __future__ import annotations

import functools
import numbers
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Union

import torch
from PIL import Image
from tqdm.auto import tqdm

from cclm.config import Precision
from cclm.data.images import MissingImageError, UnreadableImage, load_image  # noqa: F401 - re-exported
from cclm.data.normalize import normalizer_for
from cclm.evaluation.retrieval import MATCH, Embeddings, embed_images, embed_texts, itm_scores, tokenize_texts
from cclm.model import CrossViewModel
from cclm.model.cross_view import check_tokenizer_fits
from cclm.runtime.env import compute_dtype, resolve_device

ImageLike = Union[str, os.PathLike, bytes, Image.Image, torch.Tensor]
QUERY_TYPES = ("auto", "text", "image")
PRECISION_OF_DTYPE = {
    torch.float32: Precision.fp32,
    torch.bfloat16: Precision.bf16,
    torch.float16: Precision.fp16,
}


class Retrieved(NamedTuple):
    """Top-k of each query, best first: ``scores`` [Q, k] (cosine, or ITM probability after re-ranking) and
    ``indices`` [Q, k] into the gallery."""

    scores: torch.Tensor
    indices: torch.Tensor


def eval_transform(image_size: int) -> Callable[[Any], torch.Tensor]:
    """Path, bytes or PIL image -> uint8 [3, size, size]: the project's one image loader
    (:func:`cclm.data.images.load_image`), so inference sees exactly the pixels evaluation sees."""
    return functools.partial(load_image, size=image_size)


def load_model_tokenizer(
    path: str | os.PathLike, image_size: int | None = None, window_size: int | None = None
) -> tuple[CrossViewModel, Any]:
    """The model of a ``save_pretrained`` folder and its tokenizer (saved in the same folder, as the project's
    convention; else the tokenizer named in the model config, e.g. a hub name). ``image_size`` /
    ``window_size``: the vision tower resized (:meth:`CrossViewModel.from_pretrained`). A tokenizer with more
    tokens than the model has word embeddings is refused (:func:`cclm.model.cross_view.check_tokenizer_fits`)."""
    from cclm.data.tokenize import load_tokenizer

    path = Path(path)
    model = CrossViewModel.from_pretrained(path, image_size=image_size, window_size=window_size)
    if (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists():
        source = str(path)
    else:
        source = model.cfg.text.tokenizer or model.cfg.text.name_or_path
    if not source:
        raise FileNotFoundError(
            f"model folder {path} has no tokenizer files and its config names no tokenizer; save it there with "
            "tokenizer.save_pretrained(folder)"
        )
    try:
        tokenizer = load_tokenizer(source)
    except OSError as err:
        if source == str(path):
            raise
        # transformers' own message names neither the model folder nor why a tokenizer was looked for elsewhere
        raise FileNotFoundError(
            f"model folder {path} has no tokenizer files, and the tokenizer its config names ({source}) cannot be "
            f"loaded: {err} -- save the tokenizer into the folder with tokenizer.save_pretrained(folder), or make "
            f"{source} available (a local folder, or the hub's copy in the cache)"
        ) from err
    check_tokenizer_fits(model, tokenizer, path, source)
    return model, tokenizer


def resolve_model_folder(
    name_or_path: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """The model folder behind what :func:`load` accepts: ``hf-hub:ORG/NAME`` (:mod:`cclm.inference.hub`), an
    existing folder, or a registered pretrained name (:mod:`cclm.inference.registry`: downloaded or taken from
    ``checkpoint``, converted once into the cache ``cache_dir``). A folder comes back as an absolute path (not
    resolving symbolic links), so that what is recorded of it (a search index's model) holds from any directory."""
    from cclm.inference import hub, registry

    if hub.is_hub_name(name_or_path):
        if checkpoint is not None:
            raise ValueError("checkpoint= is for registered pretrained names, not hf-hub: repositories")
        return hub.hub_folder(str(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.is_dir() or not registry.is_pretrained_name(name_or_path):
        if checkpoint is not None:
            raise registry.PretrainedError(
                f"checkpoint= needs a registered pretrained name ({', '.join(registry.list_pretrained())}), "
                f"got '{name_or_path}'"
            )
        if not path.exists():
            raise FileNotFoundError(
                f"'{name_or_path}' is neither a model folder, a pretrained name "
                f"({', '.join(registry.list_pretrained())}) nor hf-hub:ORG/NAME"
            )
        return Path(os.path.abspath(path))
    return registry.pretrained_folder(str(name_or_path), checkpoint=checkpoint, cache_dir=cache_dir)


def batched(items: Sequence, size: int) -> Iterator[Sequence]:
    _check_batch_size(size)
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass
class CCLM:
    """A trained cross-view model ready for inference: model, tokenizer, its text normaliser and evaluation
    transform."""

    model: CrossViewModel
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype

    def __post_init__(self):
        if self.dtype not in PRECISION_OF_DTYPE:
            raise ValueError(f"dtype must be one of {list(PRECISION_OF_DTYPE)}, got {self.dtype}")
        self.model = self.model.to(device=self.device, dtype=self.dtype).eval()
        self.image_size = int(self.model.cfg.vision.image_size)
        self.max_length = int(self.model.cfg.text.max_length)
        self.normalize = normalizer_for(self.model.cfg.text)  # the one the model was trained with
        self.transform = eval_transform(self.image_size)
        self.precision = PRECISION_OF_DTYPE[self.dtype]

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: str | Precision | torch.dtype = Precision.auto,
        image_size: int | None = None,
        window_size: int | None = None,
        checkpoint: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> CCLM:
        """A model as a ready :class:`CCLM` (model, tokenizer, evaluation transform); also ``cclm.load``.
        ``path``: a ``save_pretrained`` folder, a released checkpoint's name (:func:`cclm.list_pretrained`) or
        ``hf-hub:ORG/NAME`` (:func:`resolve_model_folder`). For released names, ``checkpoint``: the file when it
        must be downloaded by hand, ``cache_dir``: instead of ``$CCLM_CACHE`` / ``~/.cache/cclm``. ``device``: None or ``auto`` = the GPU when there
        is one; ``dtype``: a :class:`~cclm.config.Precision` (``auto`` = bf16 on a GPU that supports it, else
        fp32) or a torch dtype; ``image_size`` (and, for Swin,
        ``window_size``): run at another resolution, position tables interpolated as the reference does when it
        fine-tunes at 384 px (:func:`cclm.model.resize.resize_vision`); images are then loaded at that size."""
        folder = resolve_model_folder(path, checkpoint=checkpoint, cache_dir=cache_dir)
        model, tokenizer = load_model_tokenizer(folder, image_size, window_size)
        device = resolve_device(device)
        dtype = dtype if isinstance(dtype, torch.dtype) else compute_dtype(device, dtype)
        return cls(model, tokenizer, device, dtype)

    # ------------------------------------------------------------------------------------------ inputs
    def image_tensor(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """uint8 [B, 3, S, S] on the model's device, through the one image loader."""
        return torch.stack([self.transform(item) for item in images]).to(self.device)

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids, attention mask) [B, L] on the model's device: each text through the model's normaliser,
        then the tokenizer (padded to the longest, truncated at ``max_length`` tokens)."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string")
        enc = self.tokenizer(
            [self.normalize(t) for t in texts],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
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
        _check_batch_size(batch_size)
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
        _check_batch_size(batch_size)
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
        _check_batch_size(batch_size)
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

    @torch.inference_mode()
    def ground(self, images: Sequence[ImageLike], texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """The box of ``texts[i]`` in ``images[i]``: [N, 4] ``xyxy`` pixels of each image (a model with a box head:
        pretrained with region batches, or a converted CCLM-4M checkpoint; :mod:`cclm.inference.ground`)."""
        from cclm.inference.ground import ground_boxes

        _check_batch_size(batch_size)
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string")
        return ground_boxes(self.model, self.tokenizer, list(images), list(texts), batch_size=batch_size)

    # ------------------------------------------------------------------------------------------ retrieval
    def retrieve(
        self,
        queries: Sequence[str] | Sequence[ImageLike],
        gallery: Sequence | torch.Tensor,
        k: int = 10,
        rerank: bool = False,
        rerank_k: int | None = None,
        batch_size: int = 32,
        query_type: str = "auto",
    ) -> Retrieved:
        """Top-``k`` gallery items for each query by cosine similarity of the ITC features.

        Text queries search an image gallery; image queries search a text gallery. ``query_type="auto"`` decides
        by the queries: PIL images, ``pathlib.Path``, bytes and uint8 tensors are images; strings are images when
        every one of them names an existing file (``model.retrieve(image_paths, captions)``) and the gallery is
        not images itself, else texts. ``query_type="text"`` / ``"image"`` says it outright. ``gallery`` may be
        the items themselves or their features from :meth:`encode_images` / :meth:`encode_texts` ([G, embed_dim]). ``rerank=True`` re-scores
        each query's top ``rerank_k`` (default ``k``) candidates with the ITM head (:meth:`rerank`) and returns
        the top ``k`` by ITM probability; this needs the gallery items, not only their features.
        """
        if isinstance(queries, str):
            raise TypeError("queries must be a list, not one string")
        _check_batch_size(batch_size)
        _check_count("k", k)
        _check_count("rerank_k", rerank_k)
        text_queries = queries_are_text(queries, gallery, query_type)
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
        return self.rerank(
            queries,
            gallery,
            similarity.topk(depth, dim=1).indices,
            k,
            batch_size,
            query_type="text" if text_queries else "image",
        )

    @torch.inference_mode()
    def rerank(
        self,
        queries: Sequence[str] | Sequence[ImageLike],
        gallery: Sequence,
        candidates: torch.Tensor,
        k: int | None = None,
        batch_size: int = 32,
        query_type: str = "auto",
    ) -> Retrieved:
        """Re-score ``candidates`` [Q, C] (indices into ``gallery`` per query) with the ITM head and return each
        query's top ``k`` (default C) by match probability. ``query_type`` as in :meth:`retrieve`.

        The evaluation's batched re-ranker (:func:`cclm.evaluation.retrieval.itm_scores`): the queries and the
        distinct candidates are encoded once, and the (query, candidate) pairs of all queries are pooled into
        batches of ``batch_size`` pairs of similar caption length. Each image's cross-attention keys/values and
        each caption's first fusion-layer self-attention are shared by its pairs, not computed once per pair
        (the same probabilities as :meth:`match` to float rounding)."""
        _check_batch_size(batch_size)
        _check_count("k", k)
        candidates = torch.as_tensor(candidates, dtype=torch.long).cpu()
        k = candidates.shape[1] if k is None else min(k, candidates.shape[1])
        if candidates.numel() == 0:
            return Retrieved(torch.empty(candidates.shape[0], k), candidates[:, :k])
        used, position = torch.unique(candidates, return_inverse=True)
        items = [gallery[int(i)] for i in used]
        query_index = torch.arange(len(queries))[:, None].expand_as(candidates)
        if queries_are_text(queries, gallery, query_type):
            text_tokens, text_masks, text_feats = self._text_tokens(queries, batch_size)
            image_tokens, image_feats = self._image_tokens(items, batch_size)
            image_index, text_index = position, query_index
        else:
            image_tokens, image_feats = self._image_tokens(queries, batch_size)
            text_tokens, text_masks, text_feats = self._text_tokens(items, batch_size)
            image_index, text_index = query_index, position
        emb = Embeddings(image_feats, text_feats, image_tokens, text_tokens, text_masks)
        probs = itm_scores(
            self.model,
            emb,
            image_index.reshape(-1),
            text_index.reshape(-1),
            batch_size,
            self.precision,
            probability=True,
        )
        probs = probs.view(candidates.shape).cpu()
        order = probs.sort(dim=1, descending=True, stable=True).indices[
            :, :k
        ]  # equal scores: candidate order
        return Retrieved(probs.gather(1, order), candidates.gather(1, order))

    def _text_tokens(self, texts: Sequence[str], batch_size: int):
        ids = tokenize_texts(self.tokenizer, texts, self.max_length, self.normalize)
        pad_id = self.tokenizer.pad_token_id
        return embed_texts(
            self.model, ids, pad_id, batch_size, self.device, keep_tokens=True, precision=self.precision
        )

    def _image_tokens(self, images: Sequence[ImageLike], batch_size: int):
        return embed_images(
            self.model,
            images,
            self.transform,
            batch_size,
            self.device,
            keep_tokens=True,
            precision=self.precision,
        )


def _check_count(name: str, value: int | None) -> None:
    """``k`` / ``rerank_k``: None (the default) or a count; a negative one would be sliced from the end."""
    if value is not None and value < 0:
        raise ValueError(f"{name} must be 0 or more, got {value}")


def _check_batch_size(value: Any) -> None:
    """``batch_size``: a whole number, 1 or more (a negative one would silently give no batches, so empty
    results; 0 would fail deep inside ``range``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"batch_size must be a whole number, 1 or more, got {value!r}")


def _is_file(item: Any) -> bool:
    return isinstance(item, str) and os.path.isfile(item)


def queries_are_text(queries: Sequence, gallery: Sequence | torch.Tensor, query_type: str = "auto") -> bool:
    """Whether :meth:`CCLM.retrieve` reads ``queries`` as texts (searching images) or as images (searching
    texts); see its doc. A gallery that cannot be what the queries search is refused here, naming the item,
    rather than failing later on a caption opened as an image file."""
    if query_type not in QUERY_TYPES:
        raise ValueError(f"query_type must be one of {', '.join(QUERY_TYPES)}, got '{query_type}'")
    strings = all(isinstance(q, str) for q in queries)
    if query_type == "text" and not strings:
        raise TypeError("query_type='text' needs string queries")
    items = None if isinstance(gallery, torch.Tensor) else list(gallery)
    if query_type != "auto":
        text = query_type == "text"
    elif not strings:
        text = False
    elif items and not all(isinstance(g, str) for g in items):
        text = True  # the gallery holds images (Path, PIL, bytes, tensors): strings searching it are texts
    else:
        text = not (queries and all(_is_file(q) for q in queries))
    if items is None:
        return text
    if text:
        strings_in_gallery = [g for g in items if isinstance(g, str)]
        not_images = [g for g in strings_in_gallery if not os.path.isfile(g)]
        if not_images and len(not_images) < len(strings_in_gallery):  # some image files are missing
            raise MissingImageError(
                f"{len(not_images)} gallery images not found: {', '.join(map(str, not_images[:10]))}"
                + (" ..." if len(not_images) > 10 else "")
            )
        if not_images:  # no string of the gallery is a file: captions, searched with text queries
            raise ValueError(
                f"retrieve() read the queries as texts (they are strings and not all of them are existing "
                f"files), so the gallery must be images, but gallery item {not_images[0]!r} is no image file. "
                "To search captions with images, pass the images as queries: paths (str or Path), PIL images, "
                "bytes or uint8 tensors; a path that does not exist makes the queries texts (query_type='image' "
                "says it outright and names the missing file)"
            )
    elif not all(isinstance(g, str) for g in items):
        raise TypeError("image queries search a text gallery: the gallery must be strings (or text features)")
    elif query_type == "auto" and items and all(_is_file(g) for g in items):
        raise ValueError(
            "retrieve(): both the queries and the gallery are existing files; pass query_type='text' or 'image'"
        )
    return text


# cclm.load(path, ...): a model as a ready CCLM (model, tokenizer, evaluation transform); see
# CCLM.from_pretrained for what ``path`` may be (a folder, a released checkpoint's name, hf-hub:ORG/NAME).
load = CCLM.from_pretrained
