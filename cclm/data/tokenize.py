"""Tokenizers: any HF tokenizer by hub name or folder, and a small XLM-R-style tokenizer trained offline."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

XLMR_SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


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


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path,
    vocab_size: int = 1000,
    model_max_length: int = 512,
    model: str = "unigram",
):
    """Train a Unigram tokenizer (Metaspace pre-tokenisation, as XLM-R's SentencePiece) and save it as an HF
    ``PreTrainedTokenizerFast`` folder with XLM-R's special tokens and ids (<s>=0, <pad>=1, </s>=2, <unk>=3).
    Case and punctuation are kept; no language-specific pre-processing, so it works for zh/ja too.
    ``model="bpe"`` trains a BPE model with the same pre-tokenisation and special tokens instead."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
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
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(texts, trainer=trainer)
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
