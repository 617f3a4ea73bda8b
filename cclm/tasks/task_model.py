"""Task heads on the fused [CLS] token and the task model that pairs them with the cross-view backbone.

- ``single``: XVNLI (image premise + hypothesis), xGQA / easy-VQA (image + question): an MLP over the fused [CLS]
  of the text attending to the image.
- ``pair``: MaRVL / NLVR2: the caption is fused with each image separately and the two [CLS] vectors are
  concatenated before the MLP (one caption, two fused images).
- ``retrieval``: xFlickr&CO / WIT: no new head; ITC + ITM of the backbone are fine-tuned directly.

A fine-tuned task folder is a cclm model folder (``config.json`` + ``model.safetensors`` + tokenizer files) plus
``task_head.safetensors`` and ``task.json`` (task name, kind, label names).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn

from cclm.model.cross_view import CrossViewModel

HEAD_WEIGHTS = "task_head.safetensors"
TASK_CONFIG = "task.json"
KINDS = ("single", "pair", "retrieval")


class ClassifierHead(nn.Module):
    """MLP classifier (Linear -> LayerNorm -> GELU -> Linear), as the X-VLM/CCLM task heads."""

    def __init__(self, in_features: int, hidden: int, num_labels: int, eps: float = 1e-12):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, 2 * hidden),
            nn.LayerNorm(2 * hidden, eps=eps),
            nn.GELU(),
            nn.Linear(2 * hidden, num_labels),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


class TaskModel(nn.Module):
    def __init__(self, backbone: CrossViewModel, task: str, kind: str, label_names: list[str] | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown task kind '{kind}' (expected one of {KINDS})")
        self.backbone, self.task, self.kind = backbone, task, kind
        self.label_names = list(label_names or [])
        hidden = backbone.encoder_config.hidden_size
        self.head: ClassifierHead | None = None
        if kind != "retrieval":
            if len(self.label_names) < 2:
                raise ValueError(f"task '{task}' needs at least 2 labels, got {self.label_names}")
            in_features = 2 * hidden if kind == "pair" else hidden
            self.head = ClassifierHead(
                in_features, hidden, len(self.label_names), backbone.encoder_config.layer_norm_eps
            )
            self.head.apply(_init_like(backbone))

    def fused_cls(
        self, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        """Fused [CLS] of each text attending to its image: [B, hidden]."""
        image_tokens, _ = self.backbone.encode_image(images)
        text_tokens, _ = self.backbone.encode_text(text_ids, text_mask)
        image_mask = torch.ones(image_tokens.shape[:2], dtype=text_mask.dtype, device=text_mask.device)
        return self.backbone.fuse(text_tokens, text_mask, image_tokens, image_mask)[:, 0]

    def features(self, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """What the head sees: the fused [CLS] ([B, hidden]), or for image pairs (images [B, 2, 3, H, W]) the
        [CLS] of the text fused with each image, concatenated ([B, 2 * hidden]; both images in one pass)."""
        if self.kind == "single":
            return self.fused_cls(images, text_ids, text_mask)
        if self.kind == "pair":
            size = images.shape[0]
            both = self.fused_cls(
                images.transpose(0, 1).flatten(0, 1), text_ids.repeat(2, 1), text_mask.repeat(2, 1)
            )
            return torch.cat([both[:size], both[size:]], dim=-1)
        raise ValueError("retrieval models have no class logits; use the retrieval evaluation")

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Class logits [B, num_labels] of a classification batch."""
        return self.head(self.features(batch["images"], batch["text_ids"], batch["text_mask"]))

    def forward(self, batch: dict[str, torch.Tensor], view: str = "task") -> dict[str, torch.Tensor]:
        """The training losses of a batch, as the trainer calls every model: ``{"loss": ...}``. Retrieval tasks
        fine-tune ITC + ITM of the backbone (no MLM: the batch carries no masked ids)."""
        if self.kind == "retrieval":
            return self.backbone(batch, "image")
        loss = F.cross_entropy(self.logits(batch).float(), batch["labels"])
        return {"ce": loss, "loss": loss}

    def rebuilt(self) -> TaskModel:
        """The same architecture with fresh, whole parameters (a ZeRO-3 engine partitions the trained ones)."""
        return TaskModel(
            CrossViewModel(self.backbone.cfg, load_pretrained=False), self.task, self.kind, self.label_names
        )

    def head_parameter_names(self) -> set[str]:
        return {name for name, _ in self.named_parameters() if name.startswith("head.")}

    # ---------------------------------------------------------------------------------------------- save/load
    def save(self, directory: str | Path, tokenizer=None, extra: dict[str, Any] | None = None) -> Path:
        directory = Path(directory)
        task_info = {"task": self.task, "kind": self.kind, "labels": self.label_names, **(extra or {})}
        self.backbone.save_pretrained(directory, extra={"task": task_info})
        if self.head is not None:
            save_model(self.head, str(directory / HEAD_WEIGHTS))
        (directory / TASK_CONFIG).write_text(json.dumps(task_info, indent=2, ensure_ascii=False))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory))
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> TaskModel:
        directory = Path(directory)
        if not (directory / TASK_CONFIG).exists():
            raise FileNotFoundError(f"not a fine-tuned task folder: {directory / TASK_CONFIG} is missing")
        info = json.loads((directory / TASK_CONFIG).read_text())
        model = cls(CrossViewModel.from_pretrained(directory), info["task"], info["kind"], info["labels"])
        if model.head is not None:
            load_model(model.head, str(directory / HEAD_WEIGHTS), strict=True)
        return model.to(device)

    @staticmethod
    def task_info(directory: str | Path) -> dict[str, Any]:
        return json.loads((Path(directory) / TASK_CONFIG).read_text())


def _init_like(backbone: CrossViewModel):
    std = getattr(backbone.encoder_config, "initializer_range", 0.02)

    def init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    return init
