"""A Hugging Face seq2seq translation model (NLLB, M2M100, Marian; hub name or local folder) that translates
lists of sentences from one source language into target languages, batched by length: within a window of
sentences, sorted by token length so that a batch pads little, results put back in input order.

Which family a model is (and so how languages are chosen) is read from the model, not its name: Marian by its
``model_type``, NLLB by its tokenizer's ``eng_Latn`` token, M2M100 by ``__en__``. Every target is checked when
the model is loaded, before any work is done (:mod:`data_prep.translation.codes`)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch

from cclm.data.languages import base_language
from cclm.errors import UserError
from data_prep.translation import codes

FAMILIES = ("nllb", "m2m100", "marian")
_NLLB_TOKEN = re.compile(r"[a-z]{3}_[A-Z][a-z]{3}")


@dataclass(frozen=True)
class GenerationSettings:
    batch_size: int = 32
    num_beams: int = 1
    max_input_tokens: int = 256  # longer sources are truncated (and counted)
    max_new_tokens: int = (
        256  # per batch also at most 2 x its longest source + 10: a runaway output stops early
    )
    sort_window: int = 10000  # sentences sorted by length together

    def __post_init__(self) -> None:
        for name in ("batch_size", "num_beams", "max_input_tokens", "max_new_tokens", "sort_window"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")


@dataclass
class Translations:
    texts: list[str]  # "" where the model wrote nothing
    truncated: list[bool]  # the source reached max_input_tokens and was cut there
    capped: list[bool] | None = None  # the output reached its length cap unfinished (None: none did)

    def __post_init__(self) -> None:
        if self.capped is None:
            self.capped = [False] * len(self.texts)


class Output(NamedTuple):
    text: str
    capped: bool  # cut at its length cap before the model wrote </s>: maybe half a sentence


@dataclass
class Throughput:
    sentences: int = 0
    source_tokens: int = 0
    output_tokens: int = 0
    seconds: float = 0.0


@dataclass
class _Target:
    prefix: str = ""  # Marian multi-target: ">>fra<< " in front of every source
    forced_bos: int | None = None  # NLLB / M2M100: the target language's token starts the output


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise UserError(f"--device {device}: choose auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is visible (use --device cpu or auto)")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    chosen = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if chosen is None:
        raise UserError(f"--dtype {dtype}: choose auto, float32, bfloat16 or float16")
    if chosen != torch.float32 and device.type == "cpu":
        raise UserError(f"--dtype {dtype} is for GPUs; on CPU use float32 (or auto)")
    return chosen


def load_model(name: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForSeq2SeqLM.from_pretrained(name, dtype=dtype)
    except (OSError, ValueError) as err:
        raise UserError(
            f"cannot load translation model {name!r}: {err}. Pass a Hugging Face hub name or a local folder "
            "holding config.json, the weights and the tokenizer files; offline, download it first "
            "(`hf download NAME`) and set HF_HUB_OFFLINE=1"
        ) from None
    return tokenizer, model.to(device).eval()


def model_family(tokenizer, model) -> str:
    def has_token(token: str) -> bool:
        token_id = tokenizer.convert_tokens_to_ids(token)
        return token_id is not None and token_id != tokenizer.unk_token_id

    if model.config.model_type == "marian":
        return "marian"
    if model.config.model_type == "m2m_100" and has_token("eng_Latn"):
        return "nllb"
    if model.config.model_type == "m2m_100" and has_token("__en__"):
        return "m2m100"
    raise UserError(
        f"unsupported translation model (model_type {model.config.model_type!r}): cclm prep translate knows NLLB, "
        "M2M100 and Marian (OPUS-MT) models"
    )


def _m2m100_codes(tokenizer) -> list[str]:
    """Language codes of an M2M100 model whose tokenizer class has no ``lang_code_to_id`` (its ``__de__`` tokens)."""
    return [m.group(1) for t in tokenizer.get_vocab() if (m := re.fullmatch(r"__([a-z]{2,3})__", t))]


class Translator:
    """``Translator(name, "en", ["de", "fr"]).translate(sentences, "de")``; ``throughput`` adds up the work."""

    def __init__(
        self,
        name: str,
        source_lang: str,
        targets: list[str],
        device: str = "auto",
        dtype: str = "auto",
        settings: GenerationSettings | None = None,
    ):
        self.name, self.settings = name, settings or GenerationSettings()
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer, self.model = load_model(name, self.device, self.dtype)
        self.family = model_family(self.tokenizer, self.model)
        self.source_lang = codes.cclm_code(source_lang, "--source-lang")
        self.targets = {t: self._target(codes.cclm_code(t, "target")) for t in targets}
        self.throughput = Throughput()

    # -------------------------------------------------------------------------------------------- languages
    def _target(self, target: str) -> _Target:
        tok = self.tokenizer
        if self.family in ("nllb", "m2m100"):
            if self.family == "nllb":
                supported = {t for t in tok.all_special_tokens if _NLLB_TOKEN.fullmatch(t)}
                src, tgt = (codes.nllb_code(c, supported, self.name) for c in (self.source_lang, target))
            else:
                supported = set(getattr(tok, "lang_code_to_id", None) or _m2m100_codes(tok))
                src, tgt = (codes.m2m100_code(c, supported, self.name) for c in (self.source_lang, target))
                tgt = f"__{tgt}__"
            tok.src_lang = src
            return _Target(forced_bos=tok.convert_tokens_to_ids(tgt))
        model_src, model_tgt = codes.marian_pair(
            self.name, getattr(tok, "source_lang", None), getattr(tok, "target_lang", None)
        )
        if model_src and base_language(model_src) != base_language(self.source_lang):
            raise codes.UnsupportedLanguage(
                f"Marian model {self.name} translates from {model_src!r}, not from {self.source_lang!r}"
            )
        multi = list(getattr(tok, "supported_language_codes", []) or [])
        if multi:
            return _Target(prefix=codes.marian_target_token(target, multi, self.name) + " ")
        if model_tgt is None:
            raise codes.UnsupportedLanguage(
                f"cannot tell which language Marian model {self.name} writes: name its folder opus-mt-SRC-TGT or "
                "set target_lang in its tokenizer_config.json"
            )
        if base_language(model_tgt) != base_language(target):
            raise codes.UnsupportedLanguage(
                f"Marian model {self.name} translates into {model_tgt!r} only, not {target!r}: a Marian model "
                f"covers one language pair (use opus-mt-{base_language(self.source_lang)}-{base_language(target)})"
            )
        return _Target()

    # ------------------------------------------------------------------------------------------ translating
    def translate(self, sentences: list[str], target: str) -> Translations:
        """Translations of ``sentences`` (in the source language) into ``target``, in input order."""
        spec = self.targets[target]
        texts: list[str] = [""] * len(sentences)
        truncated = [False] * len(sentences)
        capped = [False] * len(sentences)
        window = self.settings.sort_window
        for start in range(0, len(sentences), window):
            chunk = sentences[start : start + window]
            ids = self.tokenizer(
                [spec.prefix + s for s in chunk], truncation=True, max_length=self.settings.max_input_tokens
            )["input_ids"]
            order = sorted(
                range(len(chunk)), key=lambda i: -len(ids[i])
            )  # longest first: memory errors early
            for b in range(0, len(order), self.settings.batch_size):
                batch = order[b : b + self.settings.batch_size]
                for i, output in zip(batch, self._generate([ids[i] for i in batch], spec)):
                    texts[start + i], capped[start + i] = output
                    truncated[start + i] = len(ids[i]) >= self.settings.max_input_tokens
        return Translations(texts, truncated, capped)

    @torch.inference_mode()
    def _generate(self, batch_ids: list[list[int]], spec: _Target) -> list[Output]:
        began = time.perf_counter()
        inputs = self.tokenizer.pad({"input_ids": batch_ids}, return_tensors="pt").to(self.device)
        # Each sentence's own output cap, applied after generation, so that what a sentence gets does not depend
        # on the sentences batched with it. Two steps more: one to see whether a sentence ends (</s>) right at
        # its cap, and one for models with forced_eos_token_id, which force </s> at the last step.
        caps = [min(self.settings.max_new_tokens, 2 * len(ids) + 10) for ids in batch_ids]
        forced = spec.forced_bos is not None
        out = self.model.generate(
            **inputs,
            num_beams=self.settings.num_beams,
            do_sample=False,
            max_new_tokens=max(caps) + forced + 2,
            **({"forced_bos_token_id": spec.forced_bos} if forced else {}),
        )
        # Drop the decoder start token (and the forced language token), and what is past a sentence's cap.
        out = out[:, 1 + forced :].cpu()
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        capped = [eos_ids.isdisjoint(row[: cap + 1].tolist()) for row, cap in zip(out, caps)]
        special = set(self.tokenizer.all_special_ids)
        rows = [[t for t in row[:cap].tolist() if t not in special] for row, cap in zip(out, caps)]
        texts = [t.strip() for t in self.tokenizer.batch_decode(rows, skip_special_tokens=True)]
        stats = self.throughput
        stats.sentences += len(batch_ids)
        stats.source_tokens += sum(len(ids) for ids in batch_ids)
        stats.output_tokens += sum(len(row) for row in rows)
        stats.seconds += time.perf_counter() - began
        return [Output(text, cut) for text, cut in zip(texts, capped)]
