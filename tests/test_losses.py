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
