"""Writing safetensors files that others may read: safetensors (0.8) creates its files with mode 0600 whatever the
umask, so on a shared cluster a colleague could not load a model whose other files (config, tokenizer) they can
read. Every weights file cclm writes goes through here and gets the mode the umask gives any new file."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file, save_model


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    save_file(tensors, str(path))
    _as_the_umask_allows(path)


def save_module(module: torch.nn.Module, path: str | os.PathLike) -> None:
    """A module's weights, tied tensors once (:func:`safetensors.torch.save_model`)."""
    save_model(module, str(path))
    _as_the_umask_allows(path)


def _as_the_umask_allows(path: str | os.PathLike) -> None:
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``os.umask`` can only set it, and
    another thread creating a file meanwhile would get the temporary value)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:  # not Linux
        status = ""
    for line in status.splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
