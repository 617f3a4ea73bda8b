"""Using a trained model: the inference API (:func:`load`), image-folder search (``cclm index`` / ``cclm search``)
and import of the official CCLM checkpoints (``cclm convert-reference``)."""

from cclm.inference.api import CCLM, Retrieved, eval_transform, load

__all__ = ["CCLM", "Retrieved", "eval_transform", "load"]
