"""Load cclm model folders from the Hugging Face Hub: ``cclm.load("hf-hub:ORG/NAME")``; ``cclm export ...
--push-to-hub ORG/NAME`` puts them there (:mod:`cclm.train.publish`, re-exported here as :func:`push_to_hub`).

Loading is ``huggingface_hub.snapshot_download``: the repository's files land in the Hub cache (``HF_HUB_CACHE``,
shared with transformers and open_clip) and the snapshot folder is an ordinary model folder. With
``HF_HUB_OFFLINE=1`` only the cache is read, so a cluster job can run on a snapshot downloaded beforehand
(``hf download ORG/NAME`` on a login node); a cclm repository whose weights are not in the cached snapshot (a
download cut short, or only ``config.json`` fetched) fails saying to download it again.
``hf-hub:ORG/NAME@REVISION`` pins a branch, tag or commit.
"""

from __future__ import annotations

import os
from pathlib import Path

from cclm.train.publish import HUB_PREFIX, HubError, check_model_folder, parse_hub_name, push_to_hub

__all__ = ["HUB_PREFIX", "HubError", "hub_folder", "is_hub_name", "parse_hub_name", "push_to_hub"]


def is_hub_name(name) -> bool:
    return isinstance(name, str) and name.startswith(HUB_PREFIX)


def hub_folder(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local snapshot of ``hf-hub:ORG/NAME[@REVISION]``, downloaded into the Hub cache unless it is there
    (offline: ``HF_HUB_OFFLINE=1`` reads the cache only)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, revision = parse_hub_name(name)
    offline = constants.is_offline_mode()
    try:
        folder = snapshot_download(repo, revision=revision, cache_dir=cache_dir, local_files_only=offline)
    except LocalEntryNotFoundError as err:
        where = cache_dir or constants.HF_HUB_CACHE
        hint = (
            "HF_HUB_OFFLINE is set, so only the local cache is read: download it first where there is network "
            f"(hf download {repo}) into the same HF_HUB_CACHE, or unset HF_HUB_OFFLINE"
            if offline
            else "the Hub cannot be reached and it is not in the local cache"
        )
        raise HubError(f"{name}: not found (complete) in the Hub cache {where}; {hint} ({err})") from None
    except HfHubHTTPError as err:
        raise HubError(f"{name}: the Hub refused it ({err})") from None
    folder = Path(folder)
    again = f"hf download {repo}" + (f" --revision {revision}" if revision else "")
    check_model_folder(
        folder,
        f"{name} ({folder})",
        missing_weights=(
            "the local snapshot is incomplete (an interrupted or partial download; HF_HUB_OFFLINE reads the "
            f"cache only): fetch it again where there is network ({again}) into the same HF_HUB_CACHE"
            if offline
            else "the repository holds no model.safetensors (an incomplete upload): push the model folder again"
        ),
    )
    return folder
