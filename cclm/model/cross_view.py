"""CrossViewModel: one fusion stack for both views (image+caption, sentence+translation).

Naming used across the project:
  query  -- the text that runs through the text stack and then the fusion stack (the caption, or side A of a
            parallel pair); the masked copy of it is what MLM predicts;
  memory -- what the fusion stack cross-attends to: image tokens, or the text tokens of the other language.

Batches (dicts of tensors) accepted by :meth:`forward`:
  image view: images [B,3,H,W] (uint8 or normalised float), text_ids/text_mask [B,L], mlm_ids/mlm_labels [B,L],
              group_ids [B] (equal ids = same image; excluded as negatives)
  text view:  text_ids/text_mask, mlm_ids/mlm_labels (side A), other_ids/other_mask (side B), group_ids [B]
  region view (multi-grained, CCLM-4M; :func:`cclm.data.regions.collate_regions`): images [M,3,H,W] (each image
              once), idx_to_group_img [B] (the image of each text), boxes [B,4] (0..1 xyxy), is_image [B] (a
              whole-image caption), optional image_atts [B,1+N] (the vision tokens each text may see; drawn from
              ``boxes`` on the tower's token grid when absent), and the text fields of the image view
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_model
from torch import nn

from cclm import losses
from cclm.config import ConfigError, ModelConfig, from_dict, to_dict
from cclm.data.masking import IGNORE_INDEX
from cclm.data.regions import patch_masks
from cclm.errors import CheckpointError
from cclm.model.boxes import BoxHead, box_loss, box_xyxy_to_cxcywh, token_grid
from cclm.model.heads import MatchingHead, build_mlm_head, pretrained_lm_head
from cclm.model.resize import fit_pretrained_state
from cclm.model.text import FusionStack, MemoryKV, QueryPrefix, TextStack, load_encoder
from cclm.model.vision import VisionTower, load_pretrained_visual_state, resolve_open_clip_vision_cfg
from cclm.runtime.checkpoint import tied_aliases
from cclm.weights_files import save_module

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT = "cclm-cross-view"
FORMAT_VERSION = 1  # the newest config.json format this code reads
VIEWS = ("image", "text", "region")
LOSS_NAMES = {"image": ("itc", "itm", "mlm"), "text": ("ttc", "ttm", "mlm"), "region": ("itc", "itm", "mlm")}


def _number_positions_from_zero(encoder) -> None:
    """Make position i read row i of the pretrained table, as the reference's BertModel over XLM-R weights did
    (HF's XLM-R numbers real tokens from padding_idx + 1): rows move up by padding_idx + 1."""
    table = encoder.embeddings.position_embeddings.weight
    with torch.no_grad():
        table.copy_(torch.roll(table, shifts=encoder.config.pad_token_id + 1, dims=0))


class CrossViewModel(nn.Module):
    # Draws the ITM/TTM hard negatives; the trainer sets a seeded one whose state its checkpoints keep (None:
    # torch's global generator).
    sampling_generator: torch.Generator | None = None

    def __init__(self, cfg: ModelConfig, load_pretrained: bool = True):
        super().__init__()
        # A private copy: the resolved tower and encoder configs are recorded in ``self.cfg`` (what a saved model
        # is rebuilt from), never written into the caller's config.
        cfg = from_dict(ModelConfig, to_dict(cfg))
        # Vision: resolve the open_clip tower config once and store it, so a saved model rebuilds offline.
        tower_cfg, clip_dim = (dict(cfg.vision.tower), cfg.embed_dim)
        if not tower_cfg:
            tower_cfg, clip_dim = resolve_open_clip_vision_cfg(
                cfg.vision.name, pretrained=cfg.vision.pretrained
            )
            tower_cfg["image_size"] = cfg.vision.image_size
        self.vision = VisionTower(tower_cfg, clip_dim, load_pretrained=load_pretrained)
        if load_pretrained and cfg.vision.pretrained:
            state = load_pretrained_visual_state(cfg.vision.name, cfg.vision.pretrained)
            # built at cfg.vision.image_size: a position grid of the weights' own size is resampled to it
            self.vision.visual.load_state_dict(fit_pretrained_state(self.vision, state))
        self.vision.drop_clip_projection()
        # Text: the full encoder, cut into the text and fusion stacks; its resolved config is stored likewise.
        name = cfg.text.name_or_path if load_pretrained else None
        encoder_kwargs = dict(cfg.text.encoder)
        encoder = load_encoder(name, encoder_kwargs, cfg.attn_implementation)
        n_layers = encoder.config.num_hidden_layers
        for ids_key in ("text_layers", "fusion_layers"):
            bad = [i for i in getattr(cfg.text, ids_key) if not 0 <= i < n_layers]
            if bad:
                raise ValueError(
                    f"model.text.{ids_key}: layers {bad} do not exist in a {n_layers}-layer encoder"
                )
        if name and str(cfg.text.position_ids) == "reference":
            _number_positions_from_zero(encoder)
        self.text = TextStack(encoder, list(cfg.text.text_layers))
        self.fusion = FusionStack(encoder, list(cfg.text.fusion_layers))
        hidden = encoder.config.hidden_size
        width = self.vision.width
        self.image_to_fusion = nn.Linear(width, hidden) if width != hidden else nn.Identity()
        self.vision_proj = nn.Linear(self.vision.width, cfg.embed_dim)
        self.text_proj = nn.Linear(hidden, cfg.embed_dim)
        # Shape [1], not a 0-dim scalar: DeepSpeed's parameter broadcast cannot view a 0-dim tensor as bytes.
        self.temp = nn.Parameter(torch.tensor([float(cfg.temp)]))
        self.itm_head = MatchingHead(hidden, encoder.config.layer_norm_eps)
        self.mlm_head = build_mlm_head(encoder.config, self.text.embeddings.word_embeddings)
        self.box_head = BoxHead(hidden) if cfg.objectives.bbox else None
        for module in (
            self.image_to_fusion,
            self.vision_proj,
            self.text_proj,
            self.itm_head,
            self.mlm_head.dense,
            self.mlm_head.layer_norm,
            *([self.box_head] if self.box_head is not None else []),
        ):
            module.apply(encoder._init_weights)
        self._mlm_head_pretrained = False
        if name:
            head_state = pretrained_lm_head(name)
            if head_state is None:
                logger.warning(
                    "%s has no lm_head: the MLM head starts random (and learns at the new lr)", name
                )
            else:
                self.mlm_head.load_state_dict(head_state, strict=False)
                self._mlm_head_pretrained = True

        # Record what is needed to rebuild this exact architecture without downloads.
        cfg.vision.tower = tower_cfg
        encoder_dict = encoder.config.to_diff_dict()
        for key in (
            "architectures",
            "_name_or_path",
            "transformers_version",
            "model_type",
            "torch_dtype",
            "dtype",
        ):
            encoder_dict.pop(key, None)
        cfg.text.encoder = encoder_dict
        self.cfg = cfg
        self.encoder_config = encoder.config
        self._new_parameter_names = self._collect_new_parameter_names()

    # ------------------------------------------------------------------------------------------ building blocks
    def _collect_new_parameter_names(self) -> list[str]:
        names = [f"fusion.{n}" for n in self.fusion.new_parameter_names()]
        prefixes = ["image_to_fusion", "vision_proj", "text_proj", "itm_head", "box_head", "temp"]
        if not self._mlm_head_pretrained:  # tied decoder weight: the word embeddings, never new
            prefixes += ["mlm_head.dense", "mlm_head.layer_norm", "mlm_head.bias"]
        for prefix in prefixes:
            names += [n for n, _ in self.named_parameters() if n == prefix or n.startswith(prefix + ".")]
        return names

    def tied_parameter_aliases(self) -> set[str]:
        """State-dict names that are aliases of an earlier tensor (MLM decoder weight/bias)."""
        return tied_aliases(self)

    def new_parameter_names(self) -> list[str]:
        """Parameters that the pretrained towers did not provide (for a learning-rate multiplier)."""
        return list(self._new_parameter_names)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Activation checkpointing in the text, fusion and vision stacks (recompute in backward)."""
        self.text.gradient_checkpointing = enabled
        self.fusion.gradient_checkpointing = enabled
        self.vision.visual.set_grad_checkpointing(enabled)

    def logged_scalars(self) -> dict[str, float]:
        """What the trainer logs of the model itself besides the losses."""
        return {"temp": float(self.clamped_temp().detach())}

    def bounded_parameters(self) -> list[tuple[nn.Parameter, float, float]]:
        """The temperature and its bounds: the trainer clamps it after each update, in the optimizer's copy too
        (:func:`cclm.runtime.optim.clamp_bounded`)."""
        obj = self.cfg.objectives
        return [(self.temp, float(obj.temp_min), float(obj.temp_max))]

    def clamped_temp(self) -> torch.Tensor:
        """The temperature within its bounds, for reading it (evaluation, logs)."""
        obj = self.cfg.objectives
        return self.temp.clamp(obj.temp_min, obj.temp_max).squeeze(0)

    def _training_temp(self) -> torch.Tensor:
        """The temperature a training forward uses: the parameter clamped *in place* first, as the reference
        does, so that one that reached a bound keeps its gradient and can come back (a clamp in the graph would
        give it zero gradient and it would stick there)."""
        obj = self.cfg.objectives
        with torch.no_grad():
            self.temp.clamp_(obj.temp_min, obj.temp_max)
        # a copy: the next forward's clamp must not change a value that this forward's backward still needs
        # (both views in one step, gradient accumulation)
        return self.temp.squeeze(0).clone()

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (image tokens at the fusion width [B, 1+N, hidden], normalised ITC feature [B, embed_dim])."""
        tokens = self.vision(images)
        return self.image_to_fusion(tokens), F.normalize(self.vision_proj(tokens[:, 0]), dim=-1)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (text tokens [B, L, hidden], normalised ITC/TTC feature [B, embed_dim])."""
        tokens = self.text(ids, mask)
        return tokens, F.normalize(self.text_proj(tokens[:, 0]), dim=-1)

    def fuse(self, tokens, mask, memory, memory_mask=None) -> torch.Tensor:
        """Fusion stack over query text tokens attending to ``memory`` (image or text tokens, hidden width)."""
        return self.fusion(tokens, mask, memory, memory_mask)

    def itm_logits(self, fused: torch.Tensor) -> torch.Tensor:
        return self.itm_head(fused[:, 0])

    # Re-ranking scores each memory with many queries and each query with many memories: these three split
    # ``itm_logits(fuse(...))`` into the work done once per memory, once per query, and once per pair.
    def memory_kv(self, memory: torch.Tensor, memory_mask: torch.Tensor | None = None) -> MemoryKV:
        """The fusion stack's cross-attention keys/values of ``memory`` (image or text tokens, hidden width)."""
        return self.fusion.memory_kv(memory, memory_mask)

    def query_prefix(self, tokens: torch.Tensor, mask: torch.Tensor) -> QueryPrefix:
        """The fusion stack's work on query text tokens that does not depend on the memory."""
        return self.fusion.query_prefix(tokens, mask)

    def cached_itm_logits(self, prefix: QueryPrefix, memory: MemoryKV) -> torch.Tensor:
        """ITM logits [B, 2] of the pairs (``prefix`` row j, ``memory`` row j): equal to :meth:`itm_logits` of
        :meth:`fuse` on the same pairs."""
        return self.itm_logits(self.fusion.forward_cached(prefix, memory, cls_only=True))

    # ------------------------------------------------------------------------------------------------- regions
    def region_masks(self, boxes: torch.Tensor, is_image: torch.Tensor | None = None) -> torch.Tensor:
        """[B, 4] 0..1 ``xyxy`` boxes -> [B, 1 + N] bool: the summary token and every patch a box touches on this
        tower's token grid (:func:`cclm.data.regions.patch_masks`); every token for ``is_image`` rows."""
        masks = patch_masks(boxes.float(), *token_grid(self.vision))
        return masks if is_image is None else masks | is_image.bool()[:, None]

    def encode_regions(
        self, images: torch.Tensor, idx_to_group_img: torch.Tensor, image_atts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The region view's memory (reference ``get_vision_embeds(image, image_atts, idx_to_group_img)``): each
        image encoded once, its tokens gathered per text (``idx_to_group_img``). Returns (region tokens at the
        fusion width [B, 1+N, hidden], normalised region ITC feature [B, embed_dim], the whole image's tokens
        [B, 1+N, hidden]).

        A region's tokens are the image's patch tokens -- what it may not see is hidden by ``image_atts`` in the
        fusion cross-attention -- behind a summary token: the mean of the patch tokens inside the region (the
        reference's pooled region feature), which is also what ITC projects. Where a mask takes every patch
        (whole-image captions) the tower's own summary token stays: for a Swin that is the same mean, for a ViT
        its class token, as in the image view."""
        tokens = self.vision(images)
        full = self.image_to_fusion(tokens)[idx_to_group_img]
        patches = tokens[idx_to_group_img, 1:]
        weights = image_atts[:, 1:].to(patches.dtype)
        pooled = (weights[:, :, None] * patches).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)
        summary = torch.where(image_atts[:, 1:].all(1, keepdim=True), tokens[idx_to_group_img, 0], pooled)
        region = torch.cat([self.image_to_fusion(summary)[:, None], full[:, 1:]], dim=1)
        return region, F.normalize(self.vision_proj(summary), dim=-1), full

    def predict_boxes(self, query: torch.Tensor, query_mask: torch.Tensor, image_tokens: torch.Tensor):
        """Normalised ``cxcywh`` boxes [B, 4] from text tokens attending to the *whole* image (fusion-width
        tokens, as the reference's ``predict_bbox``: the region is what is to be found, so none is hidden)."""
        if self.box_head is None:
            raise ValueError("this model has no box head (model.objectives.bbox=false)")
        return self.box_head(self.fuse(query, query_mask, image_tokens)[:, 0])

    # ---------------------------------------------------------------------------------------------- objectives
    def forward(
        self, batch: dict[str, Any], view: str, group_positives: bool = False
    ) -> dict[str, torch.Tensor]:
        """All losses of one batch of ``view`` ("image", "text" or "region"), named, plus their weighted sum
        ``loss``. ``group_positives``: ITC/TTC count every pair of the same group (``group_ids``: the same image)
        as a positive, as the reference's retrieval fine-tuning does; pretraining keeps the diagonal only.
        A region batch runs the image view's objectives on each text's region, and with a box head adds the box
        losses ``bbox`` (L1) and ``giou`` on its region texts (the reference's ``get_bbox_loss``); with
        ``objectives.xlc_weight`` it adds ``xlc``, the cross-lingual consistency of the parallel pairs it carries.
        Its ITC always counts rows of one group as positives: :func:`cclm.data.regions.collate_regions` fills a
        batch to its size with copies of its targets, each with its original's group id, so that a copy is never
        its original's negative (other rows share a group only when they are the same pairing, the same image's
        caption or region twice: without copies this is the diagonal loss)."""
        if view not in VIEWS:
            raise ValueError(f"unknown view '{view}', expected one of {VIEWS}")
        obj = self.cfg.objectives
        text_ids, text_mask = batch["text_ids"], batch["text_mask"]
        query, query_feat = self.encode_text(text_ids, text_mask)
        full_image = None
        if view == "image":
            memory, memory_feat = self.encode_image(batch["images"])
            memory_mask = None  # every image token is real: no cross-attention mask (lets SDPA use flash)
        elif view == "region":
            memory_mask = batch.get("image_atts")
            if memory_mask is None:
                memory_mask = self.region_masks(batch["boxes"], batch["is_image"])
            memory_mask = memory_mask.long()
            memory, memory_feat, full_image = self.encode_regions(
                batch["images"], batch["idx_to_group_img"], memory_mask
            )
        else:
            memory_mask = batch["other_mask"]
            memory, memory_feat = self.encode_text(batch["other_ids"], memory_mask)
        temp = self._training_temp() if self.training else self.clamped_temp()
        c_name, m_name, l_name = LOSS_NAMES[view]
        # An objective whose weight is 0 is not computed at all (e.g. ITC-only training or benchmarking).
        out, weights = {}, {}
        if obj.itc_weight:
            out[c_name] = losses.contrastive_loss(
                memory_feat,
                query_feat,
                temp,
                obj.gather_features,
                obj.local_loss,
                str(obj.contrastive_grad),
                # a region batch's re-drawn copies (collate_regions) share their original's group: positives
                group_ids=batch["group_ids"] if group_positives or view == "region" else None,
            )
            weights[c_name] = obj.itc_weight
        if obj.itm_weight:
            query_side, memory_side = (query, text_mask, query_feat), (memory, memory_mask, memory_feat)
            if view == "text":  # TTM reads side B over side A (the reference, model_pretrain_cclm.py:99)
                query_side, memory_side = memory_side, query_side
            out[m_name] = self._matching(query_side, memory_side, temp, batch["group_ids"])
            weights[m_name] = obj.itm_weight
        if obj.mlm_weight and "mlm_ids" in batch:
            out[l_name] = self._mlm(batch["mlm_ids"], text_mask, batch["mlm_labels"], memory, memory_mask)
            weights[l_name] = obj.mlm_weight
        if full_image is not None and self.box_head is not None:
            predicted = self.predict_boxes(query, text_mask, full_image).float()
            target = box_xyxy_to_cxcywh(batch["boxes"].float())
            out["bbox"], out["giou"] = box_loss(predicted, target, batch["is_image"])
            weights["bbox"] = weights["giou"] = 1.0
        if full_image is not None and obj.xlc_weight:
            out["xlc"] = self._cross_lingual_consistency(batch, full_image)
            weights["xlc"] = obj.xlc_weight
        if not out:
            raise ValueError("every objective weight is 0: nothing to train")
        out["loss"] = sum(weights[k] * v for k, v in out.items())
        return out

    def _cross_lingual_consistency(self, batch: dict[str, Any], image_tokens: torch.Tensor) -> torch.Tensor:
        """MSE between the fused [CLS] of each parallel pair's side B (``parallel_other_ids``) and the
        stop-gradient fused [CLS] of its side A (``parallel_ids``), both over the same whole image: pair j is put
        over ``image_tokens[j % len]``. The images are the region batch's, unrelated to the sentences: the loss
        asks that a translation be read as its source whatever the image, which is what lets a head trained on
        one language's texts (the box head on English descriptions) answer for the others."""
        if "parallel_ids" not in batch:
            raise ValueError(
                "model.objectives.xlc_weight > 0 but the region batch carries no parallel pairs (PretrainData "
                "attaches them with parallel_with_regions=True; cclm pretrain does when the weight is set)"
            )
        source_ids, source_mask = batch["parallel_ids"], batch["parallel_mask"]
        target_ids, target_mask = batch["parallel_other_ids"], batch["parallel_other_mask"]
        pick = torch.arange(source_ids.shape[0], device=image_tokens.device) % image_tokens.shape[0]
        images = image_tokens[pick]
        with torch.no_grad():
            source = self.fuse(self.encode_text(source_ids, source_mask)[0], source_mask, images)[:, 0]
        target = self.fuse(self.encode_text(target_ids, target_mask)[0], target_mask, images)[:, 0]
        return F.mse_loss(target.float(), source.float())

    def _matching(self, query_side, memory_side, temp, group_ids) -> torch.Tensor:
        """ITM/TTM: B positives, one hard negative memory per query and one hard negative query per memory."""
        query, query_mask, query_feat = query_side
        memory, memory_mask, memory_feat = memory_side
        if self.cfg.objectives.itm_negatives == "global":
            cand_query, cand_query_mask = losses.gather_padded(query), losses.gather_padded(query_mask)
            cand_memory = losses.gather_padded(memory)
            cand_memory_mask = None if memory_mask is None else losses.gather_padded(memory_mask)
            cand_query_feat = losses.gather_with_grad(query_feat)
            cand_memory_feat = losses.gather_with_grad(memory_feat)
            cand_groups = losses.gather_with_grad(group_ids)
        else:
            cand_query, cand_query_mask, cand_memory, cand_memory_mask = (
                query,
                query_mask,
                memory,
                memory_mask,
            )
            cand_query_feat, cand_memory_feat, cand_groups = query_feat, memory_feat, group_ids
        positives = losses.positive_mask(group_ids, cand_groups)
        neg_memory, memory_valid = losses.sample_hard_negatives(
            query_feat @ cand_memory_feat.t() / temp, positives, self.sampling_generator
        )
        neg_query, query_valid = losses.sample_hard_negatives(
            memory_feat @ cand_query_feat.t() / temp, positives, self.sampling_generator
        )
        tokens = _cat_padded([query, query, cand_query[neg_query]])
        masks = _cat_padded([query_mask, query_mask, cand_query_mask[neg_query]])
        mem = _cat_padded([memory, cand_memory[neg_memory], memory])
        mem_masks = (
            None  # image memories: one length, no padding
            if memory_mask is None
            else _cat_padded([memory_mask, cand_memory_mask[neg_memory], memory_mask])
        )
        logits = self.itm_logits(self.fuse(tokens, masks, mem, mem_masks))
        batch_size = query.shape[0]
        return losses.matching_loss(
            logits[:batch_size], logits[batch_size:], torch.cat([memory_valid, query_valid])
        )

    def _mlm(self, mlm_ids, mask, labels, memory, memory_mask) -> torch.Tensor:
        """Conditional MLM: the masked query attends to the unmasked other view; only masked positions count."""
        fused = self.fuse(self.text(mlm_ids, mask), mask, memory, memory_mask)
        selected = labels != IGNORE_INDEX
        return losses.mlm_loss(self.mlm_head(fused[selected]), labels[selected])

    # ------------------------------------------------------------------------------------------------ save/load
    def save_pretrained(self, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (no pickle) to ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"model": to_dict(self.cfg), "format": FORMAT, "version": FORMAT_VERSION}
        if extra:
            config.update(extra)
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        save_module(self, directory / WEIGHTS_NAME)
        from cclm.model.card import write_model_card  # README.md: architecture, training, results

        write_model_card(directory, self, extra)
        return directory

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        device: str | torch.device = "cpu",
        *,
        image_size: int | None = None,
        window_size: int | None = None,
    ) -> CrossViewModel:
        """The model of a :meth:`save_pretrained` folder, rebuilt offline from its config. ``image_size`` /
        ``window_size``: run the vision tower at another resolution (Swin windows and relative-position tables,
        ViT position grid interpolated as the reference does: :func:`cclm.model.resize.resize_vision`); the
        model's config then records the new size. A damaged folder (config not JSON or without its ``model``
        section, weights cut short or not fitting the config) raises :class:`~cclm.errors.CheckpointError`
        naming the file."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.exists():
                raise FileNotFoundError(f"not a cclm model folder: {path} is missing")
        cfg = read_model_config(config_path)
        try:
            model = cls(cfg, load_pretrained=False)
        except ValueError as err:  # e.g. layers the encoder does not have
            raise CheckpointError(f"{config_path}: {err}") from None
        _load_weights(model, weights_path, config_path, device)
        if image_size is not None or window_size is not None:
            from cclm.model.resize import resize_vision

            resize_vision(model, image_size or model.cfg.vision.image_size, window_size)
        return model.to(device)


class NotAModelConfig(CheckpointError, ValueError):
    """A config.json that is not a cclm cross-view model's (a ValueError, as before CheckpointError existed)."""


def read_model_config(config_path: Path) -> ModelConfig:
    """The model config of a :meth:`CrossViewModel.save_pretrained` folder's ``config.json``; CheckpointError
    naming the file when it is not JSON, not a cclm config or its ``model`` section does not load."""
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path}: not valid JSON ({err}); the file is damaged") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise NotAModelConfig(
            f'{config_path} is not a cclm cross-view model config (no "format": "{FORMAT}")'
        )
    version = config.get("version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        logger.warning(
            "%s is format version %d, newer than this cclm knows (%d): update cclm if loading fails or the model "
            "behaves oddly",
            config_path,
            version,
            FORMAT_VERSION,
        )
    section = config.get("model")
    if not isinstance(section, dict):
        found = "missing" if "model" not in config else f"{json.dumps(section)[:40]}, not an object"
        raise CheckpointError(f'{config_path}: its "model" section is {found}; the file is damaged')
    try:
        return from_dict(ModelConfig, section)
    except ConfigError as err:
        raise CheckpointError(f'{config_path}: in its "model" section: {err}') from None


def _load_weights(model: CrossViewModel, weights_path: Path, config_path: Path, device) -> None:
    """Strictly load ``weights_path`` into ``model``; CheckpointError naming the file when it is damaged or its
    tensors do not fit the architecture of ``config_path``."""
    try:
        load_model(model, str(weights_path), strict=True, device=str(device))
    except SafetensorError as err:
        raise _unreadable(weights_path, err) from None
    except RuntimeError as err:
        if "state_dict" not in str(err):
            raise
        raise CheckpointError(
            f"{weights_path} does not fit the model of {config_path}: {_first_problems(str(err))}"
        ) from None


def _unreadable(weights_path: Path, err: Exception) -> CheckpointError:
    return CheckpointError(
        f"{weights_path}: not a readable safetensors file ({err}); it is damaged or incomplete: copy or export it "
        "again"
    )


def _first_problems(message: str, shown: int = 3, width: int = 200) -> str:
    """The first few lines of torch's multi-line load_state_dict error, each cut short, on one line."""
    problems = [line.strip().rstrip(".") for line in message.splitlines()[1:] if line.strip()]
    cut = [p if len(p) <= width else p[: width - 3] + "..." for p in problems[:shown]]
    more = f" (and {len(problems) - shown} more)" if len(problems) > shown else ""
    return "; ".join(cut) + more


def check_tokenizer_fits(model: CrossViewModel, tokenizer, model_source: Any, tokenizer_source: Any) -> None:
    """Refuse a tokenizer whose ids reach past the model's word embeddings (they would fail later, in the middle
    of a run, with an IndexError): CheckpointError naming both and both sizes. Call it wherever a model and a
    tokenizer are loaded as a pair."""
    vocabulary = model.text.embeddings.word_embeddings.num_embeddings
    if len(tokenizer) > vocabulary:
        raise CheckpointError(
            f"the tokenizer {tokenizer_source} has {len(tokenizer)} tokens but the model {model_source} has "
            f"only {vocabulary} word embeddings: they do not belong together (use the model folder's own "
            "tokenizer)"
        )


def initialise_from(model: CrossViewModel, directory: str | Path) -> list[str]:
    """Copy the weights of a :meth:`CrossViewModel.save_pretrained` folder into ``model`` (continued pretraining:
    ``init_from``). Every tensor of the folder must exist in ``model`` with the same shape (else ConfigError,
    naming them: the architectures differ); parameters the folder lacks (e.g. the box head when a first stage
    trained none) keep their fresh initialisation and are returned, sorted."""
    from safetensors.torch import load_file

    weights_path = Path(directory) / WEIGHTS_NAME
    if not weights_path.exists() or not (Path(directory) / CONFIG_NAME).exists():
        raise ConfigError(f"init_from: {directory} is not a cclm model folder (config.json + {WEIGHTS_NAME})")
    try:
        saved = load_file(str(weights_path))
    except SafetensorError as err:
        raise _unreadable(weights_path, err) from None
    own = model.state_dict()
    unknown = sorted(k for k in saved if k not in own)
    reshaped = sorted(k for k in saved if k in own and tuple(saved[k].shape) != tuple(own[k].shape))
    if unknown or reshaped:
        shown = [
            *unknown[:5],
            *(f"{k} {tuple(saved[k].shape)} vs {tuple(own[k].shape)}" for k in reshaped[:5]),
        ]
        raise ConfigError(
            f"init_from: {directory} does not fit this model ({len(unknown)} unknown tensors, {len(reshaped)} of "
            f"another shape: {'; '.join(shown)}); its model config must match model"
        )
    # tied tensors (MLM decoder = word embeddings) are saved under one of their names: loading it fills both
    tensors = model.state_dict(keep_vars=True)
    loaded = {tensors[k].data_ptr() for k in saved}
    missing = sorted(k for k, t in tensors.items() if t.data_ptr() not in loaded)
    model.load_state_dict(saved, strict=False)
    return missing


def _pad_to(x: torch.Tensor, length: int, value: float | int = 0) -> torch.Tensor:
    if x.shape[1] == length:
        return x
    pad = list(x.shape)
    pad[1] = length - x.shape[1]
    return torch.cat([x, x.new_full(pad, value)], dim=1)


def _cat_padded(parts: list[torch.Tensor], pad_value: float | int = 0) -> torch.Tensor:
    length = max(p.shape[1] for p in parts)
    return torch.cat([_pad_to(p, length, pad_value) for p in parts], dim=0)
