"""The skip-reason names docs/data.md lists are exactly those the ``cclm prep`` converters count: the registry
(``data_prep/skip_reasons.py``, which ``SplitWriter.skip`` enforces), every literal name the converters' code
passes to ``skip(...)``, and the doc's table agree."""

from __future__ import annotations

import ast
import re
from argparse import Namespace
from pathlib import Path

import pytest

from data_prep.common import SplitWriter
from data_prep.skip_reasons import SKIP_REASONS

REPO = Path(__file__).resolve().parent.parent
# ``cclm prep translate`` keeps its own tally, documented in docs/translation.md
CONVERTER_FILES = [
    p
    for p in sorted((REPO / "data_prep").rglob("*.py"))
    if "translation" not in p.parts and p.name != "translate.py"
]


def documented_reasons() -> list[str]:
    text = (REPO / "docs" / "data.md").read_text(encoding="utf-8")
    section = text.split("### Skip reasons (`cclm prep`)", 1)[1].split("\n#", 1)[0]
    return re.findall(r"^\| `([a-z0-9_]+)` \|", section, flags=re.MULTILINE)


def literal_skip_reasons() -> dict[str, list[str]]:
    """Every string literal passed first to a ``skip(...)`` call, or returned as a worker's skip reason
    (``return ..., "reason"``), in the converters' source: name -> where."""
    found: dict[str, list[str]] = {}
    for path in CONVERTER_FILES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", getattr(node.func, "id", "")) == "skip"
            ):
                names = node.args[:1]
            elif isinstance(node, ast.Return) and isinstance(node.value, ast.Tuple):
                names = node.value.elts[-1:]
            for arg in names:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value:
                    found.setdefault(arg.value, []).append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_docs_list_exactly_the_registry():
    documented = documented_reasons()
    assert len(documented) == len(set(documented)), "a reason is listed twice in docs/data.md"
    assert set(documented) == set(SKIP_REASONS)


def test_every_literal_reason_in_the_code_is_registered():
    found = literal_skip_reasons()
    assert len(found) > 20  # the scan sees the converters
    unregistered = {name: where for name, where in found.items() if name not in SKIP_REASONS}
    assert unregistered == {}


def test_split_writer_refuses_an_unregistered_reason(tmp_path):
    args = Namespace(
        out=str(tmp_path),
        prefix="shard",
        shard_samples=10,
        shard_bytes=1e6,
        languages="",
        dedup=False,
        val_fraction=0.0,
    )
    with SplitWriter(args, "parallel_text") as writer:
        writer.skip("empty_text", n=2)
        with pytest.raises(KeyError, match="skip_reasons.py"):
            writer.skip("empty_txt")
        assert dict(writer.skipped) == {"empty_text": 2}
