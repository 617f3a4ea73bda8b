"""Retrieval evaluation of xFlickr&CO / WIT: ITC similarities for every image x caption, the top-k of every query
re-scored by the ITM head (batched across queries), then Recall@k both ways.

IGLUE reports R@1 for image retrieval (IR: caption -> image) and text retrieval (TR: image -> caption); an image
query counts as correct at k when any of its captions is among the top k.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch.utils.data import DataLoader

from cclm.tasks.batching import Collator, ImageList
from cclm.tasks.examples import RetrievalData

KS = (1, 5, 10)


def recall_at_k(
    i2t_scores: torch.Tensor, t2i_scores: torch.Tensor, text_image: Sequence[int], ks: Sequence[int] = KS
) -> dict[str, float]:
    """Recall@k (percent) from score matrices [images, texts] and [texts, images]; ``text_image[j]`` is caption
    j's image. Keys: ``tr_r{k}`` (image -> text), ``ir_r{k}`` (text -> image), their means and ``r_mean``."""
    text_image = torch.as_tensor(list(text_image), dtype=torch.long)
    n_images = i2t_scores.shape[0]
    # text retrieval: rank of the best-ranked correct caption of each image
    order = i2t_scores.argsort(dim=1, descending=True)
    correct = text_image[order] == torch.arange(n_images).unsqueeze(1)
    has_caption = correct.any(dim=1)
    tr_rank = torch.where(has_caption, correct.float().argmax(dim=1), torch.full((n_images,), 10**9))
    # image retrieval: rank of each caption's image
    ir_rank = (t2i_scores.argsort(dim=1, descending=True) == text_image.unsqueeze(1)).float().argmax(dim=1)
    out = {}
    for k in ks:
        out[f"tr_r{k}"] = 100.0 * (tr_rank[has_caption] < k).double().mean().item()
        out[f"ir_r{k}"] = 100.0 * (ir_rank < k).double().mean().item()
    out["tr_r_mean"] = sum(out[f"tr_r{k}"] for k in ks) / len(ks)
    out["ir_r_mean"] = sum(out[f"ir_r{k}"] for k in ks) / len(ks)
    out["r_mean"] = (out["tr_r_mean"] + out["ir_r_mean"]) / 2
    return out


@torch.no_grad()
def score_matrices(
    model,
    data: RetrievalData,
    roots: Mapping[str, str],
    collator: Collator,
    image_size: int,
    batch_size: int,
    k_test: int,
    device: torch.device,
    autocast,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(i2t [images, texts], t2i [texts, images]) scores: ITM probability for each query's ITC top-k, -inf else."""
    backbone = model.backbone
    image_tokens, image_feats = [], []
    for images in DataLoader(ImageList(data.images, roots, image_size), batch_size=batch_size):
        with autocast():
            tokens, feats = backbone.encode_image(images.to(device))
        image_tokens.append(tokens.float())
        image_feats.append(feats.float())
    text_tokens, text_masks, text_feats = [], [], []
    for start in range(0, len(data.texts), batch_size):
        batch = collator.tokenize(data.texts[start : start + batch_size])
        ids, mask = batch["text_ids"].to(device), batch["text_mask"].to(device)
        with autocast():
            tokens, feats = backbone.encode_text(ids, mask)
        text_tokens += list(tokens.float())  # per caption: lengths differ between batches
        text_masks += list(mask)
        text_feats.append(feats.float())
    image_tokens, image_feats, text_feats = (
        torch.cat(image_tokens),
        torch.cat(image_feats),
        torch.cat(text_feats),
    )
    similarity = image_feats @ text_feats.t()

    def itm_scores(image_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
        scores = []
        for start in range(0, len(image_index), batch_size):
            imgs, txts = (
                image_index[start : start + batch_size],
                text_index[start : start + batch_size].tolist(),
            )
            length = max(int(text_masks[j].sum()) for j in txts)
            tokens = torch.stack([text_tokens[j][:length] for j in txts])
            mask = torch.stack([text_masks[j][:length] for j in txts])
            memory = image_tokens[imgs]
            memory_mask = torch.ones(memory.shape[:2], dtype=mask.dtype, device=device)
            with autocast():
                logits = backbone.itm_logits(backbone.fuse(tokens, mask, memory, memory_mask))
            scores.append(logits.float().softmax(dim=-1)[:, 1])
        return torch.cat(scores)

    def rerank(sim: torch.Tensor, queries_are_images: bool) -> torch.Tensor:
        k = min(k_test, sim.shape[1])
        top = sim.topk(k, dim=1).indices
        queries = torch.arange(sim.shape[0], device=device).unsqueeze(1).expand_as(top).flatten()
        images, texts = (queries, top.flatten()) if queries_are_images else (top.flatten(), queries)
        scores = torch.full_like(sim, float("-inf"))
        scores.scatter_(1, top, itm_scores(images, texts).view_as(top))
        return scores

    return rerank(similarity, True).cpu(), rerank(similarity.t(), False).cpu()
