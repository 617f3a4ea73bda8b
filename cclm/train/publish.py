"""Publish a model folder on the Hugging Face Hub: ``cclm export CKPT OUT --push-to-hub ORG/NAME`` (or
:func:`push_to_hub` on any ``save_pretrained`` folder); ``cclm.load("hf-hub:ORG/NAME")`` loads it back
(:mod:`cclm.inference.hub`).

Every file of the folder goes up in one commit (the repository is created when missing). The README.md model card
that ``save_pretrained`` wrote goes up with Hub metadata added (``library_name: cclm`` and tags, so the Hub lists
and labels it; metadata a person added is kept) and a line saying how to load it from the Hub; the folder on disk
is not changed. Uploading is ``huggingface_hub.HfApi`` (token: ``hf auth login`` or ``HF_TOKEN``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cclm.errors import UserError

HUB_PREFIX = "hf-hub:"
CARD = "README.md"
HUB_TAGS = ["cclm", "vision-language", "multilingual", "image-text-retrieval", "cross-lingual"]


class HubError(UserError):
    """A Hub repository that cannot be loaded or pushed; the message names it and says what to do."""


def parse_hub_name(name: str) -> tuple[str, str | None]:
    """``hf-hub:ORG/NAME[@REVISION]`` -> (``ORG/NAME``, revision or None)."""
    repo = name[len(HUB_PREFIX) :] if name.startswith(HUB_PREFIX) else name
    repo, _, revision = repo.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise HubError(f"'{name}': expected hf-hub:ORG/NAME (optionally @REVISION)")
    return repo, revision or None


def check_model_folder(folder: Path, what: str) -> None:
    config = folder / "config.json"
    try:
        fmt = json.loads(config.read_text(encoding="utf-8")).get("format")
    except (OSError, json.JSONDecodeError, AttributeError):
        fmt = None
    if fmt != "cclm-cross-view" or not (folder / "model.safetensors").is_file():
        raise HubError(
            f"{what} is not a cclm model folder (it needs config.json with format 'cclm-cross-view' and "
            "model.safetensors, as save_pretrained / cclm export write them)"
        )


def hub_card(folder: Path, repo: str) -> str:
    """The folder's model card with Hub metadata and a line on loading it from the Hub."""
    from huggingface_hub import ModelCard, ModelCardData

    card_file = folder / CARD
    if card_file.is_file():
        body = card_file.read_text(encoding="utf-8")
    else:  # removed by hand: write the card save_pretrained would have written
        from cclm.model import CrossViewModel
        from cclm.model.card import render_model_card

        extra = {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if k != "model"}
        body = render_model_card(CrossViewModel.from_pretrained(folder), extra)
    data: dict = {}
    if body.startswith("---"):  # metadata a person added is kept
        card = ModelCard(body)
        data, body = card.data.to_dict(), card.text
    data["library_name"] = "cclm"
    data["tags"] = list(dict.fromkeys([*(data.get("tags") or []), *HUB_TAGS]))
    load_line = f'Load it with `cclm.load("{HUB_PREFIX}{repo}")`.'
    lines = body.splitlines()
    title = next((i for i, line in enumerate(lines) if line.startswith("# ")), -1)
    lines[title + 1 : title + 1] = ["", load_line]
    text = "\n".join(lines) + "\n"
    return f"---\n{ModelCardData(**data).to_yaml()}\n---\n{text}"


def folder_files(folder: Path) -> list[Path]:
    """The files to upload: everything but hidden files and our cache marker."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.name != "pretrained.json"
    )


def push_to_hub(
    folder: str | os.PathLike,
    repo: str,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
) -> str:
    """Upload the model folder to the Hub repository ``ORG/NAME`` (created when missing) in one commit, its
    model card with Hub metadata; returns the commit's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    folder = Path(folder)
    repo, _ = parse_hub_name(repo)
    check_model_folder(folder, str(folder))
    operations = [
        CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
        for p in folder_files(folder)
        if p.relative_to(folder).as_posix() != CARD
    ]
    operations.append(CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=hub_card(folder, repo).encode()))
    api = HfApi(token=token)
    try:
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        commit = api.create_commit(
            repo,
            operations,
            commit_message=commit_message or f"Upload cclm model from {folder.name}",
            revision=revision,
        )
    except (HfHubHTTPError, LocalTokenNotFoundError) as err:
        raise HubError(f"cannot push {folder} to {repo}: {err}") from None
    return str(getattr(commit, "commit_url", commit))
