"""cclm: cross-view multilingual vision-language pretraining.

``cclm.load``, ``cclm.list_pretrained`` and ``cclm.pretrained_info`` are imported on first use, so that
``import cclm`` stays cheap (no torch) for the command line and tools that only read configs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> module that defines it
_LAZY = {
    "load": "cclm.inference.api",  # a model for inference, from a folder, a released name or hf-hub:ORG/NAME
    "list_pretrained": "cclm.inference.registry",  # names of the released CCLM checkpoints load() accepts
    "pretrained_info": "cclm.inference.registry",  # where a released checkpoint is published, how it imports
}
__all__ = ["__version__", "list_pretrained", "load", "pretrained_info"]

if TYPE_CHECKING:
    from cclm.inference.api import load
    from cclm.inference.registry import list_pretrained, pretrained_info


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cclm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
