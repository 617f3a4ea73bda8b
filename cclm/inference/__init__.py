"""Using a trained model: the inference API (:func:`load`), image-folder search (``cclm index`` / ``cclm search``),
import of the official CCLM checkpoints (``cclm convert-reference``), the registry of released checkpoints
(:mod:`~cclm.inference.registry`), the Hugging Face Hub (:mod:`~cclm.inference.hub`) and the CLIP_benchmark
adapter (:mod:`~cclm.inference.clip_benchmark`)."""

from cclm.inference.api import CCLM, Retrieved, eval_transform, load
from cclm.inference.registry import list_pretrained, pretrained_info

__all__ = ["CCLM", "Retrieved", "eval_transform", "list_pretrained", "load", "pretrained_info"]
