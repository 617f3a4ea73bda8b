"""``cclm export CKPT OUT``: a checkpoint (or an output_dir, meaning its newest complete checkpoint) ->
a ``save_pretrained`` folder (fp32 safetensors + config + tokenizer) that ``CrossViewModel.from_pretrained``
loads. Works for every ZeRO stage: the consolidated fp32 weights were gathered when the checkpoint was saved.
``--push-to-hub ORG/NAME`` then uploads the folder, model card included, to the Hugging Face Hub
(:func:`cclm.train.publish.push_to_hub`; ``cclm.load("hf-hub:ORG/NAME")`` loads it). When the push fails (no
network, offline mode), the exported folder stays complete: ``cclm export --push-only OUT --push-to-hub
ORG/NAME`` pushes it again without exporting."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

from cclm.config import ConfigError, ModelConfig, from_dict
from cclm.errors import CheckpointError, UserError
from cclm.runtime import checkpoint
from cclm.runtime.output_dir import aside_path


def resolve_checkpoint(path: str | Path) -> Path:
    path = Path(path)
    if (path / checkpoint.COMPLETE).exists():
        return path
    latest = checkpoint.latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path} is neither a complete checkpoint nor an output_dir holding one")
    return latest


def model_config_of(ckpt: Path, run_config: dict) -> ModelConfig:
    """The model config a pretraining checkpoint was written with; a checkpoint of another kind of run (a
    fine-tuning, recipe or domain-pretraining run names no model section, or only a yaml) is refused."""
    section = run_config.get("model") if isinstance(run_config, dict) else None
    if not isinstance(section, dict):
        raise CheckpointError(
            f"{ckpt / checkpoint.CONFIG}: no model section: not a pretraining checkpoint, so there is no model "
            "folder to export (a fine-tuning run saves its task model to <output_dir>/model itself)"
        )
    try:
        return from_dict(ModelConfig, section)
    except ConfigError as err:
        raise CheckpointError(f"{ckpt / checkpoint.CONFIG}: its model section does not load: {err}") from None


def save_tokenizer(ckpt: Path, model, folder: Path) -> None:
    """Into the model folder: the run's ``tokenizer/`` (``<output_dir>/tokenizer``, beside ``checkpoints/``), else,
    for a checkpoint taken out of its run folder, the tokenizer its config names (``model.text.tokenizer`` or
    the encoder's own); one that does not load or does not fit the model is refused, not left out (a folder
    without it loads only where the config's path happens to exist)."""
    from cclm.model.cross_view import check_tokenizer_fits
    from cclm.train.pretrain import load_run_tokenizer

    beside = ckpt.parent.parent / "tokenizer"
    if beside.is_dir():
        for item in beside.iterdir():
            shutil.copy2(item, folder / item.name)
        return
    text = model.cfg.text
    named = text.tokenizer or text.name_or_path
    try:
        tokenizer = load_run_tokenizer(text)
    except Exception as err:  # a missing folder, an unknown Hub name offline: whatever the loader raises
        raise UserError(
            f"{ckpt}: no tokenizer folder {beside} beside the checkpoints, and the tokenizer the run config "
            f"names ({named}) does not load ({type(err).__name__}: {_first_line(err)}); export the checkpoint "
            "from inside its run folder, or copy the run's tokenizer/ folder next to its checkpoints/ folder"
        ) from None
    check_tokenizer_fits(model, tokenizer, ckpt, named)
    tokenizer.save_pretrained(str(folder))


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else ""


def claim_destination(out: Path, overwrite: bool) -> None:
    """An export goes to a new or empty folder: one holding files (an earlier export, another model's card or
    results) is refused, or with ``overwrite`` moved aside to ``OUT.old-<time>``, so that no stale file joins the
    new model folder."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise UserError(
            f"{out} already holds files; export into a new folder, or --overwrite (moves it to {out}.old-<time>)"
        )
    aside = aside_path(out)
    out.rename(aside)
    print(f"--overwrite: the previous contents of {out} were moved to {aside}", file=sys.stderr)


def export(ckpt: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the model folder of checkpoint ``ckpt`` to ``out``, built beside it and moved into place whole."""
    from cclm.model import CrossViewModel

    ckpt = resolve_checkpoint(ckpt)
    record = checkpoint.verify(ckpt, files=[checkpoint.FP32_WEIGHTS, checkpoint.CONFIG])
    run_config = checkpoint.read_json(ckpt / checkpoint.CONFIG)
    model = CrossViewModel(model_config_of(ckpt, run_config), load_pretrained=False)
    weights = ckpt / checkpoint.FP32_WEIGHTS
    try:
        state = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types for a truncated or foreign file
        raise CheckpointError(f"{weights}: corrupt ({err})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - model.tied_parameter_aliases():
        raise ValueError(
            f"checkpoint {ckpt} does not match its config: missing={missing} unexpected={unexpected}"
        )
    step = record["step"]
    out = Path(out)
    claim_destination(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.partial-", dir=out.parent) as building:
        folder = Path(building) / out.name
        model.save_pretrained(
            folder, extra={"training": {"step": step, "checkpoint": str(ckpt), "run": run_config}}
        )
        save_tokenizer(ckpt, model, folder)
        if out.is_dir():  # empty (claim_destination): replaced by the complete folder
            out.rmdir()
        folder.rename(out)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cclm export", description=__doc__)
    parser.add_argument(
        "checkpoint",
        nargs="?",
        help="checkpoint folder (…/checkpoints/step_<8-digit step>) or output_dir",
    )
    parser.add_argument("out", nargs="?", help="destination folder")
    parser.add_argument(
        "--push-to-hub",
        metavar="ORG/NAME",
        default=None,
        help="then upload the folder to this Hugging Face Hub repository (created if missing; needs a token: "
        "hf auth login or HF_TOKEN)",
    )
    parser.add_argument(
        "--push-only",
        metavar="FOLDER",
        default=None,
        help="export nothing: upload the model folder FOLDER (an earlier export whose push failed, or any "
        "save_pretrained folder) to --push-to-hub",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="export into a folder that holds files, moving them aside to OUT.old-<time> first",
    )
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--commit-message", default=None, help="message of the Hub commit")
    args = parser.parse_args(argv[1:])
    if args.push_only is not None:
        if args.checkpoint is not None or args.out is not None or not args.push_to_hub:
            parser.error("--push-only FOLDER takes --push-to-hub ORG/NAME and no CHECKPOINT / OUT")
    elif args.checkpoint is None or args.out is None:
        parser.error("the following arguments are required: checkpoint, out (or --push-only FOLDER)")
    try:
        if args.push_to_hub:  # a bad repository name fails before the export's work
            from cclm.train.publish import parse_hub_name

            parse_hub_name(args.push_to_hub)
        if args.push_only is not None:
            out = Path(args.push_only)
        else:
            out = export(args.checkpoint, args.out, overwrite=args.overwrite)
            print(f"exported {out}")
        if args.push_to_hub:
            from cclm.train.publish import push_to_hub

            url = push_to_hub(
                out, args.push_to_hub, private=args.private or None, commit_message=args.commit_message
            )
            print(f"pushed to {url}; load it with cclm.load('hf-hub:{args.push_to_hub}')")
    except (UserError, FileNotFoundError, ValueError) as err:
        print(f"cclm export: {err}", file=sys.stderr)
        return 2
    return 0
