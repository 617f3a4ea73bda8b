"""Task heads on the fused [CLS] token and the task model that pairs them with the cross-view backbone.

- ``single``: XVNLI (image premise + hypothesis), xGQA / easy-VQA (image + question): an MLP over the fused [CLS]
  of the text attending to the image.
- ``pair``: MaRVL / NLVR2: the caption is fused with each image separately and the two [CLS] vectors are
  concatenated before the MLP (one caption, two fused images).
- ``retrieval``: xFlickr&CO / WIT: no new head; ITC + ITM of the backbone are fine-tuned directly.

Those are the IGLUE/VOLTA-style heads (``head="iglue"``, the default). ``head="cclm"`` selects the CCLM
reference's heads where it has its own (a task module's ``CCLM_HEAD``):

- ``answer_decoder`` (xGQA, easy-VQA): a generative answer decoder that ranks the answer list
  (:mod:`cclm.tasks.answer_decoder`); the label names are the answers;
- ``dual_image_fusion`` (MaRVL / NLVR2): the caption passes through a doubled fusion stack that cross-attends to
  the left and the right image in turn, then an MLP on its [CLS] (:mod:`cclm.tasks.nlvr_fusion`);
- other tasks: the same heads as ``iglue`` (the reference's XVNLI head is that MLP as well).

A fine-tuned task folder is a cclm model folder (``config.json`` + ``model.safetensors`` + tokenizer files) plus
``task_head.safetensors`` and ``task.json`` (task name, kind, head style, label names).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_model
from torch import nn

from cclm.config import HeadInit
from cclm.errors import CheckpointError
from cclm.model.card import EVAL_RESULTS, write_model_card
from cclm.model.cross_view import CrossViewModel
from cclm.model.fingerprint import weights_digest
from cclm.model.heads import init_new_head
from cclm.tasks import get_task
from cclm.tasks.answer_decoder import K_TEST, AnswerDecoder
from cclm.tasks.nlvr_fusion import DualImageFusion
from cclm.weights_files import save_module

HEAD_WEIGHTS = "task_head.safetensors"
TASK_CONFIG = "task.json"
KINDS = ("single", "pair", "retrieval")
HEAD_STYLES = ("iglue", "cclm")
CLASSIFIER, ANSWER_DECODER, DUAL_IMAGE_FUSION = "classifier", "answer_decoder", "dual_image_fusion"


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


class PairHead(nn.Module):
    """CCLM's image-pair head: the right-image copies of the fusion layers and the MLP on the [CLS] they end in
    (called on that [CLS], it is the MLP: ``head(features(...))`` gives the logits as for every other head)."""

    def __init__(
        self, backbone: CrossViewModel, num_labels: int, head_init: HeadInit | str = HeadInit.normal
    ):
        super().__init__()
        hidden, eps = backbone.encoder_config.hidden_size, backbone.encoder_config.layer_norm_eps
        self.fusion = DualImageFusion(backbone.fusion)
        self.classifier = ClassifierHead(hidden, hidden, num_labels, eps)
        init_new_head(self.classifier, initializer_range(backbone), head_init)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)


def head_design(task: str, kind: str, head: str) -> str:
    """Which head a task gets in a head style: ``classifier``, ``answer_decoder`` or ``dual_image_fusion``."""
    if head not in HEAD_STYLES:
        raise ValueError(f"unknown head style '{head}' (expected one of {HEAD_STYLES})")
    if head == "iglue" or kind == "retrieval":
        return CLASSIFIER
    return getattr(get_task(task), "CCLM_HEAD", CLASSIFIER)


class TaskModel(nn.Module):
    def __init__(
        self,
        backbone: CrossViewModel,
        task: str,
        kind: str,
        label_names: list[str] | None = None,
        head: str = "iglue",
        head_init: HeadInit | str = HeadInit.normal,
    ):
        """``head_init``: how the new classifier starts (:func:`~cclm.model.heads.init_new_head`)."""
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown task kind '{kind}' (expected one of {KINDS})")
        self.backbone, self.task, self.kind, self.head_style = backbone, task, kind, str(head)
        self.design = head_design(task, kind, self.head_style)
        needs = {ANSWER_DECODER: "single", DUAL_IMAGE_FUSION: "pair"}.get(self.design, kind)
        if kind != needs:
            raise ValueError(f"the head '{self.design}' is for '{needs}' tasks; '{task}' is of kind '{kind}'")
        self.label_names = list(label_names or [])
        hidden = backbone.encoder_config.hidden_size
        self.head: nn.Module | None = None
        if kind != "retrieval":
            if len(self.label_names) < 2:
                raise ValueError(f"task '{task}' needs at least 2 labels, got {self.label_names}")
            if self.design == ANSWER_DECODER:
                self.head = AnswerDecoder(backbone)
            elif self.design == DUAL_IMAGE_FUSION:
                self.head = PairHead(backbone, len(self.label_names), head_init)
            else:
                in_features = 2 * hidden if kind == "pair" else hidden
                self.head = ClassifierHead(
                    in_features, hidden, len(self.label_names), backbone.encoder_config.layer_norm_eps
                )
                init_new_head(self.head, initializer_range(backbone), head_init)

    # ------------------------------------------------------------------------------------ answer decoder
    @property
    def decodes_answers(self) -> bool:
        return self.design == ANSWER_DECODER

    @property
    def pair_fusion(self) -> DualImageFusion | None:
        """The doubled fusion stack's right-image layers (``head: cclm`` image-pair tasks), else None."""
        return self.head.fusion if self.design == DUAL_IMAGE_FUSION else None

    def needs_answer_tokens(self) -> bool:
        return self.decodes_answers and not self.head.has_answers

    def set_answer_tokens(self, tokenize) -> None:
        """Tokenise the answer list (the label names) for the answer decoder with ``tokenize`` (a
        :class:`~cclm.tasks.batching.TaskCollator`'s ``tokenize``: texts -> ``text_ids`` / ``text_mask``, the
        model's normaliser and tokenizer); they are saved with the head. No-op for the other heads."""
        if self.decodes_answers:
            encoded = tokenize(list(self.label_names))
            self.head.set_answers(encoded["text_ids"], encoded["text_mask"])

    def fused_cls(
        self, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        """Fused [CLS] of each text attending to its image: [B, hidden]."""
        image_tokens, _ = self.backbone.encode_image(images)
        text_tokens, _ = self.backbone.encode_text(text_ids, text_mask)
        image_mask = torch.ones(image_tokens.shape[:2], dtype=text_mask.dtype, device=text_mask.device)
        return self.backbone.fuse(text_tokens, text_mask, image_tokens, image_mask)[:, 0]

    def question_states(
        self, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        """Every fused token of each text attending to its image [B, L, hidden] (the answer decoder's memory)."""
        image_tokens, _ = self.backbone.encode_image(images)
        text_tokens, _ = self.backbone.encode_text(text_ids, text_mask)
        return self.backbone.fuse(text_tokens, text_mask, image_tokens)

    def features(self, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """What the head sees: the fused [CLS] ([B, hidden]), or for image pairs (images [B, 2, 3, H, W]) the
        [CLS] of the text fused with each image, concatenated ([B, 2 * hidden]; both images in one pass), or with
        ``head: cclm`` the [CLS] of the text through the doubled fusion stack ([B, hidden])."""
        if self.decodes_answers:
            raise ValueError("the answer decoder reads every fused question token: use question_states")
        if self.kind == "single":
            return self.fused_cls(images, text_ids, text_mask)
        if self.pair_fusion is not None:
            size = images.shape[0]
            image_tokens, _ = self.backbone.encode_image(images.transpose(0, 1).flatten(0, 1))
            text_tokens, _ = self.backbone.encode_text(text_ids, text_mask)
            fused = self.pair_fusion(
                self.backbone.fusion, text_tokens, text_mask, image_tokens[:size], image_tokens[size:]
            )
            return fused[:, 0]
        if self.kind == "pair":
            size = images.shape[0]
            both = self.fused_cls(
                images.transpose(0, 1).flatten(0, 1), text_ids.repeat(2, 1), text_mask.repeat(2, 1)
            )
            return torch.cat([both[:size], both[size:]], dim=-1)
        raise ValueError("retrieval models have no class logits; use the retrieval evaluation")

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Class logits [B, num_labels] of a classification batch (not for the answer decoder: it ranks)."""
        return self.head(self.features(batch["images"], batch["text_ids"], batch["text_mask"]))

    def rank_answers(
        self, batch: dict[str, torch.Tensor], k: int = K_TEST, first_token_twice: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The answer decoder's ranking of the answer list: (label ids [B, k], scores [B, k]), best first."""
        states = self.question_states(batch["images"], batch["text_ids"], batch["text_mask"])
        return self.head.rank(states, batch["text_mask"], k, first_token_twice)

    def predict_labels(
        self, batch: dict[str, torch.Tensor], k: int = K_TEST, first_token_twice: bool = False
    ) -> torch.Tensor:
        """The predicted label id of every example [B]: the classifier's argmax, or the decoder's best answer
        among the ``k`` it scores in full."""
        if self.decodes_answers:
            return self.rank_answers(batch, k, first_token_twice)[0][:, 0]
        return self.logits(batch).argmax(dim=-1)

    def forward(self, batch: dict[str, torch.Tensor], view: str = "task") -> dict[str, torch.Tensor]:
        """The training losses of a batch, as the trainer calls every model: ``{"loss": ...}``. Retrieval tasks
        fine-tune ITC + ITM of the backbone (no MLM: the batch carries no masked ids), with every caption of an
        image a positive of it (the reference's ``idx``); the answer decoder learns
        the gold answer's tokens."""
        if self.kind == "retrieval":  # other captions of the same image are positives, not negatives
            return self.backbone(batch, "image", group_positives=True)
        if self.decodes_answers:
            states = self.question_states(batch["images"], batch["text_ids"], batch["text_mask"])
            loss = self.head.loss(batch["labels"], states, batch["text_mask"])
            return {"answer_lm": loss, "loss": loss}
        loss = F.cross_entropy(self.logits(batch).float(), batch["labels"])
        return {"ce": loss, "loss": loss}

    def rebuilt(self) -> TaskModel:
        """The same architecture with fresh, whole parameters (a ZeRO-3 engine partitions the trained ones)."""
        model = TaskModel(
            CrossViewModel(self.backbone.cfg, load_pretrained=False),
            self.task,
            self.kind,
            self.label_names,
            head=self.head_style,
        )
        if self.decodes_answers and self.head.has_answers:
            model.head.set_answers(self.head.answer_ids.cpu(), self.head.answer_mask.cpu())
        return model

    def head_parameter_names(self) -> set[str]:
        """The newly initialised parameters (the head learning-rate multiplier's): the classifiers. The answer
        decoder and the right-image fusion layers start as copies of pretrained layers and learn at the base rate,
        as the reference (which multiplies only its ``init_params``)."""
        prefix = {ANSWER_DECODER: None, DUAL_IMAGE_FUSION: "head.classifier."}.get(self.design, "head.")
        if prefix is None:
            return set()
        return {name for name, _ in self.named_parameters() if name.startswith(prefix)}

    # ---------------------------------------------------------------------------------------------- save/load
    def save(self, directory: str | Path, tokenizer=None, extra: dict[str, Any] | None = None) -> Path:
        directory = Path(directory)
        task_info = {
            "task": self.task,
            "kind": self.kind,
            "head": self.head_style,
            "labels": self.label_names,
            **(extra or {}),
        }
        self.backbone.save_pretrained(directory, extra={"task": task_info})
        if self.head is not None:
            save_module(self.head, directory / HEAD_WEIGHTS)
        (directory / TASK_CONFIG).write_text(json.dumps(task_info, indent=2, ensure_ascii=False))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory))
        return directory

    def record_results(self, directory: str | Path, results: dict[str, Any]) -> None:
        """Evaluation results of this model, saved in ``directory`` (``eval_results.json``), and its model card
        written again so that it shows them."""
        directory = Path(directory)
        (directory / EVAL_RESULTS).write_text(json.dumps(results, indent=2, ensure_ascii=False))
        task_info = json.loads((directory / TASK_CONFIG).read_text())
        write_model_card(directory, self.backbone, {"task": task_info})

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> TaskModel:
        directory = Path(directory)
        if not (directory / TASK_CONFIG).exists():
            raise FileNotFoundError(f"not a fine-tuned task folder: {directory / TASK_CONFIG} is missing")
        info = json.loads((directory / TASK_CONFIG).read_text())
        for key in ("task", "kind", "labels"):
            if key not in info:
                raise CheckpointError(f"{directory / TASK_CONFIG}: missing key '{key}'")
        model = cls(
            CrossViewModel.from_pretrained(directory),
            info["task"],
            info["kind"],
            info["labels"],
            head=info.get("head", "iglue"),  # folders written before head styles existed are iglue
        )
        if model.head is not None:
            weights = str(directory / HEAD_WEIGHTS)
            if model.decodes_answers:  # the answer tokens' buffers take the saved shapes first
                with safe_open(weights, framework="pt") as saved:
                    if "answer_ids" in saved.keys() and saved.get_slice("answer_ids").get_shape()[0] > 0:
                        model.head.set_answers(
                            saved.get_tensor("answer_ids"), saved.get_tensor("answer_mask")
                        )
            load_model(model.head, weights, strict=True)
        return model.to(device)

    @staticmethod
    def task_info(directory: str | Path) -> dict[str, Any]:
        return json.loads((Path(directory) / TASK_CONFIG).read_text())

    @staticmethod
    def weights_digest(directory: str | Path) -> str:
        """Which model a result table's rows came from (:func:`cclm.model.fingerprint.weights_digest`)."""
        return weights_digest(directory)


def initializer_range(backbone: CrossViewModel) -> float:
    """The std of the text encoder's own weight init (BERT's 0.02), that of new heads under ``head_init: normal``."""
    return float(getattr(backbone.encoder_config, "initializer_range", 0.02))
