"""``cclm prep translate``: add machine translations of image-caption shards' captions (or of a text corpus's
sentences) in target languages, with a Hugging Face NLLB, M2M100 or Marian model. See docs/translation.md;
the parts live in :mod:`data_prep.translation`."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from cclm.data.languages import base_language
from cclm.data.shards import VIEW_IMAGE_CAPTION, VIEW_PARALLEL, expand_shards, is_remote
from data_prep.common import require_file
from data_prep.translation.codes import cclm_code


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "translate", help="add machine translations to image-caption shards (or translate a text corpus)"
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--shards", help="image-caption shards (folder, brace pattern, glob; '::' joins several)"
    )
    source.add_argument("--text", help="a text corpus: one sentence per line (.txt) or jsonl (--text-field)")
    p.add_argument("--out", required=True, help="output folder (a rerun into it resumes)")
    p.add_argument(
        "--model", required=True, help="hub name or local folder: NLLB, M2M100 or Marian (OPUS-MT)"
    )
    p.add_argument("--targets", required=True, help="comma-separated target languages (cclm codes: de,fr,zh)")
    p.add_argument("--source-lang", default="en", help="language of the captions to translate (default en)")
    p.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu, cuda, cuda:1")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="auto: bfloat16 on a GPU that has it, else float32")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=32, help="sentences per generate() call (default 32)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search width (default 1: greedy)")
    p.add_argument("--max-input-tokens", type=int, default=256, help="longer sources are cut (and counted)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="output cap (also 2 x source + 10)")
    p.add_argument("--sort-window", type=int, default=10000, help="sentences sorted by length together")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    text = p.add_argument_group("text corpus (--text)")
    text.add_argument("--format", choices=("auto", "txt", "jsonl"), default="auto", help="auto: by extension")
    text.add_argument("--text-field", default="text", help="jsonl field holding the sentence (default text)")
    text.add_argument("--shard-samples", type=int, default=10000, help="input lines per output shard")
    text.add_argument("--prefix", default="shard", help="output shard file prefix (default shard)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def _targets(text: str, source: str) -> list[str]:
    targets = list(dict.fromkeys(cclm_code(t.strip(), "target") for t in text.split(",") if t.strip()))
    if not targets:
        raise ValueError("--targets: name at least one language")
    same = [t for t in targets if _language_and_script(t) == _language_and_script(source)]
    if same:
        raise ValueError(f"--targets: {same[0]} is the source language (--source-lang {source})")
    return targets


def _language_and_script(code: str) -> tuple[str, str | None]:
    """``en-US`` -> (en, None), ``zh-Hant`` -> (zh, Hant): a region is the same text, another script is not (a
    Simplified -> Traditional Chinese translation is a real target)."""
    scripts = [part for part in code.replace("_", "-").split("-")[1:] if len(part) == 4 and part.isalpha()]
    return base_language(code), (scripts[0].title() if scripts else None)


def _units(args: argparse.Namespace) -> tuple[list, str, list[Path]]:
    """The units of work (one per output shard), the output's view, and the input folders (never the output)."""
    from data_prep.translation.caption_shards import caption_units
    from data_prep.translation.text_corpus import text_units

    if args.text is None:
        inputs = [Path(u).parent for u in expand_shards(args.shards) if not is_remote(u)]
        return caption_units(args.shards), VIEW_IMAGE_CAPTION, inputs
    if args.shard_samples < 1:
        raise ValueError("--shard-samples must be at least 1")
    path = require_file(args.text)
    return text_units(path, args.format, args.text_field, args.shard_samples, args.prefix), VIEW_PARALLEL, []


def run(args: argparse.Namespace) -> int:
    import torch  # here, not at the top: `cclm prep --help` need not load torch

    from data_prep.translation.output import ResumableOutput
    from data_prep.translation.translator import GenerationSettings, Translator

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    source = cclm_code(args.source_lang, "--source-lang")
    targets = _targets(args.targets, source)
    units, view, inputs = _units(args)
    settings = GenerationSettings(
        args.batch_size, args.num_beams, args.max_input_tokens, args.max_new_tokens, args.sort_window
    )
    recorded = {  # a rerun must match these to resume (batching, device and dtype may change)
        "model": args.model,
        "source_lang": source,
        "targets": targets,
        "num_beams": args.num_beams,
        "max_input_tokens": args.max_input_tokens,
        "max_new_tokens": args.max_new_tokens,
        **({"text_field": args.text_field, "shard_samples": args.shard_samples} if args.text else {}),
    }
    command = "cclm prep " + " ".join(shlex.quote(a) for a in getattr(args, "argv", []))
    # The output folder is checked (and a rerun's settings compared) before the model loads.
    output = ResumableOutput(Path(args.out), recorded, view, command, inputs, [u.name for u in units])
    translator = Translator(args.model, source, targets, args.device, args.dtype, settings)
    result = output.run(units, translator, show_progress=not args.no_progress)
    print(report(result, translator, args.out))
    return 0


def report(result, translator, out: str) -> str:
    """The closing summary: counts per language and skip reason, and this run's throughput."""
    t = translator.throughput
    lines = [
        f"wrote {result.tally.samples} samples in {result.done_now + result.resumed} shards "
        f"({result.done_now} now, {result.resumed} finished by an earlier run) with {translator.name} "
        f"({translator.family}) on {translator.device} ({str(translator.dtype).removeprefix('torch.')})",
        *result.tally.lines(),
    ]
    if t.seconds > 0:
        lines.append(
            f"  this run: {t.sentences} unique sentences in {t.seconds:.1f} s of generation: "
            f"{t.sentences / t.seconds:.1f} sentences/s, {t.source_tokens / t.seconds:.0f} source tokens/s, "
            f"{t.output_tokens / t.seconds:.0f} output tokens/s"
        )
    lines.append(f"wrote {out} (manifest.json, sizes.json)")
    return "\n".join(lines)
