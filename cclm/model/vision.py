"""The image side: any open_clip visual tower, returning a token sequence whose first token summarises the image.

Towers are always built from an open_clip vision config (so a saved model can be rebuilt offline), and
pretrained weights, when asked for, are loaded afterwards from an open_clip pretrained tag, an ``hf-hub:`` /
``local-dir:`` model, or a local checkpoint file. :func:`check_vision_config` checks a user's ``model.vision``
(tower fields, timm model name, model name, pretrained tag) before anything is built.

A timm tower (``tower.timm_model_name``) may name timm's pretrained weights with a tag, ``ARCH.TAG``: timm parses
it when it builds the trunk (open_clip passes the name through unchanged), and with ``timm_model_pretrained`` it
loads that tag's weights, dropping their classifier (the tower has none). Without a tag timm picks its default:
for ``swin_base_patch4_window7_224`` the ImageNet-22k-then-1k fine-tuned weights, whereas CCLM starts from the
ImageNet-22k ones, ``swin_base_patch4_window7_224.ms_in22k``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cclm.config import ConfigError
from cclm.model.text import (
    LAUNCH_DOC,
    fetching_pretrained,
    hf_download,
    hub_offline,
    loadable_from_hub,
    unavailable_message,
)

SCHEMAS = ("hf-hub:", "local-dir:")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Tower keys of cclm's own, beside open_clip's CLIPVisionCfg fields (removed before open_clip builds the tower):
CCLM_TOWER_FIELDS = {
    # timm Swin towers: the window at ``image_size`` (the trunk is built at its own size, then set to
    # image_size / window_size by cclm.model.resize; the reference fine-tunes Swin-B at 384 px with window 12)
    "window_size": "Swin window size at image_size",
    # open_clip ViTs: QuickGELU activations (OpenAI CLIP weights, the reference's CLIP-ViT); open_clip takes it as
    # a model-level flag, not a vision field
    "quick_gelu": "QuickGELU activations in an open_clip ViT",
}


def check_vision_config(vision_cfg: Any, key: str = "model.vision") -> None:
    """Fail naming the key when ``tower`` has a field open_clip's CLIPVisionCfg lacks, when ``name`` (used without
    a tower, or to load pretrained weights) is no open_clip model, or ``pretrained`` neither a tag nor a file.
    Under ``HF_HUB_OFFLINE=1`` the starting weights must be in the cache already (the error says what to
    download), so an offline run fails here rather than after building its data pipeline."""
    tower = dict(vision_cfg.tower)
    if tower:
        check_tower_fields(tower, f"{key}.tower")
        if tower.get("timm_model_name"):
            check_timm_model_name(str(tower["timm_model_name"]), f"{key}.tower.timm_model_name")
            if tower.get("timm_model_pretrained") and hub_offline():
                check_timm_weights_cached(str(tower["timm_model_name"]), f"{key}.tower.timm_model_name")
    if tower and not vision_cfg.pretrained:
        return
    check_open_clip_name(vision_cfg.name, key)
    check_schema_pretrained(vision_cfg.name, vision_cfg.pretrained, key)
    if vision_cfg.pretrained and not vision_cfg.name.startswith(SCHEMAS):
        check_pretrained_tag(vision_cfg.name, vision_cfg.pretrained, f"{key}.pretrained")
        if hub_offline() and not Path(vision_cfg.pretrained).is_file():
            check_open_clip_weights_cached(vision_cfg.name, vision_cfg.pretrained, f"{key}.pretrained")


def check_schema_pretrained(name: str, pretrained: str | None, key: str = "model.vision") -> None:
    """An ``hf-hub:`` / ``local-dir:`` name brings its own weights, which open_clip loads whatever ``pretrained``
    says: ask for them by repeating the name, so that a config can neither start from random weights nor name a
    tag or file that would be ignored without saying so."""
    if not name.startswith(SCHEMAS) or pretrained == name:
        return
    if not pretrained:
        raise ConfigError(
            f"{key}.name={name!r} without {key}.pretrained: the tower would start from random weights, not "
            f"the ones in {name}; set {key}.pretrained={name!r} to load them (for a random tower of that shape, "
            f"describe it in {key}.tower)"
        )
    raise ConfigError(
        f"{key}.pretrained={pretrained!r}: with {key}.name={name!r} the weights come from that name (open_clip "
        f"ignores a tag or file there); set {key}.pretrained={name!r}"
    )


def open_clip_weights_source(name: str, pretrained: str) -> tuple[str, str, str | None]:
    """(Hub repository, file name, URL) open_clip downloads the weights of tag ``pretrained`` of ``name`` from
    (repository "" when it downloads from the URL)."""
    import open_clip
    from open_clip.pretrained import HF_WEIGHTS_NAME, has_hf_hub

    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    hub = cfg.get("hf_hub", "")
    if hub and has_hf_hub():
        repo_id, filename = os.path.split(hub)  # open_clip's form: "org/repo/file" or "org/repo/"
        return repo_id, filename or HF_WEIGHTS_NAME, None
    return "", Path(cfg.get("url", "")).name, cfg.get("url")


def check_open_clip_weights_cached(name: str, pretrained: str, key: str = "model.vision.pretrained") -> None:
    from huggingface_hub import try_to_load_from_cache

    repo_id, filename, url = open_clip_weights_source(name, pretrained)
    if url:  # open_clip keeps URL downloads in ~/.cache/clip
        if not (Path("~/.cache/clip").expanduser() / filename).is_file():
            raise ConfigError(
                f"{key}={pretrained!r}: not in ~/.cache/clip and HF_HUB_OFFLINE=1: download it where there is "
                f"network ({url_download(url)}) or {url_local_form(key)} ({LAUNCH_DOC})"
            )
        return
    candidates = (filename, str(Path(filename).with_suffix(".safetensors")))
    if not any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in candidates):
        download, local_form = hf_download(repo_id, filename), open_clip_local_form(repo_id, filename, key)
        raise ConfigError(unavailable_message(key, pretrained, download, local_form))


def open_clip_local_form(repo_id: str, filename: str, key: str) -> str:
    return f"give the file: `hf download {repo_id} {filename} --local-dir DIR`, then {key}=DIR/{filename}"


def url_download(url: str) -> str:
    return f"`wget -P ~/.cache/clip {url}`"


def url_local_form(key: str) -> str:
    return f"give the downloaded file in {key}"


def check_timm_weights_cached(name: str, key: str = "model.vision.tower.timm_model_name") -> None:
    """The weights timm loads for ``name`` (``ARCH.TAG``) are in the Hugging Face cache (offline runs)."""
    from huggingface_hub import try_to_load_from_cache

    repo_id = timm_hub_id(name)
    if name.startswith(SCHEMAS) or repo_id == name:  # a folder, or weights from a URL: left to timm
        return
    files = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
    if not any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in files):
        raise ConfigError(unavailable_message(key, name, hf_download(repo_id), timm_local_form(repo_id, key)))


def timm_hub_id(name: str) -> str:
    """The Hub repository timm loads the pretrained weights of ``name`` (``ARCH.TAG``) from; ``name`` itself when
    they come from elsewhere (a folder, a URL)."""
    from timm.models import get_pretrained_cfg

    if name.startswith(SCHEMAS):
        return name.removeprefix("hf-hub:")
    cfg = get_pretrained_cfg(name)
    return str(getattr(cfg, "hf_hub_id", None) or name)


def timm_local_form(repo_id: str, key: str) -> str:
    return f"give a folder: `hf download {repo_id} --local-dir DIR`, then {key}='local-dir:DIR'"


def check_tower_fields(tower: dict[str, Any], key: str = "model.vision.tower") -> None:
    from open_clip.model import CLIPVisionCfg

    known = sorted([f.name for f in dataclasses.fields(CLIPVisionCfg)] + list(CCLM_TOWER_FIELDS))
    for name in tower:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"config key '{key}.{name}': not a field of open_clip's CLIPVisionCfg{hint}")
    window = tower.get("window_size")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
            raise ConfigError(f"config key '{key}.window_size'={window!r}: must be a positive integer")
        if not tower.get("timm_model_name"):
            raise ConfigError(f"config key '{key}.window_size': only timm Swin towers have windows")
    if tower.get("quick_gelu") and tower.get("timm_model_name"):
        raise ConfigError(f"config key '{key}.quick_gelu': timm towers keep timm's own activations")


def check_timm_model_name(name: str, key: str = "model.vision.tower.timm_model_name") -> None:
    """``name`` is a timm architecture, optionally with one of its pretrained tags (``ARCH.TAG``). ``hf-hub:`` and
    ``local-dir:`` names are left to timm, which reads their config when it builds the trunk."""
    import timm
    from timm.models import split_model_name_tag

    if name.startswith(("hf-hub:", "local-dir:")):
        return
    arch, tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=1, cutoff=0.8)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"config key '{key}'={name!r}: not a timm model{hint}")
    if tag:
        tags = sorted(n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*"))
        if tag not in tags:
            raise ConfigError(
                f"config key '{key}'={name!r}: timm has no pretrained tag '{tag}' for {arch} "
                f"(tags: {', '.join(tags) or 'none'})"
            )


def check_open_clip_name(name: str, key: str = "model.vision") -> None:
    """``key``: the vision config's key; its ``.name`` is the one checked."""
    import open_clip

    shown = f"{key}.name={name!r}"
    if name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:") :])
        if not (folder / "open_clip_config.json").is_file():
            raise ConfigError(f"{shown}: {folder} is not a folder with an open_clip_config.json")
    elif name.startswith("hf-hub:"):
        if not loadable_from_hub(name[len("hf-hub:") :], ("open_clip_config.json",)):
            raise ConfigError(
                f"{shown}: not loadable from the Hugging Face Hub (offline?): download the repository and give "
                "'local-dir:/path/to/it'"
            )
    elif open_clip.get_model_config(name) is None:
        raise ConfigError(
            f"{shown}: not an open_clip model (open_clip.list_models() lists them); for a local copy give "
            f"'local-dir:/path/to/folder' (with open_clip_config.json), or describe the tower in {key}.tower "
            f"and give its weights file in {key}.pretrained"
        )


def check_pretrained_tag(name: str, pretrained: str, key: str = "model.vision.pretrained") -> None:
    import open_clip

    if open_clip.get_pretrained_cfg(name, pretrained) or Path(pretrained).is_file():
        return
    tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
    raise ConfigError(
        f"{key}={pretrained!r}: neither a local checkpoint file nor a pretrained tag of {name} (tags: {tags})"
    )


def resolve_open_clip_vision_cfg(
    name: str, key: str = "model.vision", pretrained: str | None = None
) -> tuple[dict[str, Any], int]:
    """The ``vision_cfg`` and ``embed_dim`` of an open_clip model name (built-in, ``local-dir:`` or ``hf-hub:``).
    ``quick_gelu`` is set when the model config or the ``pretrained`` tag says its weights were trained with
    QuickGELU (OpenAI's CLIP): the same weights under plain GELU compute other features."""
    import open_clip

    check_open_clip_name(name, key)
    check_schema_pretrained(name, pretrained, key)
    if name.startswith("local-dir:"):
        model_cfg = json.loads((Path(name[len("local-dir:") :]) / "open_clip_config.json").read_text())[
            "model_cfg"
        ]
    elif name.startswith("hf-hub:"):
        from huggingface_hub import hf_hub_download

        repo_id = name[len("hf-hub:") :]
        with fetching_pretrained(f"{key}.name", name, hf_download(repo_id), hub_name_local_form(repo_id)):
            path = hf_hub_download(repo_id, "open_clip_config.json")
        model_cfg = json.loads(Path(path).read_text())["model_cfg"]
    else:
        model_cfg = open_clip.get_model_config(name)
    vision_cfg = dict(model_cfg["vision_cfg"])
    quick_gelu = bool(model_cfg.get("quick_gelu"))
    if pretrained and not name.startswith(("hf-hub:", "local-dir:")):
        quick_gelu |= bool(open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu"))
    if quick_gelu:
        vision_cfg["quick_gelu"] = True
    return vision_cfg, int(model_cfg["embed_dim"])


def load_pretrained_visual_state(
    name: str, pretrained: str | None, key: str = "model.vision"
) -> dict[str, torch.Tensor]:
    """State dict of the visual tower of a pretrained open_clip model (tag, local file, or schema'd name),
    downloaded by each node's local rank 0 first; without the Hub and the cache, a ConfigError says what to
    download and where to point the config."""
    import open_clip

    if name.startswith(SCHEMAS):
        check_schema_pretrained(name, pretrained, key)
        repo_id = name.removeprefix("hf-hub:")
        with fetching_pretrained(f"{key}.name", name, hf_download(repo_id), hub_name_local_form(repo_id)):
            model = open_clip.create_model(name, require_pretrained=True)
        return model.visual.state_dict()
    download, local_form = "", ""
    if not Path(str(pretrained)).is_file():  # a tag: from the Hub, or from a URL
        repo_id, filename, url = open_clip_weights_source(name, str(pretrained))
        download = url_download(str(url)) if url else hf_download(repo_id, filename)
        key_pretrained = f"{key}.pretrained"
        local_form = (
            url_local_form(key_pretrained) if url else open_clip_local_form(repo_id, filename, key_pretrained)
        )
    with fetching_pretrained(f"{key}.pretrained", str(pretrained), download, local_form):
        model = open_clip.create_model(name, pretrained=pretrained, require_pretrained=True)
    return model.visual.state_dict()


def hub_name_local_form(repo_id: str) -> str:
    return f"give 'local-dir:DIR' after `hf download {repo_id} --local-dir DIR`"


def timm_prefix_tokens(trunk: nn.Module) -> tuple[int, bool]:
    """(tokens before the patch tokens, whether the first is a class token) of a timm trunk whose
    ``forward_features`` returns a token sequence: timm's ``num_prefix_tokens`` (class token, then register or
    distillation tokens) and ``cls_token``; a trunk without them (MLP-Mixer) has none."""
    has_class_token = getattr(trunk, "has_class_token", None)
    if has_class_token is None:
        has_class_token = getattr(trunk, "cls_token", None) is not None
    prefix = getattr(trunk, "num_prefix_tokens", None)
    return int(has_class_token if prefix is None else prefix), bool(has_class_token)


class VisionTower(nn.Module):
    """Wraps an open_clip visual tower; ``forward(images) -> [B, 1 + N, width]``: one summary token, then the N
    patch tokens (row-major on :func:`cclm.model.boxes.token_grid`).

    open_clip ViTs return their class token followed by the patch tokens after ``ln_post``. timm towers:
    a ViT with a class token returns it and its patch tokens, its other prefix tokens (registers, a distillation
    token) dropped; towers without a class token (Swin, ConvNeXt, and ViTs built without one, e.g. the SigLIP
    towers, whose attention-pool head cclm does not use) get the mean of their patch tokens prepended as the
    summary token, as X-VLM/CCLM do for Swin.
    uint8 images (the data pipeline's output) are normalised here with the CLIP statistics, so that
    normalisation runs on the training device.

    ``load_pretrained=False`` builds a timm tower without fetching its ``timm_model_pretrained`` weights (a saved
    model's own weights replace them); ``tower_cfg`` is recorded as given either way.

    timm builds its trunk at the architecture's own input size; when ``tower_cfg`` asks for another
    ``image_size`` or a ``window_size`` (a resized Swin, :mod:`cclm.model.resize`), the trunk is set to it after
    it is built (pretrained weights interpolated as the reference does), so a saved resized model rebuilds with
    the shapes of its weights.
    """

    def __init__(self, tower_cfg: dict[str, Any], embed_dim: int, load_pretrained: bool = True):
        super().__init__()
        from open_clip.model import _build_vision_tower

        cfg = dict(tower_cfg)
        cfg.pop("output_tokens", None)
        check_tower_fields(cfg)
        build_cfg = {k: v for k, v in cfg.items() if k not in CCLM_TOWER_FIELDS}
        if not load_pretrained:
            build_cfg["timm_model_pretrained"] = False
        quick_gelu = bool(cfg.get("quick_gelu", False))
        timm_name = str(build_cfg.get("timm_model_name") or "")
        downloads = bool(timm_name and build_cfg.get("timm_model_pretrained"))  # timm's starting weights
        if downloads:
            key, repo_id = "model.vision.tower.timm_model_name", timm_hub_id(timm_name)
            with fetching_pretrained(key, timm_name, hf_download(repo_id), timm_local_form(repo_id, key)):
                self.visual = _build_vision_tower(embed_dim, build_cfg, quick_gelu=quick_gelu)
        else:
            self.visual = _build_vision_tower(embed_dim, build_cfg, quick_gelu=quick_gelu)
        self.tower_cfg = cfg
        self.is_timm = bool(cfg.get("timm_model_name"))
        if self.is_timm and (cfg.get("window_size") is not None or "image_size" in cfg):
            from cclm.model.resize import resize_tower, timm_trunk_image_size

            size = timm_trunk_image_size(self.visual.trunk)
            wanted = cfg.get("image_size")
            if isinstance(wanted, (list, tuple)):  # (h, w): square ones only are resized
                wanted = wanted[0] if len(set(wanted)) == 1 else None
            wanted = int(wanted) if wanted else size
            if wanted and (cfg.get("window_size") is not None or wanted != size):
                resize_tower(self, wanted, cfg.get("window_size"))
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.width = self._infer_width()

    def drop_clip_projection(self) -> None:
        """Remove open_clip's own image->CLIP-space projection: cclm projects the first token with its own
        ``vision_proj``, so the tower's projection would be a dead parameter (after any pretrained load)."""
        if self.is_timm:
            self.visual.head = nn.Identity()
        else:
            self.visual.proj = None

    def _infer_width(self) -> int:
        if self.is_timm:
            return int(self.visual.trunk.num_features)
        return int(self.visual.transformer.width)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            dtype = self.mean.dtype if self.mean.is_floating_point() else torch.float32
            images = (images.to(dtype) / 255.0 - self.mean) / self.std
        return images.to(next(self.visual.parameters()).dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalize(images)
        if self.is_timm:
            trunk = self.visual.trunk
            feats = trunk.forward_features(x)
            if feats.ndim == 4:
                if getattr(trunk, "output_fmt", "NCHW") == "NCHW":
                    feats = feats.permute(0, 2, 3, 1)
                feats = feats.flatten(1, 2)
                return torch.cat([feats.mean(dim=1, keepdim=True), feats], dim=1)
            prefix, has_class_token = timm_prefix_tokens(trunk)
            if prefix == 1 and has_class_token:  # the class token, then the patches: as it is
                return feats
            patches = feats[:, prefix:]
            summary = feats[:, :1] if has_class_token else patches.mean(dim=1, keepdim=True)
            return torch.cat([summary, patches], dim=1)
        out = self.visual.forward_intermediates(
            x,
            indices=1,
            normalize_intermediates=True,
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=True,
        )
        return torch.cat([out["image_intermediates_prefix"][-1], out["image_intermediates"][-1]], dim=1)
