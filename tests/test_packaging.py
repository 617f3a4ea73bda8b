"""An installed package carries what it needs: every file under configs/ is in the wheel under share/cclm/configs
(which pip installs as <prefix>/share/cclm/configs), the converters come along, and cclm.config finds the
installed configs when there is no source checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import cclm.config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory) -> set[str]:
    """The file names in a wheel built offline (about 2 s) from a copy of the checkout, so the build's
    ``build/`` and ``*.egg-info`` folders never land in the working tree."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "__pycache__", "*.egg-info", "build", "demo_output", "output*", ".*_cache"
        ),
    )
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp),
            ".",
        ],
        cwd=source,
        env=env,
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp.glob("cclm-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def test_every_config_is_installed_under_share(wheel_files):
    shipped = {str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*") if p.is_file()}
    assert shipped  # the checkout has configs to ship
    # A wheel keeps data_files under <name>-<version>.data/data/, relative to the install prefix.
    data = {name.partition(".data/data/")[2] for name in wheel_files if ".data/data/" in name}
    installed = {name.removeprefix("share/cclm/") for name in data if name.startswith("share/cclm/configs/")}
    assert installed == {
        name.removeprefix("share/cclm/") for name in data
    }  # nothing else lands in the prefix
    assert installed == shipped


def test_the_wheel_holds_the_converters_and_the_synthetic_world(wheel_files):
    for module in (
        "data_prep/cli.py",
        "data_prep/world/build.py",
        "data_prep/world/grammar.py",
        "cclm/cli.py",
    ):
        assert module in wheel_files


def test_config_root_falls_back_to_the_installed_copy(tmp_path, monkeypatch):
    prefix = tmp_path / "prefix"
    installed = prefix / "share" / "cclm" / "configs"
    (installed / "model").mkdir(parents=True)
    # As if cclm were installed in site-packages, with no configs/ folder beside the package.
    monkeypatch.setattr(cclm.config, "__file__", str(tmp_path / "site-packages" / "cclm" / "config.py"))
    monkeypatch.setattr(sys, "prefix", str(prefix))
    monkeypatch.delenv("CCLM_CONFIG_DIR", raising=False)
    assert cclm.config._config_root() == installed
    # An explicit CCLM_CONFIG_DIR wins.
    own = tmp_path / "own"
    (own / "model").mkdir(parents=True)
    monkeypatch.setenv("CCLM_CONFIG_DIR", str(own))
    assert cclm.config._config_root() == own


def test_a_source_checkout_uses_its_own_configs(monkeypatch):
    monkeypatch.delenv("CCLM_CONFIG_DIR", raising=False)
    assert cclm.config._config_root() == REPO / "configs"
