"""cclm: cross-view multilingual vision-language pretraining."""

__version__ = "0.1.0"


def load(path, device=None, dtype="auto"):
    """Load a trained model folder for inference (see :mod:`cclm.inference.api`); imported lazily."""
    from cclm.inference.api import load as _load

    return _load(path, device=device, dtype=dtype)
