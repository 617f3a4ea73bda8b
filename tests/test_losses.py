"""Objectives: ITC against open_clip's ClipLoss, and the hard-negative sampler's guarantees."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from cclm import losses


def _features(n=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    b = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    return a.requires_grad_(), b.requires_grad_()


def test_itc_equals_open_clip_clip_loss_values_and_gradients():
    from open_clip.loss import ClipLoss

    temp = torch.tensor(0.07, requires_grad=True)
    img, txt = _features()
    ours = losses.contrastive_loss(img, txt, temp)
    ours.backward()
    ours_grads = [img.grad.clone(), txt.grad.clone(), temp.grad.clone()]

    img2, txt2 = (x.detach().clone().requires_grad_() for x in (img, txt))
    scale = torch.tensor(1 / 0.07, requires_grad=True)
    reference = ClipLoss()(img2, txt2, scale)
    reference.backward()
    assert torch.allclose(ours, reference, atol=1e-6)
    assert torch.allclose(ours_grads[0], img2.grad, atol=1e-6)
    assert torch.allclose(ours_grads[1], txt2.grad, atol=1e-6)
    # d/dtemp = d/dscale * dscale/dtemp = grad_scale * (-1/temp^2)
    assert torch.allclose(ours_grads[2], scale.grad * (-1 / 0.07**2), rtol=1e-5)


def test_sampler_never_returns_positive_or_duplicate():
    torch.manual_seed(0)
    group_ids = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4])  # duplicates: rows 1/2 and 4/5/6
    positives = losses.positive_mask(group_ids)
    logits = torch.randn(8, 8) * 3 + torch.eye(8) * 10  # positives are the most similar: the worst case
    for _ in range(500):
        index, valid = losses.sample_hard_negatives(logits, positives)
        assert valid.all()
        assert not positives[torch.arange(8), index].any()


def test_sampler_marks_rows_without_any_negative_invalid():
    group_ids = torch.tensor([7, 7, 7])
    index, valid = losses.sample_hard_negatives(torch.randn(3, 3), losses.positive_mask(group_ids))
    assert not valid.any()
    assert index.shape == (3,)


def test_sampler_follows_softmax_distribution():
    logits = torch.tensor([[5.0, 1.0, 0.0, -1.0, 0.5], [0.0, 5.0, 2.0, 2.0, -3.0]])
    group_ids = torch.tensor([0, 1, 2, 3, 4])
    positives = losses.positive_mask(group_ids[:2], group_ids)
    draws = 20000
    gen = torch.Generator().manual_seed(1)
    counts = torch.zeros(2, 5)
    for _ in range(draws // 100):
        index, _ = losses.sample_hard_negatives(
            logits.repeat(100, 1), positives.repeat(100, 1), generator=gen
        )
        index = index.view(100, 2)
        for row in range(2):
            counts[row] += torch.bincount(index[:, row], minlength=5)
    for row in range(2):
        expected = torch.softmax(logits[row].masked_fill(positives[row], float("-inf")), 0) * draws
        keep = ~positives[row]
        assert counts[row][positives[row]].sum() == 0
        _, p_value = stats.chisquare(counts[row][keep].numpy(), expected[keep].numpy())
        assert p_value > 1e-3, (counts[row], expected)


def test_matching_loss_ignores_invalid_negatives():
    pos = torch.tensor([[0.0, 3.0], [0.0, 2.0]])
    neg = torch.tensor([[2.0, 0.0], [-5.0, 5.0]])  # the second negative would be a very bad prediction
    loss = losses.matching_loss(pos, neg, torch.tensor([True, False]))
    expected = F.cross_entropy(torch.cat([pos, neg[:1]]), torch.tensor([1, 1, 0]))
    assert torch.allclose(loss, expected)


@pytest.mark.parametrize("n_masked", [0, 3])
def test_mlm_loss_counts_only_given_positions(n_masked):
    logits = torch.randn(n_masked, 11, requires_grad=True)
    labels = torch.randint(0, 11, (n_masked,))
    loss = losses.mlm_loss(logits, labels)
    loss.backward()
    if n_masked:
        assert np.isclose(loss.item(), F.cross_entropy(logits, labels).item())
    else:
        assert loss.item() == 0.0


def test_group_positives_spread_each_rows_target_over_its_positives():
    """The reference's retrieval fine-tuning (models/xvlm.py get_contrastive_loss with idx), by hand."""
    import math

    g = torch.Generator().manual_seed(3)
    img = F.normalize(torch.randn(4, 5, generator=g), dim=-1)
    txt = F.normalize(torch.randn(4, 5, generator=g), dim=-1)
    groups = torch.tensor([7, 7, 8, 9])  # rows 0 and 1: two captions of one image
    temp = 0.2
    logits = (img @ txt.t() / temp).tolist()

    def side(rows):
        total = 0.0
        for i, row in enumerate(rows):
            log_z = math.log(sum(math.exp(v) for v in row))
            positives = [j for j in range(4) if groups[i] == groups[j]]
            total += -sum(row[j] - log_z for j in positives) / len(positives)
        return total / len(rows)

    columns = [list(c) for c in zip(*logits, strict=True)]
    expected = 0.5 * (side(logits) + side(columns))
    got = losses.contrastive_loss(img, txt, temp, gather=False, group_ids=groups)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    distinct = losses.contrastive_loss(img, txt, temp, gather=False, group_ids=torch.arange(4))
    plain = losses.contrastive_loss(img, txt, temp, gather=False)
    assert distinct.item() == pytest.approx(plain.item(), rel=1e-6)
    assert got.item() != pytest.approx(plain.item(), rel=1e-3)  # the shared image changes the loss


def test_retrieval_fine_tuning_counts_every_caption_of_an_image_as_its_positive(tiny_model_cfg, monkeypatch):
    from cclm.model import CrossViewModel
    from cclm.tasks.task_model import TaskModel

    seen = []
    original = losses.contrastive_loss

    def spy(*args, **kwargs):
        seen.append(kwargs.get("group_ids"))
        return original(*args, **kwargs)

    monkeypatch.setattr(losses, "contrastive_loss", spy)
    model = TaskModel(CrossViewModel(tiny_model_cfg, load_pretrained=False), "xflickrco", "retrieval")
    ids = torch.randint(5, model.backbone.encoder_config.vocab_size, (4, 6))
    size = model.backbone.cfg.vision.image_size
    batch = {
        "images": torch.randint(0, 255, (4, 3, size, size), dtype=torch.uint8),
        "text_ids": ids,
        "text_mask": torch.ones_like(ids),
        "group_ids": torch.tensor([0, 0, 1, 2]),
    }
    model(batch)
    model.backbone(batch, "image")  # pretraining: the diagonal only
    assert seen[0].tolist() == [0, 0, 1, 2] and seen[1] is None
