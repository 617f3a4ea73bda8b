"""Text normalisation before tokenising, chosen by ``model.text.normalize`` and saved with the model.

``none`` leaves text to the tokenizer (cased, with punctuation). ``pre_caption`` is the CCLM reference's
(``dataset/utils.py`` ``pre_caption``), which its released checkpoints were trained and evaluated with: Python's
``str.lower``, the characters ``, . ' ! ? " ( ) * # : ; ~ - /`` become spaces, ``<person>`` becomes ``person``,
runs of two or more whitespace characters become one space, the ends are stripped, and the first ``max_words``
space-separated words are kept. Text that normalises to nothing comes back as ``""``; the reference raises there,
and cclm's callers count and skip such samples instead (pretraining) or keep the empty query (evaluation).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

_PUNCTUATION = re.compile(r"[,.'!?\"()*#:;~]")
_WHITESPACE_RUN = re.compile(r"\s{2,}")

Normalizer = Callable[[str], str]


def pre_caption(text: str, max_words: int = 0) -> str:
    """The reference's caption normalisation (see the module docstring); ``max_words`` 0 keeps every word."""
    text = (
        _PUNCTUATION.sub(" ", text.lower()).replace("-", " ").replace("/", " ").replace("<person>", "person")
    )
    text = _WHITESPACE_RUN.sub(" ", text).rstrip("\n").strip(" ")
    if max_words > 0:
        words = text.split(" ")
        if len(words) > max_words:
            text = " ".join(words[:max_words])
    return text


def _identity(text: str) -> str:
    return text


def normalizer_for(text_cfg: Any) -> Normalizer:
    """The normaliser a model's ``text`` config (``normalize``, ``max_words``) names; identity for ``none``."""
    from cclm.config import ConfigError, TextNormalize

    name = str(getattr(text_cfg, "normalize", TextNormalize.none))
    if name == TextNormalize.none.value:
        return _identity
    if name == TextNormalize.pre_caption.value:
        max_words = int(getattr(text_cfg, "max_words", 0) or 0)
        return functools.partial(pre_caption, max_words=max_words)  # picklable for loader workers
    choices = ", ".join(m.value for m in TextNormalize)
    raise ConfigError(f"model.text.normalize: unknown normaliser {name!r}, expected one of: {choices}")


def normalize_all(normalizer: Normalizer, texts: Sequence[str]) -> list[str]:
    return [normalizer(t) for t in texts]
