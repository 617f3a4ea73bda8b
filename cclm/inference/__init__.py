"""Using a trained model: the inference API (:func:`load`), image-folder search (``cclm index`` / ``cclm search``),
import of the official CCLM checkpoints (``cclm convert-reference``) and model cards."""

from cclm.inference.api import CCLM, Retrieved, eval_transform, load

__all__ = ["CCLM", "Retrieved", "eval_transform", "load"]
