"""Shared fixtures: a tiny tokenizer trained in ~1 s, the tiny model config and a saved tiny model folder, the IGLUE
annotation folder, and one torch thread for modules that train. Nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

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


def build_test_world(
    out: Path, tokenizer_vocab: int | None = 400, split_cjk: bool = False, **world_options
) -> Path:
    """A synthetic world in ``out`` (``data_prep.world.build_world`` options) and, unless ``tokenizer_vocab`` is
    None, a tokenizer trained on its text in ``out/tokenizer`` (``split_cjk``: CJK characters one by one, as
    MLA's multilingual embedding wants)."""
    from cclm.data.tokenize import train_tokenizer
    from data_prep.world.build import build_world

    build_world(out, **world_options)
    if tokenizer_vocab:
        corpus = (out / "text" / "corpus.txt").read_text(encoding="utf-8").splitlines()
        train_tokenizer(corpus, out / "tokenizer", vocab_size=tokenizer_vocab, split_cjk=split_cjk)
    return out


def build_mla_world(out: Path, num_images: int, tokenizer_vocab: int = 300, **world_options) -> Path:
    """MLA's inputs: English and Japanese captions, ja-en parallel text, 32 px images and a tokenizer that splits
    CJK characters; ``world_options`` add to or replace those."""
    options = {"caption_langs": ("en", "ja"), "parallel_langs": ("ja",), "image_size": 32, **world_options}
    return build_test_world(out, tokenizer_vocab, split_cjk=True, num_images=num_images, **options)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    from cclm.data.tokenize import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    return train_tokenizer(SENTENCES * 20, out, vocab_size=300)


@pytest.fixture
def tokenizer_dir(tmp_path, tiny_tokenizer) -> Path:
    """The tiny tokenizer saved as a folder, for a config's ``model.text.tokenizer``."""
    tiny_tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    return tmp_path / "tokenizer"


@pytest.fixture
def tiny_model_cfg(tiny_tokenizer):
    from cclm.config import ModelConfig, load_config

    cfg = load_config(ModelConfig, REPO / "configs" / "model" / "tiny.yaml")
    cfg.text.encoder["vocab_size"] = len(tiny_tokenizer)
    return cfg


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_model_cfg, tiny_tokenizer) -> Path:
    """A saved tiny random cross-view model with its tokenizer (a ``save_pretrained`` folder)."""
    from cclm.model import CrossViewModel

    out = tmp_path / "model"
    CrossViewModel(tiny_model_cfg, load_pretrained=False).save_pretrained(out)
    tiny_tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture
def images(tmp_path):
    """Four noise images of different shapes (PNG: pixels exact, no DCT draft): the fine-tuning augmentation
    tests' training images (a module's own ``images`` fixture replaces this one)."""
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(90, 70), (64, 96), (120, 80), (80, 80)]):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): on the shared
    2-core test machine torch's default threads oversubscribe, and tiny models train fastest single-threaded.
    The process-wide setting is restored for the other modules."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def iglue_dir() -> Path:
    if not IGLUE_DIR.exists():
        pytest.skip(f"IGLUE annotations not found at {IGLUE_DIR} (set CCLM_IGLUE_DIR)")
    return IGLUE_DIR


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
