"""2 gloo ranks x batch b give the same contrastive loss and gradients as 1 rank x batch 2b; the reference's
gradient scaling gives 1/2 of that gradient."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from cclm import losses

N, D, IN = 8, 6, 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data():
    g = torch.Generator().manual_seed(0)
    x_img = torch.randn(N, IN, generator=g)
    x_txt = torch.randn(N, IN, generator=g)
    weight = torch.randn(D, IN, generator=g)
    return x_img, x_txt, weight


GROUPS = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])  # captions of one image: rows 0-1 and 3-5 (across the ranks)


def _loss(x_img, x_txt, weight, local_loss, grad="exact", groups=None):
    img = F.normalize(x_img @ weight.t(), dim=-1)
    txt = F.normalize(x_txt @ weight.t(), dim=-1)
    return losses.contrastive_loss(
        img, txt, 0.1, gather=True, local_loss=local_loss, grad=grad, group_ids=groups
    )


def _worker(rank, world, port, local_loss, queue, grad="exact", with_groups=False):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x_img, x_txt, weight = _data()
    shard = slice(rank * N // world, (rank + 1) * N // world)
    weight = weight.clone().requires_grad_()
    loss = _loss(x_img[shard], x_txt[shard], weight, local_loss, grad, GROUPS[shard] if with_groups else None)
    loss.backward()
    # What DDP/DeepSpeed do with gradients and what a trainer logs: the mean over ranks.
    grad = weight.grad.clone()
    dist.all_reduce(grad)
    grad /= world
    value = loss.detach().clone()
    dist.all_reduce(value)
    value /= world
    if rank == 0:
        queue.put((value.item(), grad.tolist()))
    dist.destroy_process_group()


@pytest.mark.parametrize("local_loss", [False, True])
def test_gathered_contrastive_loss_matches_single_process(local_loss):
    x_img, x_txt, weight = _data()
    weight = weight.clone().requires_grad_()
    reference = _loss(x_img, x_txt, weight, local_loss)
    reference.backward()

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_worker, args=(2, _free_port(), local_loss, queue), nprocs=2, start_method="spawn")
    value, grad = queue.get(timeout=60)
    assert abs(value - reference.item()) < 1e-6
    assert torch.allclose(torch.tensor(grad), weight.grad, atol=1e-6)


def test_reference_gradient_scaling_is_one_over_world_of_the_exact_gradient():
    """zengyan-97/CCLM models/xvlm.py AllGather: each rank computes the global loss and its backward keeps only
    its own slice; averaged over W ranks the parameter gradient is exact / W, the loss itself unchanged."""
    x_img, x_txt, weight = _data()
    weight = weight.clone().requires_grad_()
    exact = _loss(x_img, x_txt, weight, local_loss=False)
    exact.backward()

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(
        _worker, args=(2, _free_port(), False, queue, "reference"), nprocs=2, start_method="spawn"
    )
    value, grad = queue.get(timeout=60)
    assert abs(value - exact.item()) < 1e-6
    assert torch.allclose(torch.tensor(grad), weight.grad / 2, atol=1e-6)
    assert weight.grad.abs().max() > 1e-3  # the comparison is not between two zero gradients


def test_reference_gradient_refuses_local_loss():
    feats = F.normalize(torch.randn(4, 3), dim=-1)
    with pytest.raises(ValueError, match="local_loss"):
        losses.contrastive_loss(feats, feats, 0.1, local_loss=True, grad="reference")


@pytest.mark.parametrize("local_loss", [False, True])
def test_group_positives_gathered_over_ranks_match_one_process(local_loss):
    """Captions of one image are positives of each other also when they sit on different ranks."""
    x_img, x_txt, weight = _data()
    weight = weight.clone().requires_grad_()
    reference = _loss(x_img, x_txt, weight, local_loss, groups=GROUPS)
    reference.backward()

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(
        _worker, args=(2, _free_port(), local_loss, queue, "exact", True), nprocs=2, start_method="spawn"
    )
    value, grad = queue.get(timeout=60)
    assert abs(value - reference.item()) < 1e-6
    assert torch.allclose(torch.tensor(grad), weight.grad, atol=1e-6)
