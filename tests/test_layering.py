"""The layers of docs/architecture.md, checked on the code: a module imports only from its own layer or below
(statically, and through ``importlib`` strings), and the library never imports the converters in data_prep/."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Bottom to top. A module belongs to the longest prefix that names it.
LAYERS = {
    "cclm.config": 0,
    "cclm.jsonl": 0,
    "cclm.errors": 0,
    "cclm.text_safety": 0,
    "cclm.weights_files": 0,
    "cclm.runtime": 1,
    "cclm.losses": 2,
    "cclm.data": 2,
    "cclm.model": 3,
    "cclm.evaluation": 4,
    "cclm.tasks": 5,
    "cclm.train": 5,
    "cclm.recipes": 6,
    "cclm.inference": 6,
    "cclm": 7,  # the package's front door: cclm/__init__.py, cli.py, demo.py
    "data_prep": 7,
}
# Entry points sit on top of everything, whatever folder holds them.
ENTRY_POINTS = {"cli", "demo", "iglue_cli"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int | None:
    if module.rsplit(".", 1)[-1] in ENTRY_POINTS:
        return max(LAYERS.values())
    best = None
    for prefix, layer in LAYERS.items():
        if (module == prefix or module.startswith(prefix + ".")) and (
            best is None or len(prefix) > len(best[0])
        ):
            best = (prefix, layer)
    return best[1] if best else None


def is_module(name: str) -> bool:
    if not all(part.isidentifier() for part in name.split(".")):
        return False
    path = REPO.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every project import: import statements, and module names passed as strings to a call
    (``importlib.import_module("cclm.x")`` and the like; logger names are not imports)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # `from cclm import losses` imports the module cclm.losses
                sub = f"{node.module}.{alias.name}"
                found.append((node.lineno, sub if is_module(sub) else node.module))
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) != "getLogger"
        ):
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and is_module(arg.value):
                    found.append((node.lineno, arg.value))
    return [(line, name) for line, name in found if name.split(".")[0] in ("cclm", "data_prep")]


def test_no_module_imports_a_higher_layer():
    violations = []
    for path in sorted([*REPO.glob("cclm/**/*.py"), *REPO.glob("data_prep/**/*.py")]):
        module = module_name(path)
        own = layer_of(module)
        assert own is not None, f"{module} belongs to no layer: add it to LAYERS and docs/architecture.md"
        for line, name in imported_modules(path):
            other = layer_of(name)
            if other is not None and other > own:
                violations.append(
                    f"{path.relative_to(REPO)}:{line} ({module}, layer {own}) imports {name} (layer {other})"
                )
    assert not violations, "imports against the layering:\n" + "\n".join(violations)


def test_the_library_never_imports_the_converters():
    offenders = [
        f"{path.relative_to(REPO)}:{line}"
        for path in sorted(REPO.glob("cclm/**/*.py"))
        if layer_of(module_name(path)) < LAYERS["cclm"]
        for line, name in imported_modules(path)
        if name.split(".")[0] == "data_prep"
    ]
    assert not offenders, offenders
