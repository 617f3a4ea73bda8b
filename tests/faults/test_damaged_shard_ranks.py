"""One damaged shard among good ones must not stop a multi-GPU run: the rank it is dealt to loses that epoch's
samples (counted as ``corrupt_shard``) and goes on; only a stream that can never yield again fails."""

from __future__ import annotations

import json

import pytest

from cclm.config import DataConfig, from_dict
from cclm.data.pipeline import PretrainData
from cclm.data.shards import VIEW_PARALLEL, ShardSink
from cclm.errors import DataError

WORLD = 8


def write_pairs(folder, shards: int, per_shard: int = 4) -> list:
    with ShardSink(folder, VIEW_PARALLEL, max_samples=per_shard) as sink:
        for i in range(shards * per_shard):
            pair = {"src": f"hello {i}", "tgt": f"hallo {i}", "src_lang": "en", "tgt_lang": "de"}
            sink.write(f"p{i:04d}", {"json": json.dumps(pair).encode()}, ["en", "de"])
        sink.close()
    return sorted(folder.glob("*.tar"))


def damage(shard) -> None:
    shard.write_bytes(b"\x00garbage, not a tar" * 3)  # sizes.json still promises its 4 samples


def stream(folder, tokenizer, rank: int, world_size: int = WORLD, **data) -> PretrainData:
    cfg = from_dict(
        DataConfig, {"num_workers": 0, "parallel_text": {"shards": str(folder), "batch_size": 2}, **data}
    )
    return PretrainData(cfg, tokenizer, 16, rank=rank, world_size=world_size)


def one_rank(folder, tokenizer, **data) -> PretrainData:
    return stream(folder, tokenizer, 0, world_size=1, **data)


def batches(folder, tokenizer, rank: int, n: int, **data) -> list[dict]:
    text = stream(folder, tokenizer, rank, **data)
    return [text.next_batch("text") for _ in range(n)]


def test_every_rank_trains_on_with_one_damaged_shard_of_eight(tmp_path, tiny_tokenizer):
    """8 shards over 8 ranks, one shard damaged: each rank is dealt it in some epoch. Before, such a rank's epoch
    had no usable sample and it raised (7 of 8 ranks within 16 epochs); now it only counts the loss."""
    shards = write_pairs(tmp_path / "pt", shards=WORLD)
    damage(shards[3])
    lost = 0
    for rank in range(WORLD):
        text = stream(tmp_path / "pt", tiny_tokenizer, rank)
        got = [text.next_batch("text") for _ in range(32)]  # 16 epochs of 2 batches
        assert all(len(b["langs"]) == 2 for b in got)
        lost += text.skip_counts().get("corrupt_shard", 0)
    assert lost > 0  # the damaged shard was dealt and its samples were counted as lost, not read


def test_a_stream_whose_every_shard_is_damaged_still_fails(tmp_path, tiny_tokenizer):
    shards = write_pairs(tmp_path / "pt", shards=2)
    for shard in shards:
        damage(shard)
    with pytest.raises(DataError) as err:
        batches(tmp_path / "pt", tiny_tokenizer, rank=0, n=1)
    assert "no usable sample in all 2 shard(s)" in str(err.value)
    assert "corrupt_shard" in str(err.value) and "the stream would never yield a batch" in str(err.value)


def test_a_fixed_deal_of_damaged_shards_fails_at_once(tmp_path, tiny_tokenizer):
    """With shard_shuffle off a rank is dealt the same shards every epoch: a damaged deal never recovers."""
    shards = write_pairs(tmp_path / "pt", shards=WORLD * 2)
    order = sorted(str(s) for s in shards)
    damage(shards[0])
    damage(shards[WORLD])  # rank 0's fixed deal: shards 0 and 8
    with pytest.raises(DataError) as err:
        batches(tmp_path / "pt", tiny_tokenizer, rank=0, n=1, shard_shuffle=False)
    assert "no usable sample in 2 shard(s) dealt to worker 0" in str(err.value)
    assert order[0] in str(err.value)
    assert len(batches(tmp_path / "pt", tiny_tokenizer, rank=1, n=6, shard_shuffle=False)) == 6


def test_resuming_just_before_a_damaged_shard_goes_on(tmp_path, tiny_tokenizer):
    """A checkpoint taken after an epoch's last usable sample, when the rest of the epoch is a damaged shard: the
    resumed epoch's samples before the restart are not looked at again, so the epoch must not count as barren
    (it did, and every restart from that checkpoint stopped)."""
    shards = write_pairs(tmp_path / "pt", shards=2)
    damage(shards[1])
    for shuffle in (False, True):
        options = {"shard_shuffle": shuffle, "sample_shuffle_buffer": 1}
        text = one_rank(tmp_path / "pt", tiny_tokenizer, **options)
        first = text.next_batch("text"), text.next_batch("text")  # the good shard's 4 samples
        resumed = one_rank(tmp_path / "pt", tiny_tokenizer, **options)
        resumed.load_state_dict(text.state_dict())
        after = [resumed.next_batch("text") for _ in range(4)]
        assert [len(b["langs"]) for b in after] == [2, 2, 2, 2] and first


def test_fewer_shards_than_readers_with_one_damaged_goes_on(tmp_path, tiny_tokenizer):
    """Every reader reads every shard and keeps every n-th sample: an epoch in which a reader's n-th samples all
    fall in the damaged shard is not the end of the stream while other samples are good."""
    shards = write_pairs(tmp_path / "pt", shards=2, per_shard=2)
    damage(shards[1])
    for rank in range(4):
        text = stream(tmp_path / "pt", tiny_tokenizer, rank, world_size=4)
        assert [len(text.next_batch("text")["langs"]) for _ in range(5)] == [2] * 5


def test_a_reader_past_the_end_of_the_data_is_told_so(tmp_path, tiny_tokenizer):
    write_pairs(tmp_path / "pt", shards=1, per_shard=3)
    with pytest.raises(DataError, match="reader 5 gets no sample: the 8 readers"):
        batches(tmp_path / "pt", tiny_tokenizer, rank=5, n=1)
