"""Skip counts add up across ranks (docs/reliability.md): with two ranks each reading its own shards, the logged
``skipped_samples`` and ``skipped/<reason>`` are the sums over both, not rank 0's alone."""

from __future__ import annotations

import io
import json

from PIL import Image

from cclm.data.shards import VIEW_IMAGE_CAPTION, ShardSink

from ..pretrain_runs import metrics, overrides, run_pretrain, shard_pattern, small_world


def _jpeg(i: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), ((37 * i) % 256, (91 * i) % 256, 120)).save(out, format="JPEG")
    return out.getvalue()


def test_skipped_samples_are_summed_over_ranks_by_reason(tmp_path):
    world = small_world(tmp_path / "world")
    shards = tmp_path / "image_caption"
    with ShardSink(shards, VIEW_IMAGE_CAPTION, max_samples=9) as sink:
        for shard in range(4):  # per shard: 2 undecodable images, 1 empty caption, then 6 good samples
            for bad in range(2):
                meta = json.dumps({"captions": {"en": "a red square"}}).encode()
                sink.write(f"s{shard}_bad{bad}", {"jpg": b"\xff\xd8 not a jpeg", "json": meta}, ["en"])
            empty = json.dumps({"captions": {"en": " "}}).encode()
            sink.write(f"s{shard}_empty", {"jpg": _jpeg(shard), "json": empty}, ["en"])
            for i in range(6):
                meta = json.dumps({"captions": {"en": f"picture {shard} {i}"}}).encode()
                sink.write(f"s{shard}_{i}", {"jpg": _jpeg(10 * shard + i), "json": meta}, ["en"])
        sink.close()
    out = tmp_path / "run"
    # 2 ranks x 2 shards x 6 good samples = 3 batches of 4 per rank: step 3 has read every shard once.
    options = {
        "data.image_caption.shards": shard_pattern(shards),
        "data.image_caption.batch_size": 4,
        "data.parallel_text": "null",
        "train.max_steps": 3,
        "train.save_every": 3,
        "train.log_every": 3,
    }
    run_pretrain(2, overrides(world, out, **options))
    (last,) = [r for r in metrics(out) if r["step"] == 3]
    assert last["skipped/bad_image"] == 8
    assert last["skipped/empty_caption"] == 4
    assert last["skipped_samples"] == 12
