"""The collator's tokenisation calls a fast tokenizer's Rust backend directly (cclm.data.tokenize.BatchEncoder):
every batch must equal what the transformers wrapper gives, whatever the tokenizer's sides and special tokens,
and between calls that other code makes through the wrapper with other settings."""

from __future__ import annotations

import logging

import pytest
import torch

from cclm.data.tokenize import BatchEncoder
from tests.conftest import SENTENCES

TEXTS = [
    "a red circle above a blue square",
    "",
    "ein roter Kreis über einem blauen Quadrat " * 12,  # past max_length: truncated
    "un cercle rouge <mask> au-dessus d'un [MASK] carré bleu",  # special tokens' texts inside a caption
    "  extra   spaces\tand a tab ",
    "日本語のキャプション と émojis 🙂",
]


def wrapper(tokenizer, texts, max_length):
    enc = tokenizer(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"].long(), enc["attention_mask"].long()


def wordpiece_tokenizer():
    """A BERT-style tokenizer ([CLS] ... [SEP], lower-casing, WordPiece), trained here in a moment."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors, trainers
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    backend = Tokenizer(WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.train_from_iterator(
        SENTENCES * 5, trainers.WordPieceTrainer(vocab_size=200, special_tokens=special)
    )
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


@pytest.fixture(params=["unigram", "unigram-left", "wordpiece", "wordpiece-split-special"])
def tokenizer(request, tiny_tokenizer):
    if request.param.startswith("wordpiece"):
        tok = wordpiece_tokenizer()
        tok.split_special_tokens = request.param.endswith("split-special")  # "[MASK]" in a caption: 5 pieces
        yield tok
        return
    saved = (tiny_tokenizer.padding_side, tiny_tokenizer.truncation_side)
    if request.param == "unigram-left":
        tiny_tokenizer.padding_side, tiny_tokenizer.truncation_side = "left", "left"
    yield tiny_tokenizer
    tiny_tokenizer.padding_side, tiny_tokenizer.truncation_side = saved


def test_direct_encoding_equals_the_wrapper_batch_after_batch(tokenizer):
    encode = BatchEncoder(tokenizer)
    for max_length in (40, 8, 40):
        for batch in (TEXTS, TEXTS[::-1], TEXTS[:1], [t.upper() for t in TEXTS]):
            ours = encode(batch, max_length)  # first: the backend holds what the last wrapper call left
            expected = wrapper(tokenizer, batch, max_length)
            assert encode._backend is not None  # still on the direct path after the first batch's check
            for got, want in zip(ours, expected):
                assert got.dtype == torch.int64 and torch.equal(got, want)
            # other code tokenising through the wrapper with its own settings in between changes nothing
            tokenizer(batch[:2], padding="max_length", max_length=50)
            tokenizer(
                batch[:2],
                truncation=True,
                max_length=5,
                split_special_tokens=not tokenizer.split_special_tokens,
            )


def test_a_direct_encoding_that_differs_falls_back_to_the_wrapper_with_a_warning(
    tiny_tokenizer, monkeypatch, caplog
):
    encode = BatchEncoder(tiny_tokenizer)

    def off_by_one(texts, max_length):  # e.g. a transformers version whose wrapper does something more
        ids, mask = wrapper(tiny_tokenizer, texts, max_length)
        return ids + 1, mask

    monkeypatch.setattr(encode, "_fast", off_by_one)
    with caplog.at_level(logging.WARNING, logger="cclm.data.tokenize"):
        first = encode(TEXTS, 40)
    assert "differs from the transformers wrapper" in caplog.text
    assert encode._backend is None
    for got, want in zip(first, wrapper(tiny_tokenizer, TEXTS, 40)):
        assert torch.equal(got, want)
    for got, want in zip(encode(TEXTS[::-1], 12), wrapper(tiny_tokenizer, TEXTS[::-1], 12)):
        assert torch.equal(got, want)


def test_a_tokenizer_without_a_rust_backend_goes_through_its_wrapper():
    class Slow:  # the interface of a python ("slow") tokenizer: callable, no backend_tokenizer
        def __init__(self):
            self.calls = 0

        def __call__(self, texts, **kwargs):
            self.calls += 1
            assert kwargs == {
                "padding": "longest",
                "truncation": True,
                "max_length": 7,
                "return_tensors": "pt",
            }
            ids = torch.tensor([[5, 6, 1], [5, 0, 0]], dtype=torch.int32)
            return {"input_ids": ids, "attention_mask": (ids != 0).int()}

    slow = Slow()
    encode = BatchEncoder(slow)
    for _ in range(2):
        ids, mask = encode(["a b", "a"], 7)
        assert ids.dtype == mask.dtype == torch.int64 and ids.tolist() == [[5, 6, 1], [5, 0, 0]]
    assert slow.calls == 2


def test_a_direct_encoding_that_fails_falls_back_to_the_wrapper_with_a_warning(
    tiny_tokenizer, monkeypatch, caplog
):
    encode = BatchEncoder(tiny_tokenizer)

    def unknown_backend(texts, max_length):  # e.g. a tokenizers version whose backend takes other settings
        raise TypeError("enable_padding() got an unexpected keyword argument 'pad_to_multiple_of'")

    monkeypatch.setattr(encode, "_fast", unknown_backend)
    with caplog.at_level(logging.WARNING, logger="cclm.data.tokenize"):
        ids, mask = encode(TEXTS, 40)
    assert "fails (TypeError: enable_padding()" in caplog.text and encode._backend is None
    expected = wrapper(tiny_tokenizer, TEXTS, 40)
    assert torch.equal(ids, expected[0]) and torch.equal(mask, expected[1])
