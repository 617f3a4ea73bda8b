"""cclm: cross-view multilingual vision-language pretraining."""

__version__ = "0.1.0"


def load(path, device=None, dtype="auto", image_size=None, window_size=None, checkpoint=None, cache_dir=None):
    """Load a model for inference (see :mod:`cclm.inference.api`); imported lazily. ``path``: a model folder, a
    released checkpoint's name (:func:`list_pretrained`) or ``hf-hub:ORG/NAME``. ``checkpoint``: the file of a
    released checkpoint you downloaded by hand; ``cache_dir``: where released checkpoints are converted (default
    ``$CCLM_CACHE``, else ``~/.cache/cclm``). ``image_size`` / ``window_size``: run the vision tower at another
    resolution (Swin window scaled with it)."""
    from cclm.inference.api import load as _load

    return _load(
        path,
        device=device,
        dtype=dtype,
        image_size=image_size,
        window_size=window_size,
        checkpoint=checkpoint,
        cache_dir=cache_dir,
    )


def list_pretrained() -> list[str]:
    """Names of the released CCLM checkpoints that :func:`load` accepts (:mod:`cclm.inference.registry`)."""
    from cclm.inference.registry import list_pretrained as _list

    return _list()


def pretrained_info(name: str) -> dict:
    """Where a released checkpoint is published and the settings that import it."""
    from cclm.inference.registry import pretrained_info as _info

    return _info(name)
