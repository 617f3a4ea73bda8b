"""Publish a model folder on the Hugging Face Hub: ``cclm export CKPT OUT --push-to-hub ORG/NAME`` (or
:func:`push_to_hub` on any ``save_pretrained`` folder); ``cclm.load("hf-hub:ORG/NAME")`` loads it back
(:mod:`cclm.inference.hub`).

Every file of the folder goes up in one commit (the repository is created when missing). The README.md model card
that ``save_pretrained`` wrote goes up with Hub metadata added (``library_name: cclm`` and tags, so the Hub lists
and labels it; metadata a person added is kept) and a line saying how to load it from the Hub; the folder on disk
is not changed. Uploading is ``huggingface_hub.HfApi`` (token: ``hf auth login`` or ``HF_TOKEN``). A push that
fails (no network, ``HF_HUB_OFFLINE``, no token, refused) is a :class:`HubError` naming the folder and the
repository and saying how to push the folder again (``cclm export --push-only FOLDER --push-to-hub ORG/NAME``).
"""

from __future__ import annotations

import importlib
import json
import os
import shlex
from pathlib import Path

from cclm.errors import UserError

HUB_PREFIX = "hf-hub:"
CARD = "README.md"
LOAD_LINE = 'Load it with `cclm.load("'
HUB_TAGS = ["cclm", "vision-language", "multilingual", "image-text-retrieval", "cross-lingual"]


class HubError(UserError):
    """A Hub repository that cannot be loaded or pushed; the message names it and says what to do."""


def parse_hub_name(name: str) -> tuple[str, str | None]:
    """``hf-hub:ORG/NAME[@REVISION]`` -> (``ORG/NAME``, revision or None). The repository name must follow the
    Hub's naming rules (``huggingface_hub``'s own ``validate_repo_id``), so that a bad name fails before any work
    (an export, a download) rather than at the Hub."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo = name[len(HUB_PREFIX) :] if name.startswith(HUB_PREFIX) else name
    repo, _, revision = repo.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise HubError(f"'{name}': expected hf-hub:ORG/NAME (optionally @REVISION)")
    try:
        validate_repo_id(repo)
    except HFValidationError as err:
        raise HubError(f"'{name}' is not a valid Hub repository name: {err}") from None
    return repo, revision or None


def check_model_folder(folder: Path, what: str, missing_weights: str | None = None) -> None:
    """Refuse ``folder`` unless it holds a cclm ``config.json`` and ``model.safetensors``. ``missing_weights``:
    what to say when the config is a cclm one but the weights are missing (e.g. an incomplete download)."""
    config = folder / "config.json"
    try:
        fmt = json.loads(config.read_text(encoding="utf-8")).get("format")
    except (OSError, json.JSONDecodeError, AttributeError):
        fmt = None
    if fmt == "cclm-cross-view" and not (folder / "model.safetensors").is_file():
        raise HubError(
            f"{what} has a cclm config.json but no model.safetensors: "
            + (missing_weights or "the weights are missing (save_pretrained / cclm export write them)")
        )
    if fmt != "cclm-cross-view":
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
    load_line = f'{LOAD_LINE}{HUB_PREFIX}{repo}")`.'
    lines = body.splitlines()
    # a card from the Hub (re-pushed, mirrored) already names its repository: that line is replaced
    for i in reversed(range(len(lines))):
        if lines[i].startswith(f"{LOAD_LINE}{HUB_PREFIX}"):
            del lines[i - 1 if i > 0 and not lines[i - 1].strip() else i : i + 1]
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
    model card with Hub metadata; returns the commit's URL. A push that fails (no network, ``HF_HUB_OFFLINE``,
    no token, refused by the Hub) raises :class:`HubError` naming the folder and the repository and saying how to
    push the folder again; the folder is not changed."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

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
    except HfHubHTTPError as err:
        reason = f"the Hub refused it ({_one_line(err)})"
    except LocalTokenNotFoundError:
        reason = "no Hugging Face token (log in with `hf auth login` or set HF_TOKEN)"
    except OfflineModeIsEnabled:
        reason = "the Hub cannot be reached: HF_HUB_OFFLINE is set (offline mode)"
    except _transport_errors() as err:
        reason = f"the Hub cannot be reached (network error: {type(err).__name__}: {_one_line(err)})"
    else:
        return str(getattr(commit, "commit_url", commit))
    raise HubError(f"cannot push {folder} to {repo}: {reason}; {retry_hint(folder, repo, private, revision)}")


def retry_hint(folder: Path, repo: str, private: bool | None = None, revision: str | None = None) -> str:
    """How to push an existing model folder again, from the command line and from Python (the command line
    pushes to the default branch only)."""
    command = f"cclm export --push-only {shlex.quote(str(folder))} --push-to-hub {repo}"
    call = f"cclm.inference.hub.push_to_hub({str(folder)!r}, {repo!r}"
    if private:
        command, call = f"{command} --private", f"{call}, private=True"
    kept = f"the model folder {folder} is complete and unchanged: push it later with"
    if revision:
        return f"{kept} {call}, revision={revision!r})"
    return f"{kept} `{command}` (or {call}) in Python)"


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The errors of a request that never got an answer: OSError (socket errors, requests' ConnectionError,
    timeouts) and the transport errors of the HTTP client huggingface_hub uses (httpx, or its httpx2 fork)."""
    errors: list[type[BaseException]] = [OSError]
    for module in ("httpx", "httpx2"):
        try:
            errors.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)
