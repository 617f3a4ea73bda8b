"""CCLM's image-pair fusion (``head: cclm`` for MaRVL / NLVR2) and its optional domain pretraining.

The reference (``models/model_nlvr.py``, ``models/xbert.py`` ``BertLayer``) doubles the fusion stack: fusion layer
i becomes two consecutive layers, both initialised from it; the first cross-attends to the left image, the second
to the right one (layer j of the doubled stack reads image ``j % 2``), and the two share their cross-attention key
and value projections (``share_cross_attention``). The [CLS] of the last layer goes to an MLP classifier.

Here the backbone's own fusion layers are the left-image layers and :class:`DualImageFusion` holds the right-image
copies, whose cross-attention key and value modules *are* the backbone layer's (one parameter, as the reference's
tied weights). Everything else of a copy (self-attention, cross-attention query and output, FFN) is its own.

Domain pretraining (``NLVR_pretrain.py``, ``NLVRDomainPretrainModel``): before NLVR fine-tuning, the doubled model
is trained on image-caption pairs with a 3-way "text assignment" task: each caption is shown with a pair of images
and predicts whether its own image is the left one (0), the right one (1), or neither (2). The other image(s)
are hard negatives drawn from the batch in proportion to ``softmax(image-image similarity / 0.07)`` (own image
excluded): with probability 2/3 one negative and the own image in random order, else two negatives. A linear
head (hidden -> 3) reads the [CLS]; the fine-tuning run then starts from the trained doubled layers with a new
classifier. :class:`TextAssignment` is that objective on top of a pair task model.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from cclm.config import HeadInit
from cclm.model.heads import init_new_head
from cclm.model.text import FusionStack, additive_mask

ASSIGNMENT_LABELS = ("left", "right", "neither")
SIMILARITY_TEMPERATURE = 0.07


class DualImageFusion(nn.Module):
    """The right-image copies of a fusion stack's layers (key/value projections shared with the originals)."""

    def __init__(self, fusion: FusionStack):
        super().__init__()
        self.layers = nn.ModuleList()
        for left in fusion.layers:
            right = copy.deepcopy(left)
            right.crossattention.self.key = left.crossattention.self.key
            right.crossattention.self.value = left.crossattention.self.value
            self.layers.append(right)

    def forward(
        self,
        fusion: FusionStack,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        left: torch.Tensor,
        right: torch.Tensor,
    ) -> torch.Tensor:
        """Text tokens ``hidden`` [B, L, H] (``mask`` [B, L]) through the doubled stack: ``fusion``'s layer i
        attending to the ``left`` image tokens [B, N, H], then its copy attending to the ``right`` ones."""
        if len(fusion.layers) != len(self.layers):
            raise ValueError(f"{len(self.layers)} right-image layers for {len(fusion.layers)} fusion layers")
        self_mask = additive_mask(mask, hidden.dtype)
        for left_layer, right_layer in zip(fusion.layers, self.layers):
            hidden = left_layer(hidden, attention_mask=self_mask, encoder_hidden_states=left)
            hidden = right_layer(hidden, attention_mask=self_mask, encoder_hidden_states=right)
        return hidden


def assignment_pairs(
    image_features: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's text-assignment examples for a batch of B image-caption pairs (B >= 3): (left image index
    [B], right image index [B], label [B]) for caption b, from the normalised image features [B, D].

    Per caption, with probability 2/3 its own image and one negative (drawn by similarity) in random order (label
    0: own image left, 1: right), else two different negatives (label 2). All draws are made at once, on the
    generator's device (no host synchronisation per caption): two negatives without replacement per caption, of
    which a one-negative example uses the first -- distributed as the reference's single draw."""
    size = image_features.shape[0]
    if size < 3:
        raise ValueError(
            f"text assignment draws two negatives per caption: a batch needs >= 3 pairs, got {size}"
        )
    device = generator.device if generator is not None else image_features.device
    with torch.no_grad():
        features = image_features.detach().float().to(device)
        weights = (features @ features.t() / SIMILARITY_TEMPERATURE).softmax(dim=1)
        weights.fill_diagonal_(0)
    draws = torch.rand(size, 2, generator=generator, device=device)
    negatives = torch.multinomial(weights, 2, generator=generator)
    rows = torch.arange(size, device=device)
    own = draws[:, 0] > 1 / 3
    own_left = draws[:, 1] > 0.5
    left = torch.where(own, torch.where(own_left, rows, negatives[:, 0]), negatives[:, 0])
    right = torch.where(own, torch.where(own_left, negatives[:, 0], rows), negatives[:, 1])
    labels = torch.where(own, torch.where(own_left, 0, 1), 2)
    target = image_features.device
    return left.to(target), right.to(target), labels.to(target)


class TextAssignment(nn.Module):
    """NLVR domain pretraining of a pair task model with ``head: cclm``: trains its backbone and doubled fusion
    layers (its classifier is not used) on batches of image-caption pairs (``images`` [B, 3, H, W], ``text_ids``,
    ``text_mask``): ``{"ta": loss, "loss": loss}``."""

    def __init__(self, task_model: nn.Module, seed: int = 0, head_init: HeadInit | str = HeadInit.normal):
        super().__init__()
        if getattr(task_model, "pair_fusion", None) is None:
            raise ValueError(
                "text assignment pretrains the doubled fusion layers of a pair model with head: cclm"
            )
        self.task_model = task_model
        hidden = task_model.backbone.encoder_config.hidden_size
        self.ta_head = nn.Linear(hidden, len(ASSIGNMENT_LABELS))
        std = getattr(task_model.backbone.encoder_config, "initializer_range", 0.02)
        init_new_head(self.ta_head, std, head_init)
        # the draws of which images a caption is shown with; a Trainer replaces it with its own sampling
        # generator (on the training device), whose state its checkpoints keep: a resumed stage draws as the
        # uninterrupted one would
        self.sampling_generator = torch.Generator().manual_seed(seed)

    def head_parameter_names(self) -> set[str]:
        return {name for name, _ in self.named_parameters() if name.startswith("ta_head.")}

    def forward(self, batch: dict[str, torch.Tensor], view: str = "task") -> dict[str, torch.Tensor]:
        backbone = self.task_model.backbone
        image_tokens, image_features = backbone.encode_image(batch["images"])
        left, right, labels = assignment_pairs(image_features, self.sampling_generator)
        text_tokens, _ = backbone.encode_text(batch["text_ids"], batch["text_mask"])
        fused = self.task_model.pair_fusion(
            backbone.fusion, text_tokens, batch["text_mask"], image_tokens[left], image_tokens[right]
        )
        loss = F.cross_entropy(self.ta_head(fused[:, 0]).float(), labels)
        return {"ta": loss, "loss": loss}
