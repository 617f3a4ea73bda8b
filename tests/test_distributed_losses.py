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


def _loss(x_img, x_txt, weight, local_loss, grad="exact", groups=None, uneven_rows=False):
    img = F.normalize(x_img @ weight.t(), dim=-1)
    txt = F.normalize(x_txt @ weight.t(), dim=-1)
    return losses.contrastive_loss(
        img,
        txt,
        0.1,
        gather=True,
        local_loss=local_loss,
        grad=grad,
        group_ids=groups,
        uneven_rows=uneven_rows,
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


# ------------------------------------------------------------------------------ ranks with different batch sizes
UNEVEN = (5, 3)  # rows of rank 0 and rank 1: batches a caller could not fill (uneven_rows=True)


VARIANTS = [("exact", False), ("exact", True), ("reference", False)]  # (gradient, group positives)


def _uneven_worker(rank, world, port, queue):
    """Every variant's loss and gradient on this rank's uneven share, in one process group (a spawn per
    variant cost ~10 s of the suite each)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x_img, x_txt, weight = _data()
    shard = slice(sum(UNEVEN[:rank]), sum(UNEVEN[: rank + 1]))
    results = []
    for grad, with_groups in VARIANTS:
        weight = weight.detach().clone().requires_grad_()
        groups = GROUPS[shard] if with_groups else None
        loss = _loss(x_img[shard], x_txt[shard], weight, False, grad, groups, uneven_rows=True)
        loss.backward()
        grad_sum = weight.grad.clone()
        dist.all_reduce(grad_sum)
        value = loss.detach().clone()
        dist.all_reduce(value)
        results.append((value.item() / world, (grad_sum / world).tolist()))
    if rank == 0:
        queue.put(results)
    dist.destroy_process_group()


def test_ranks_with_different_row_counts_give_the_loss_of_their_concatenation():
    """5 rows on rank 0, 3 on rank 1 (gloo aborted the all_gather of unequal shapes before): the loss is one
    process's on the 8 rows, and the gradient the exact one (1/2 of it with the reference's backward)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_uneven_worker, args=(2, _free_port(), queue), nprocs=2, start_method="spawn")
    for (grad, with_groups), (value, got) in zip(VARIANTS, queue.get(timeout=60), strict=True):
        x_img, x_txt, weight = _data()
        weight = weight.clone().requires_grad_()
        reference = _loss(x_img, x_txt, weight, False, groups=GROUPS if with_groups else None)
        reference.backward()
        assert abs(value - reference.item()) < 1e-6, (grad, with_groups)
        expected = weight.grad if grad == "exact" else weight.grad / 2
        assert torch.allclose(torch.tensor(got), expected, atol=1e-6), (grad, with_groups)


def _padded_worker(rank, world, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows, length = (3, 4) if rank == 0 else (1, 6)  # ITM's global negatives: rows and text lengths differ
    x = (
        torch.arange(rows * length * 2, dtype=torch.float32).reshape(rows, length, 2) + 100 * rank
    ).requires_grad_()
    gathered = losses.gather_padded(x, pad_value=-1, counts=losses.row_counts(rows))
    weights = torch.arange(gathered.numel(), dtype=torch.float32).reshape(gathered.shape)
    (gathered * weights).sum().backward()
    queue.put((rank, gathered.detach().tolist(), x.grad.tolist(), weights.tolist()))
    dist.destroy_process_group()


def test_gather_padded_takes_ranks_with_different_rows_and_lengths():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_padded_worker, args=(2, _free_port(), queue), nprocs=2, start_method="spawn")
    results = dict((r, rest) for r, *rest in (queue.get(timeout=60) for _ in range(2)))
    gathered = torch.tensor(results[0][0])
    assert gathered.shape == (4, 6, 2) and torch.equal(gathered, torch.tensor(results[1][0]))
    rank0 = torch.arange(24, dtype=torch.float32).reshape(3, 4, 2)
    rank1 = torch.arange(12, dtype=torch.float32).reshape(1, 6, 2) + 100
    assert torch.equal(gathered[:3, :4], rank0) and (gathered[:3, 4:] == -1).all()
    assert torch.equal(gathered[3:], rank1)
    # the exact gradient: every rank's weights summed over the ranks, each rank's own rows and columns
    weights = torch.tensor(results[0][2]) + torch.tensor(results[1][2])
    assert torch.equal(torch.tensor(results[0][1]), weights[:3, :4])
    assert torch.equal(torch.tensor(results[1][1]), weights[3:])
