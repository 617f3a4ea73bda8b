"""The shard patterns the docs, configs and launch scripts show name the files the converters write
(``<prefix>-NNNNNN.tar``, prefix ``shard`` unless ``--prefix`` says otherwise): a pasted example must match."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from data_prep.common import add_output_options

REPO = Path(__file__).resolve().parent.parent
# A brace range of six-digit shard numbers and the file-name text before it: `.../NAME{000000..000331}.tar`.
PATTERN = re.compile(r"([^/'\"\s`=]*)\{\d{6}\.\.\d{6}\}\.tar")


def documented_files() -> list[Path]:
    """README, docs, configs, every launch script (``*.sh``, ``slurm.sbatch``) and the sources whose docstrings
    and ``--help`` texts show patterns (``cclm``, ``data_prep``, ``tools``, ``benchmarks``); not the tests."""
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    files += sorted((REPO / "configs").rglob("*.yaml"))
    files += sorted(p for p in (REPO / "launch").iterdir() if p.is_file())
    for folder in ("cclm", "data_prep", "tools", "benchmarks"):
        files += sorted((REPO / folder).rglob("*.py"))
    return files


def default_prefix() -> str:
    parser = argparse.ArgumentParser()
    add_output_options(parser)
    return parser.parse_args(["--out", "x"]).prefix


def test_every_documented_shard_pattern_names_the_converters_files():
    prefix = default_prefix()
    found, wrong = 0, []
    for path in documented_files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for match in PATTERN.finditer(line):
                found += 1
                if match.group(1) != f"{prefix}-":
                    wrong.append(f"{path.relative_to(REPO)}:{number}: {match.group(0)}")
    assert found >= 5, "the scan finds the documented examples"
    assert not wrong, f"patterns the converters' shard-NNNNNN.tar files do not match: {wrong}"


def test_every_documented_prep_command_exists():
    """`cclm prep NAME` in the docs, configs, launch scripts and help texts names a real converter (a config
    comment named `cclm prep parallel`, which does not exist)."""
    from data_prep.cli import SUBCOMMANDS

    found, wrong = 0, []
    for path in documented_files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for match in re.finditer(r"cclm prep ([a-z][a-z0-9-]*)", line):
                found += 1
                if match.group(1) not in SUBCOMMANDS:
                    wrong.append(f"{path.relative_to(REPO)}:{number}: {match.group(0)}")
    assert found >= 20, "the scan finds the documented commands"
    assert not wrong, f"no such cclm prep command: {wrong}"
