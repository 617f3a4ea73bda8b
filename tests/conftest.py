"""Shared fixtures: a tiny tokenizer trained in ~1 s and the tiny model config. Nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
IGLUE_DIR = Path(os.environ.get("CCLM_IGLUE_DIR", REPO.parent / "shared" / "iglue"))

SENTENCES = [
    "a red circle above a blue square",
    "ein roter Kreis über einem blauen Quadrat",
    "un cercle rouge au-dessus d'un carré bleu",
    "un círculo rojo encima de un cuadrado azul",
    "青い四角の上に赤い丸",
    "蓝色正方形上方的红色圆形",
    "two small green triangles on the left",
    "zwei kleine grüne Dreiecke links",
    "deux petits triangles verts à gauche",
    "dos triángulos verdes pequeños a la izquierda",
]


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    from cclm.data.tokenize import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    return train_tokenizer(SENTENCES * 20, out, vocab_size=300)


@pytest.fixture
def tiny_model_cfg(tiny_tokenizer):
    from cclm.config import ModelConfig, load_config

    cfg = load_config(ModelConfig, REPO / "configs" / "model" / "tiny.yaml")
    cfg.text.encoder["vocab_size"] = len(tiny_tokenizer)
    return cfg


@pytest.fixture
def iglue_dir() -> Path:
    if not IGLUE_DIR.exists():
        pytest.skip(f"IGLUE annotations not found at {IGLUE_DIR} (set CCLM_IGLUE_DIR)")
    return IGLUE_DIR


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
