"""Tiny randomly initialised translation models, saved like the hub's (config, weights, tokenizer files), for the
translation step's tests and benchmark. Nothing is downloaded: the sentencepiece models are trained here on a
few sentences. What they write is garbage; how it is batched, stored and counted is what is tested."""

from __future__ import annotations

import io
import json
from pathlib import Path

import sentencepiece as spm
import torch

SENTENCES = [
    "a red circle above a blue square",
    "two small green triangles on the left",
    "a dog runs along the beach at sunset",
    "people walking on a busy street in the rain",
    "a plate of food with rice and vegetables",
    "ein roter Kreis über einem blauen Quadrat",
    "un cercle rouge au-dessus d'un carré bleu",
    "the quick brown fox jumps over the lazy dog",
]


def train_sentencepiece(path: Path, vocab_size: int = 120, corpus: list[str] | None = None) -> list[str]:
    """A unigram model at ``path`` (no control pieces but ``<unk>``) trained on ``corpus`` (default
    :data:`SENTENCES`); returns its pieces."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus or SENTENCES * 10),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        hard_vocab_limit=False,
        unk_id=0,
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())
    processor = spm.SentencePieceProcessor(model_file=str(path))
    return [processor.id_to_piece(i) for i in range(processor.get_piece_size())]


def _sizes(d_model: int, layers: int, heads: int, init_std: float) -> dict:
    # A large init_std makes the output depend on the input (at 0.02 a random model writes one string for all).
    return dict(
        init_std=init_std,
        d_model=d_model,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=4 * d_model,
        decoder_ffn_dim=4 * d_model,
        max_position_embeddings=512,
    )


def build_marian(
    folder: Path,
    source: str = "en",
    target: str | None = "de",
    target_tokens: tuple[str, ...] = (),
    d_model: int = 32,
    layers: int = 1,
    heads: int = 2,
    vocab_size: int = 0,
    seed: int = 0,
    init_std: float = 1.0,
    corpus: list[str] | None = None,
) -> Path:
    """An OPUS-MT-style Marian model in ``folder``: one pair (``target``) or, with ``target_tokens`` such as
    ``(">>fra<<", ">>deu<<")``, a multi-target model. ``vocab_size`` pads the vocabulary to a real model's size
    (opus-mt-en-de: 58,101) for timing; ``corpus`` trains its sentencepiece model (a few hundred pieces)."""
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    pieces = train_sentencepiece(folder / "source.spm", 400 if corpus else 120, corpus)
    (folder / "target.spm").write_bytes((folder / "source.spm").read_bytes())
    vocab = {"</s>": 0, "<unk>": 1}
    for token in [*target_tokens, *pieces]:
        vocab.setdefault(token, len(vocab))
    while len(vocab) < vocab_size - 1:
        vocab[f"<unused{len(vocab)}>"] = len(vocab)
    vocab["<pad>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    files = [str(folder / n) for n in ("source.spm", "target.spm", "vocab.json")]
    MarianTokenizer(*files, source_lang=source, target_lang=target).save_pretrained(folder)
    pad = vocab["<pad>"]
    config = MarianConfig(
        vocab_size=len(vocab), pad_token_id=pad, decoder_start_token_id=pad, eos_token_id=0, forced_eos_token_id=0,
        **_sizes(d_model, layers, heads, init_std),
    )  # fmt: skip
    torch.manual_seed(seed)
    MarianMTModel(config).save_pretrained(folder)
    return folder


def build_m2m100(
    folder: Path, d_model: int = 32, layers: int = 1, heads: int = 2, seed: int = 0, init_std: float = 1.0
) -> Path:
    """An M2M100-style model: sentencepiece + ``vocab.json``, ``__de__``-style language tokens after the vocabulary."""
    from transformers import M2M100Config, M2M100ForConditionalGeneration, M2M100Tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    pieces = train_sentencepiece(folder / "sentencepiece.bpe.model")
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    tokenizer = M2M100Tokenizer(str(folder / "vocab.json"), str(folder / "sentencepiece.bpe.model"))
    tokenizer.save_pretrained(folder)
    config = M2M100Config(  # the 100 language tokens and 8 "madeup words" follow the vocabulary, as in m2m100_418M
        vocab_size=len(vocab) + 108, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
        **_sizes(d_model, layers, heads, init_std),
    )  # fmt: skip
    torch.manual_seed(seed)
    M2M100ForConditionalGeneration(config).save_pretrained(folder)
    return folder


def build_nllb(
    folder: Path, d_model: int = 32, layers: int = 1, heads: int = 2, seed: int = 0, init_std: float = 1.0
) -> Path:
    """An NLLB-200-style model: M2M100 weights, an NLLB tokenizer (its 202 FLORES codes as special tokens) over a
    character vocabulary."""
    from transformers import M2M100Config, M2M100ForConditionalGeneration, NllbTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for char in sorted(set("".join(SENTENCES).replace(" ", "▁")) | {"▁"}):
        vocab.setdefault(char, len(vocab))
    tokenizer = NllbTokenizer(vocab=vocab, merges=[])
    tokenizer.save_pretrained(folder)
    config = M2M100Config(
        vocab_size=len(tokenizer), pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
        **_sizes(d_model, layers, heads, init_std),
    )  # fmt: skip
    torch.manual_seed(seed)
    M2M100ForConditionalGeneration(config).save_pretrained(folder)
    return folder
