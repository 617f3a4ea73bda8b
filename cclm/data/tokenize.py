"""Tokenizers: any HF tokenizer by hub name or folder, and a small XLM-R-style tokenizer trained offline."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

XLMR_SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
# What ``split_cjk`` isolates: CJK ideographs (the Han script), as BERT's tokenizer does; kana and hangul are not.
CJK_PATTERN = r"\p{Han}"


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    path = Path(name_or_path)
    if (
        path.exists()
        and not (path / "tokenizer.json").exists()
        and not (path / "tokenizer_config.json").exists()
    ):
        raise FileNotFoundError(f"tokenizer folder {path} has no tokenizer.json / tokenizer_config.json")
    return AutoTokenizer.from_pretrained(name_or_path)


# tokenizers' UnigramTrainer gives the characters it must keep but did not score the scores min, min - 1e-4,
# min - 2e-4, ... in the iteration order of a hash set (its ``min_score_penalty_delta``)
_UNSCORED_CHAR_STEP = 1e-4


def _order_unigram_ties(tokenizer) -> None:
    """Make a trained Unigram model a function of its corpus and settings. The trainer's output differs from run to
    run in three ways, all arbitrary: float noise from its parallel sums (~1e-15), pieces of equal score in
    hash-map order, and the characters it keeps without a score of their own given descending scores in hash-set
    order at the end of the vocabulary. Round the scores to 1e-8, hand those last scores out in character order,
    and number the pieces by (score descending, piece), the special tokens first as trained."""
    import json

    from tokenizers import models

    state = json.loads(tokenizer.to_str())["model"]
    special = len(XLMR_SPECIAL_TOKENS)
    pieces = [(piece, score) for piece, score in state["vocab"]]
    singles = [i for i in range(special, len(pieces)) if len(pieces[i][0]) == 1]
    chain = singles[-1:]  # the unscored characters: the last single characters, 1e-4 apart
    for i in reversed(singles[:-1]):
        if abs(pieces[i][1] - pieces[chain[0]][1] - _UNSCORED_CHAR_STEP) > 1e-9:
            break
        chain.insert(0, i)
    for i, char in zip(chain, sorted(pieces[i][0] for i in chain)):
        pieces[i] = (char, pieces[i][1])
    pieces = [(piece, round(score, 8)) for piece, score in pieces]
    ordered = pieces[:special] + sorted(pieces[special:], key=lambda item: (-item[1], item[0]))
    tokenizer.model = models.Unigram(ordered, state["unk_id"], state.get("byte_fallback", False))


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path,
    vocab_size: int = 1000,
    model_max_length: int = 512,
    model: str = "unigram",
    split_cjk: bool = False,
):
    """Train a Unigram tokenizer (Metaspace pre-tokenisation, as XLM-R's SentencePiece) and save it as an HF
    ``PreTrainedTokenizerFast`` folder with XLM-R's special tokens and ids (<s>=0, <pad>=1, </s>=2, <unk>=3).
    Case and punctuation are kept; no language-specific pre-processing, so it works for zh/ja too.
    ``model="bpe"`` trains a BPE model with the same pre-tokenisation and special tokens instead.

    ``split_cjk``: every CJK ideograph (Han script, :data:`CJK_PATTERN`) becomes a pre-token of its own after
    Metaspace, as BERT's tokenizer does; kana runs are left to the model. Without it a sentence written without
    spaces is one Metaspace "word", and a small vocabulary goes to whole phrases of it (the demo's world: 75% of
    1000 pieces, ~2 pieces per Japanese or Chinese sentence; docs/demo.md). Text without Han characters is
    pre-tokenised exactly as without the option; decoding gives the text back.

    Note: the Unigram trainer seeds its pieces from substrings that repeat among the *distinct* pre-tokenised
    words, whatever their counts, so a frequent word that occurs in one form only may end up spelt in letters;
    BPE counts word frequencies (docs/demo.md)."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    if model == "unigram":
        tokenizer = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=XLMR_SPECIAL_TOKENS, unk_token="<unk>", max_piece_length=12
        )
    elif model == "bpe":
        tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=XLMR_SPECIAL_TOKENS)
    else:
        raise ValueError(f"unknown tokenizer model {model!r} (expected 'unigram' or 'bpe')")
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    if split_cjk:
        # After Metaspace, so that the meta symbol that starts a word stays a piece of its own: a character is the
        # same piece at the start of a sentence as inside it ("▁", "左", ... not "▁左").
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [tokenizer.pre_tokenizer, pre_tokenizers.Split(Regex(CJK_PATTERN), behavior="isolated")]
        )
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if model == "unigram":
        _order_unigram_ties(tokenizer)
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        sep_token="</s>",
        cls_token="<s>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=model_max_length,
    )
    out_dir = Path(out_dir)
    fast.save_pretrained(str(out_dir))
    return fast


class BatchEncoder:
    """``tokenizer(texts, padding="longest", truncation=True, max_length=n)`` as int64 ``(ids, mask)`` tensors,
    for the loader workers' collation.

    A fast (Rust-backed) HF tokenizer is called without its Python wrapper, which costs about as much again as the
    encoding itself for a batch of short captions: the backend gets the truncation and padding settings the
    wrapper would give it and encodes the batch without offsets. The first batch is also encoded by the
    wrapper; if the two differ in any token of it (another ``transformers`` version, a tokenizer the settings below do not
    describe), the wrapper is used from then on, with a warning. A slow tokenizer always goes through the
    wrapper."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = backend if hasattr(backend, "encode_batch_fast") else None
        self._checked = False

    def __call__(self, texts: list[str], max_length: int):
        if self._backend is not None and self._checked:
            return self._fast(texts, max_length)
        expected = self._wrapped(texts, max_length)
        if self._backend is not None:
            self._checked = True
            try:
                ours = self._fast(texts, max_length)
                same = all(a.shape == b.shape and bool((a == b).all()) for a, b in zip(ours, expected))
                why = "differs from the transformers wrapper on a batch"
            except Exception as err:  # noqa: BLE001 - a backend this code does not know: the wrapper still works
                same, why = False, f"fails ({type(err).__name__}: {err})"
            if not same:
                log.warning(
                    "%s: the Rust tokenizer called directly %s; tokenising through the wrapper",
                    type(self.tokenizer).__name__,
                    why,
                )
                self._backend = None
        return expected

    def _wrapped(self, texts: list[str], max_length: int):
        enc = self.tokenizer(
            texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
        )
        return enc["input_ids"].long(), enc["attention_mask"].long()

    def _fast(self, texts: list[str], max_length: int):
        tok, backend = self.tokenizer, self._backend
        truncation = {"max_length": max_length, "stride": 0, "strategy": "longest_first"}
        truncation["direction"] = tok.truncation_side
        current = backend.truncation
        if current is None or {key: current.get(key) for key in truncation} != truncation:
            backend.enable_truncation(**truncation)
        padding = {"length": None, "direction": tok.padding_side, "pad_id": tok.pad_token_id}
        padding.update(pad_token=tok.pad_token, pad_type_id=tok.pad_token_type_id, pad_to_multiple_of=None)
        if backend.padding != padding:
            backend.enable_padding(**padding)
        split = bool(getattr(tok, "split_special_tokens", False))
        if backend.encode_special_tokens != split:
            backend.encode_special_tokens = split
        encodings = backend.encode_batch_fast(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        return torch.from_numpy(ids), torch.from_numpy(mask)
