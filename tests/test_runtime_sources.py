"""The resumable epoch batches of fine-tuning and cViL: every rank takes the same number of batches (also when a
data set has fewer examples than ranks), their count is known without drawing an order, and a source restored
from a saved state hands out exactly the batches the original would have."""

from __future__ import annotations

import itertools

import pytest

from cclm.runtime.sources import EpochBatches


def source(n, batch_size=2, rank=0, world=1, drop_last=False, seed=0):
    return EpochBatches(
        list(range(n)), batch_size, list, seed=seed, rank=rank, world_size=world, drop_last=drop_last
    )


@pytest.mark.parametrize("n, world", [(1, 3), (2, 3), (5, 2), (7, 3), (16, 2)])
def test_every_rank_takes_the_same_number_of_batches_and_every_example_is_used(n, world):
    for batch_size, drop_last in itertools.product((1, 2, 5), (False, True)):
        ranks = [source(n, batch_size, rank, world, drop_last) for rank in range(world)]
        counts = {len(r) for r in ranks}
        assert len(counts) == 1 and counts.pop() == len(ranks[0]._batches(0)) > 0
    seen = {i for rank in range(world) for i in source(n, 1, rank, world)._rank_indices(0)}
    assert seen == set(range(n))


def test_a_restored_source_continues_with_the_same_batches_across_epochs():
    original = source(7, batch_size=3, seed=5)
    for _ in range(4):  # into the second epoch
        original.next_batch()
    state = original.state_dict()
    expected = [original.next_batch() for _ in range(6)]
    restored = source(7, batch_size=3, seed=5)
    restored.load_state_dict(state)
    assert [restored.next_batch() for _ in range(6)] == expected
