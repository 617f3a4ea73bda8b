"""cclm: cross-view multilingual vision-language pretraining."""

__version__ = "0.1.0"


def load(path, device=None, dtype="auto", image_size=None, window_size=None):
    """Load a trained model folder for inference (see :mod:`cclm.inference.api`); imported lazily.
    ``image_size`` / ``window_size``: run the vision tower at another resolution (Swin window scaled with it)."""
    from cclm.inference.api import load as _load

    return _load(path, device=device, dtype=dtype, image_size=image_size, window_size=window_size)
