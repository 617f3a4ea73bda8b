"""Region batches on 2 gloo ranks whose images hold different numbers of targets (the CCLM-4M setting with
``gather_features`` on, as configs/pretrain/cclm_4m.yaml).

Specification: ``collate_regions`` fills every rank's batch to ``batch_size`` with copies of its targets (the
reference's padding), so the ranks' all-gathers see one shape: both ranks finish forward and backward, and the
region ITC is one process's on the two batches put together. Before, rank 1's batch was 5 rows against rank 0's
8 and gloo aborted the all_gather (NCCL hangs or gathers wrong rows)."""

from __future__ import annotations

import os
import random
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import REPO

BATCH_SIZE = 8
TARGETS = {0: [2, 2, 2, 2], 1: [2, 2, 1]}  # targets per image: rank 1's images hold 5 < BATCH_SIZE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model():
    from cclm.config import ModelConfig, Negatives, load_config
    from cclm.model import CrossViewModel

    cfg = load_config(ModelConfig, REPO / "configs" / "model" / "tiny.yaml")
    cfg.objectives.bbox = True
    cfg.objectives.itm_negatives = Negatives("global")  # the ITM candidates are gathered too
    assert cfg.objectives.gather_features
    torch.manual_seed(0)
    return CrossViewModel(cfg, load_pretrained=False)


def _rank_batch(rank: int, vocab: int) -> dict:
    """A region batch of ``rank``'s examples, as the pipeline collates it, with random text fields."""
    from cclm.data.regions import RegionTarget, collate_regions

    rng = np.random.default_rng(rank)
    examples = [
        {
            "key": f"rank{rank}-image{i}",
            "image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
            "targets": [
                RegionTarget(f"thing {j}", "en", (0.1 * j, 0.1, 0.5 + 0.1 * j, 0.6), j == 0, j - 1)
                for j in range(n)
            ],
        }
        for i, n in enumerate(TARGETS[rank])
    ]
    batch = collate_regions(examples, BATCH_SIZE, random.Random(rank))
    rows = len(batch["texts"])
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(5, vocab, (rows, 6), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    batch.update(text_ids=ids, text_mask=torch.ones_like(ids), mlm_ids=ids, mlm_labels=labels)
    return batch


def _concatenated(first: dict, second: dict) -> dict:
    """One batch holding both ranks' images and targets."""
    out = {"images": torch.cat([first["images"], second["images"]])}
    out["idx_to_group_img"] = torch.cat(
        [first["idx_to_group_img"], second["idx_to_group_img"] + len(first["images"])]
    )
    for key, value in first.items():
        if key not in out:
            out[key] = torch.cat([value, second[key]]) if torch.is_tensor(value) else value + second[key]
    return out


def _worker(rank, world, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = _model()
    vocab = model.encoder_config.vocab_size
    batch = _rank_batch(rank, vocab)  # as the pipeline collates: BATCH_SIZE targets on every rank
    out = model(batch, "region")
    out["loss"].backward()
    finite = all(torch.isfinite(v).item() for v in out.values())
    grads = all(
        p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad
    )
    queue.put((rank, len(batch["texts"]), out["itc"].item(), finite and grads))
    dist.destroy_process_group()


@pytest.mark.usefixtures("one_thread")
def test_region_batches_of_two_ranks_with_different_target_counts_train():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_worker, args=(2, _free_port(), queue), nprocs=2, start_method="spawn")
    results = {r: rest for r, *rest in (queue.get(timeout=120) for _ in range(2))}
    assert [results[r][0] for r in (0, 1)] == [BATCH_SIZE, BATCH_SIZE]
    assert results[0][2] and results[1][2]  # finite losses and gradients on both ranks
    # the region ITC of the two ranks' batches is one process's on the 16 rows
    model = _model()
    vocab = model.encoder_config.vocab_size
    with torch.no_grad():
        together = model(_concatenated(_rank_batch(0, vocab), _rank_batch(1, vocab)), "region")
    assert results[0][1] == pytest.approx(together["itc"].item(), abs=1e-5)
    assert results[1][1] == pytest.approx(together["itc"].item(), abs=1e-5)
