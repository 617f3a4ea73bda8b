"""``torch.compile`` of a model's towers (``model.compile: true``), one repeated layer at a time.

The layers of a transformer stack run the same code, so compiling each layer ("regional" compilation) compiles
each kind of layer once and reuses the result for the others: for the cross-view model the text layers, the
fusion layers (with cross-attention) and the vision blocks are three compilations, whatever the depth. A whole
stack would be compiled anew for each depth and break its graph at the loop over layers. The repeated layers are
found by shape, not by class (this layer sits below the models): the entries of every ``nn.ModuleList`` or
``nn.Sequential`` whose children are all of one class. ``nn.Module.compile`` compiles in place, without the
``_orig_mod.`` wrapper, so parameter names, checkpoints, export and evaluation are unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn


def wants_compile(model: nn.Module) -> bool:
    """Whether a module inside ``model`` carries a model config with ``compile: true``."""
    return any(bool(getattr(getattr(module, "cfg", None), "compile", False)) for module in model.modules())


def repeated_layers(module: nn.Module) -> Iterator[nn.Module]:
    """The entries of each list of same-class layers in ``module``, outermost lists only."""
    for child in module.children():
        entries = list(child.children())
        if isinstance(child, (nn.ModuleList, nn.Sequential)) and _one_class(entries):
            yield from entries
        else:
            yield from repeated_layers(child)


def _one_class(entries: list[nn.Module]) -> bool:
    return len(entries) > 1 and len({type(entry) for entry in entries}) == 1


def compile_towers(model: nn.Module, **options) -> int:
    """Compile every repeated layer of ``model`` in place; ``options`` go to ``torch.compile`` (``mode``,
    ``backend``, ``fullgraph``, ...). Returns the number of layers compiled."""
    _plain_attn_names(model)
    layers = list(repeated_layers(model))
    for layer in layers:
        layer.compile(**options)
    return len(layers)


def _plain_attn_names(model: nn.Module) -> None:
    """HF layers branch on ``config._attn_implementation.startswith(...)``; our str-subclass enum there makes
    TorchDynamo break the graph at every attention call, a plain ``str`` does not."""
    for module in model.modules():
        config = getattr(module, "config", None)
        name = getattr(config, "_attn_implementation", None)
        if isinstance(name, str) and type(name) is not str:
            config._attn_implementation = str(name)
