"""The streaming pipeline: round trip, rank/worker splitting, corrupt samples, exact resume, batch format."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from cclm.config import DataConfig, from_dict
from cclm.data.pipeline import PretrainData
from cclm.data.shards import VIEW_IMAGE_CAPTION, VIEW_PARALLEL, ShardSink
from cclm.errors import CheckpointError, DataError

LANGS = ["en", "de", "fr", "ja"]


def make_image(i: int, size=(48, 40)) -> Image.Image:
    """A distinct, smooth picture per index (a colour gradient), so JPEG round trips stay close."""
    x = np.linspace(0, 1, size[0])[None, :, None]
    y = np.linspace(0, 1, size[1])[:, None, None]
    base = np.array([(37 * i) % 256, (91 * i) % 256, (53 * i + 40) % 256], dtype=float)[None, None, :]
    pixels = np.clip(base * 0.6 + 100 * x + 60 * y, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def jpeg(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=95)
    return out.getvalue()


def caption(i: int, lang: str) -> str:
    return f"{lang} caption number {i} Grüße 你好"


def write_image_shards(folder, n=24, per_shard=5) -> dict:
    expected = {}
    with ShardSink(folder, VIEW_IMAGE_CAPTION, max_samples=per_shard) as sink:
        for i in range(n):
            lang = LANGS[i % len(LANGS)]
            meta = {"captions": {lang: caption(i, lang)}}
            sink.write(f"img{i:04d}", {"jpg": jpeg(make_image(i)), "json": json.dumps(meta).encode()}, [lang])
            expected[f"img{i:04d}"] = (caption(i, lang), lang)
        sink.close()
    return expected


def write_parallel_shards(folder, n=30, per_shard=4) -> dict:
    expected = {}
    with ShardSink(folder, VIEW_PARALLEL, max_samples=per_shard) as sink:
        for i in range(n):
            pair = {"src": f"sentence {i}", "tgt": f"Satz {i}", "src_lang": "en", "tgt_lang": "de"}
            sink.write(f"pair{i:04d}", {"json": json.dumps(pair).encode()}, ["en", "de"])
            expected[f"pair{i:04d}"] = pair
        sink.close()
    return expected


def data_cfg(image=None, text=None, **kw):
    cfg = {"num_workers": 0, "sample_shuffle_buffer": 8, **kw}
    if image:
        cfg["image_caption"] = {"shards": str(image), "batch_size": kw.pop("image_bs", 4)}
    if text:
        cfg["parallel_text"] = {"shards": str(text), "batch_size": 3}
    cfg.pop("image_bs", None)
    return from_dict(DataConfig, cfg)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    images = write_image_shards(root / "ic")
    pairs = write_parallel_shards(root / "pt")
    return root, images, pairs


def drain(data: PretrainData, view: str) -> list[dict]:
    batches = []
    while True:
        try:
            batches.append(data.next_batch(view))
        except StopIteration:
            return batches


def test_round_trip_texts_languages_pixels(shards, tiny_tokenizer):
    root, images, _ = shards
    cfg = data_cfg(image=root / "ic", shard_shuffle=False, sample_shuffle_buffer=0)
    data = PretrainData(cfg, tiny_tokenizer, max_length=32, image_size=32, train=False, epochs=1)
    batches = drain(data, "image")
    seen = {}
    for batch in batches:
        assert batch["images"].dtype == torch.uint8 and batch["images"].shape[1:] == (3, 32, 32)
        expected_ids = tiny_tokenizer(batch["texts"], padding="longest", return_tensors="pt")["input_ids"]
        assert torch.equal(batch["text_ids"], expected_ids)
        for key, text, lang, pixels in zip(batch["keys"], batch["texts"], batch["langs"], batch["images"]):
            seen[key] = (text, lang)
            index = int(key[3:])
            # the evaluation transform resizes the whole 48x40 image to the square input (no crop)
            reference = make_image(index).resize((32, 32), Image.Resampling.BICUBIC)
            diff = np.abs(pixels.permute(1, 2, 0).numpy().astype(int) - np.asarray(reference).astype(int))
            assert diff.mean() < 4, key
    sizes = json.loads((root / "ic" / "sizes.json").read_text())
    assert len(seen) == sum(sizes.values()) == len(images)
    assert seen == images
    assert data.skip_counts() == {}


@pytest.mark.parametrize("view", ["image", "text"])
def test_ranks_and_workers_read_disjoint_samples_covering_the_set(shards, tiny_tokenizer, view):
    root, images, pairs = shards
    cfg = data_cfg(image=root / "ic", text=root / "pt", num_workers=2)
    keys = []
    for rank in range(2):
        data = PretrainData(cfg, tiny_tokenizer, 32, image_size=16, rank=rank, world_size=2, epochs=1)
        keys += [k for b in drain(data, view) for k in b["keys"]]
        data.close()
    expected = images if view == "image" else pairs
    assert len(keys) == len(set(keys)) == len(expected)
    assert set(keys) == set(expected)


def test_fewer_shards_than_readers_splits_by_sample(tmp_path, tiny_tokenizer):
    pairs = write_parallel_shards(tmp_path / "pt", n=10, per_shard=100)  # one shard, 4 readers
    cfg = data_cfg(text=tmp_path / "pt", num_workers=2)
    keys = []
    for rank in range(2):
        data = PretrainData(cfg, tiny_tokenizer, 32, rank=rank, world_size=2, epochs=1)
        keys += [k for b in drain(data, "text") for k in b["keys"]]
    assert sorted(keys) == sorted(pairs)


def test_corrupt_samples_are_skipped_and_counted_exactly(tmp_path, tiny_tokenizer):
    folder = tmp_path / "ic"
    with ShardSink(folder, VIEW_IMAGE_CAPTION, max_samples=6) as sink:

        def good(i):
            return {"jpg": jpeg(make_image(i)), "json": json.dumps({"captions": {"en": f"c {i}"}}).encode()}

        for i in range(5):
            sink.write(f"a{i}", good(i), ["en"])
        sink.write("bad_jpeg", {"jpg": b"\xff\xd8\xff\xe0 not a jpeg", "json": good(0)["json"]}, ["en"])
        sink.write(
            "empty", {"jpg": jpeg(make_image(7)), "json": json.dumps({"captions": {"en": " "}}).encode()}
        )
        sink.write(
            "unknown_lang",
            {"jpg": jpeg(make_image(8)), "json": json.dumps({"captions": {"xx": "c"}}).encode()},
        )
        sink.write("no_json", {"jpg": jpeg(make_image(9))})
        for i in range(10, 13):
            sink.write(f"b{i}", good(i), ["en"])
        for i in range(13, 18):  # third shard: its last two samples will be cut off
            sink.write(f"c{i}", good(i), ["en"])
        sink.close()
    third = folder / "shard-000002.tar"
    with tarfile.open(third) as tar:
        members = tar.getmembers()
    cut = members[-4].offset_data + 10  # inside the jpg of the 4th sample of the shard
    third.write_bytes(third.read_bytes()[:cut])

    cfg = data_cfg(image=folder, num_workers=2, image_bs=3)
    data = PretrainData(cfg, tiny_tokenizer, 32, image_size=16, epochs=1)
    keys = [k for b in drain(data, "image") for k in b["keys"]]
    assert sorted(keys) == sorted(
        [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(10, 13)] + [f"c{i}" for i in range(13, 16)]
    )
    assert data.skip_counts() == {
        "bad_image": 1,
        "corrupt_shard": 2,
        "empty_caption": 1,
        "missing_caption": 1,
        "unknown_language": 1,
    }


def batch_signature(batch: dict) -> tuple:
    tensors = tuple(batch[k].clone() for k in sorted(batch) if isinstance(batch[k], torch.Tensor))
    return tuple(batch["keys"]), tensors


def run_steps(data: PretrainData, steps: range) -> list[tuple]:
    out = []
    for step in steps:
        view = data.view_for_step(step)
        out.append((view, batch_signature(data.next_batch(view))))
    return out


def assert_same(a: list[tuple], b: list[tuple]) -> None:
    assert len(a) == len(b)
    for (va, (ka, ta)), (vb, (kb, tb)) in zip(a, b):
        assert va == vb and ka == kb
        assert all(torch.equal(x, y) for x, y in zip(ta, tb))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_the_uninterrupted_stream(shards, tiny_tokenizer, num_workers):
    root, _, _ = shards
    cfg = data_cfg(image=root / "ic", text=root / "pt", num_workers=num_workers, randaugment=True)
    total, cut = 40, 17  # several epochs of both streams; the cut is mid-epoch
    full = PretrainData(cfg, tiny_tokenizer, 32, image_size=16, seed=7)
    reference = run_steps(full, range(total))
    full.close()

    first = PretrainData(cfg, tiny_tokenizer, 32, image_size=16, seed=7)
    head = run_steps(first, range(cut))
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON checkpoint
    first.close()
    resumed = PretrainData(cfg, tiny_tokenizer, 32, image_size=16, seed=7)
    resumed.load_state_dict(state)
    tail = run_steps(resumed, range(cut, total))
    assert_same(head + tail, reference)
    assert {v for v, _ in reference} == {"image", "text"}


def test_resume_in_resampled_mode_is_exact_too(shards, tiny_tokenizer):
    root, _, _ = shards
    cfg = data_cfg(text=root / "pt", num_workers=2, resampled=True)
    reference = run_steps(PretrainData(cfg, tiny_tokenizer, 32), range(12))
    first = PretrainData(cfg, tiny_tokenizer, 32)
    head = run_steps(first, range(5))
    resumed = PretrainData(cfg, tiny_tokenizer, 32)
    resumed.load_state_dict(first.state_dict())
    assert_same(head + run_steps(resumed, range(5, 12)), reference)


def test_resume_refuses_a_changed_topology(shards, tiny_tokenizer):
    root, _, _ = shards
    data = PretrainData(data_cfg(text=root / "pt", num_workers=0), tiny_tokenizer, 32)
    data.next_batch("text")
    other = PretrainData(data_cfg(text=root / "pt", num_workers=2), tiny_tokenizer, 32)
    with pytest.raises(CheckpointError, match="num_workers"):
        other.load_state_dict(data.state_dict())


def test_resume_refuses_other_shard_files_under_the_same_names_and_follows_a_moved_folder(
    tmp_path, tiny_tokenizer
):
    """Converters name every folder's shards shard-000000.tar ...: resuming with the folders in the other order,
    or another corpus of as many shards, passed a check of the names and repeated samples; the same folder
    copied elsewhere (a node-local copy) resumes exactly."""
    a, b = tmp_path / "a", tmp_path / "b"
    write_parallel_shards(a, n=8)
    write_parallel_shards(b, n=8)  # the same names and sizes, written by another run
    first = PretrainData(data_cfg(text=f"{a}::{b}"), tiny_tokenizer, 32)
    head = run_steps(first, range(3))
    state = first.state_dict()
    for shards in (f"{b}::{a}", str(b), f"{b}::{b}"):
        other = PretrainData(data_cfg(text=shards), tiny_tokenizer, 32)
        with pytest.raises(CheckpointError, match=r"shard_files \(the shard files"):
            other.load_state_dict(state)
    for folder in (a, b):
        shutil.copytree(folder, tmp_path / "copy" / folder.name)
    moved = PretrainData(
        data_cfg(text=f"{tmp_path / 'copy' / 'a'}::{tmp_path / 'copy' / 'b'}"), tiny_tokenizer, 32
    )
    moved.load_state_dict(state)
    reference = run_steps(PretrainData(data_cfg(text=f"{a}::{b}"), tiny_tokenizer, 32), range(8))
    assert_same(head + run_steps(moved, range(3, 8)), reference)


def test_a_folder_without_a_write_id_is_told_by_its_files_sizes_and_pipes_by_name(tmp_path, tiny_tokenizer):
    """Folders another tool wrote (cclm prep translate republishes its manifest, without an id, on every
    rerun): the same files resume whatever the manifest says, other files do not; shards read through pipe:
    may move to another mirror."""
    a = tmp_path / "a"
    write_parallel_shards(a, n=8)
    manifest = json.loads((a / "manifest.json").read_text())
    manifest.pop("id")
    (a / "manifest.json").write_text(json.dumps(manifest))
    first = PretrainData(data_cfg(text=a), tiny_tokenizer, 32)
    run_steps(first, range(2))
    state = first.state_dict()
    manifest["created"], manifest["command"] = (
        "2030-01-01T00:00:00Z",
        "cclm prep translate ...",
    )  # republished
    (a / "manifest.json").write_text(json.dumps(manifest))
    PretrainData(data_cfg(text=a), tiny_tokenizer, 32).load_state_dict(state)
    shard = a / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes() + b"\0" * 10240)  # another file under the same name
    with pytest.raises(CheckpointError, match="shard_files"):
        PretrainData(data_cfg(text=a), tiny_tokenizer, 32).load_state_dict(state)

    names = [p.name for p in sorted(a.glob("shard-*.tar"))]
    piped = PretrainData(data_cfg(text="::".join(f"pipe:cat {a / n}" for n in names)), tiny_tokenizer, 32)
    run_steps(piped, range(2))
    mirror = shutil.copytree(a, tmp_path / "mirror")
    moved = PretrainData(
        data_cfg(text="::".join(f"pipe:cat {mirror / n}" for n in names)), tiny_tokenizer, 32
    )
    moved.load_state_dict(piped.state_dict())


def test_view_schedule_is_deterministic_and_follows_the_weights(shards, tiny_tokenizer):
    root, _, _ = shards
    cfg = data_cfg(image=root / "ic", text=root / "pt")
    cfg.image_caption.weight = 3.0
    a = PretrainData(cfg, tiny_tokenizer, 32, seed=1)
    b = PretrainData(cfg, tiny_tokenizer, 32, seed=1)
    views = [a.view_for_step(s) for s in range(2000)]
    assert views == [b.view_for_step(s) for s in range(2000)]
    assert 0.70 < views.count("image") / len(views) < 0.80
    assert a.views == ("image", "text")


def test_batches_feed_the_model(shards, tiny_tokenizer, tiny_model_cfg):
    from cclm.model.cross_view import CrossViewModel

    root, _, _ = shards
    model = CrossViewModel(tiny_model_cfg)
    data = PretrainData(
        data_cfg(image=root / "ic", text=root / "pt"),
        tiny_tokenizer,
        tiny_model_cfg.text.max_length,
        image_size=tiny_model_cfg.vision.image_size,
    )
    for view in data.views:
        batch = data.next_batch(view)
        assert (batch["mlm_labels"] != -100).any()
        assert batch["group_ids"].dtype == torch.int64
        out = model(batch, view)
        assert torch.isfinite(out["loss"])
    text = data.next_batch("text")
    assert len(text["langs"]) == len(text["other_langs"]) == text["other_ids"].shape[0]


def test_bad_inputs_fail_clearly(tmp_path, tiny_tokenizer):
    with pytest.raises(FileNotFoundError, match="matches no file"):
        PretrainData(data_cfg(image=tmp_path / "nothing-*.tar"), tiny_tokenizer, 32)
    with pytest.raises(FileNotFoundError, match="parallel_text.shards"):
        PretrainData(data_cfg(text=tmp_path / "missing.tar"), tiny_tokenizer, 32)
    with pytest.raises(ValueError, match="image_caption"):
        PretrainData(data_cfg(), tiny_tokenizer, 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .tar"):
        PretrainData(data_cfg(text=tmp_path / "empty"), tiny_tokenizer, 32)


def test_a_stream_whose_samples_are_all_bad_fails_instead_of_hanging(tmp_path, tiny_tokenizer):
    with ShardSink(tmp_path / "pt", VIEW_PARALLEL) as sink:
        for i in range(3):
            pair = {"src": "x", "tgt": "", "src_lang": "en", "tgt_lang": "de"}
            sink.write(f"p{i}", {"json": json.dumps(pair).encode()})
        sink.close()
    data = PretrainData(data_cfg(text=tmp_path / "pt"), tiny_tokenizer, 32)
    with pytest.raises(DataError, match="no usable sample"):
        data.next_batch("text")


def test_a_language_filter_is_normalised_and_checked_against_the_manifest(shards, tiny_tokenizer):
    """``EN`` reads the English captions; a code that is no language, or one the shards hold no sample in,
    fails at start naming what the shards have (before, every sample was skipped and the stream failed later)."""
    root, images, _ = shards

    def image_cfg(languages):
        return from_dict(
            DataConfig,
            {
                "num_workers": 0,
                "image_caption": {"shards": str(root / "ic"), "batch_size": 4, "languages": languages},
            },
        )

    data = PretrainData(image_cfg(["EN"]), tiny_tokenizer, 32, train=False, epochs=1)
    read = drain(data, "image")
    assert sum(len(b["langs"]) for b in read) == sum(1 for _, lang in images.values() if lang == "en")
    assert {lang for b in read for lang in b["langs"]} == {"en"}
    with pytest.raises(DataError) as err:
        PretrainData(image_cfg(["de", "xx"]), tiny_tokenizer, 32)
    assert str(err.value).startswith("data.image_caption.languages: 'xx' is not a language code")
    assert str(err.value).endswith("; the shards' manifest.json lists " + ", ".join(sorted(set(LANGS))))
    with pytest.raises(DataError) as err:
        PretrainData(image_cfg(["de", "sw"]), tiny_tokenizer, 32)
    assert "hold no samples in sw (their manifest.json lists " + ", ".join(sorted(set(LANGS))) in str(
        err.value
    )


def test_a_filter_on_shards_without_a_manifest_fails_naming_it(shards, tmp_path, tiny_tokenizer):
    """Nothing to check at start: the stream then stops with a DataError naming the filter, not a RuntimeError."""
    root, _, _ = shards
    shutil.copytree(root / "ic", tmp_path / "ic")
    (tmp_path / "ic" / "manifest.json").unlink()
    cfg = from_dict(
        DataConfig,
        {
            "num_workers": 0,
            "image_caption": {"shards": str(tmp_path / "ic"), "batch_size": 4, "languages": ["sw"]},
        },
    )
    data = PretrainData(cfg, tiny_tokenizer, 32)
    with pytest.raises(DataError, match="filtered_language") as err:
        data.next_batch("image")
    assert "check data.image_caption.languages=[sw] against the shards" in str(err.value)


def test_a_data_error_in_a_dataloader_worker_is_printed_as_its_own_line(tmp_path, tiny_tokenizer, capsys):
    from cclm.cli_args import run_command

    with ShardSink(tmp_path / "pt", VIEW_PARALLEL) as sink:
        for i in range(3):
            pair = {"src": "x", "tgt": "", "src_lang": "en", "tgt_lang": "de"}
            sink.write(f"p{i}", {"json": json.dumps(pair).encode()})
        sink.close()
    data = PretrainData(data_cfg(text=tmp_path / "pt", num_workers=1), tiny_tokenizer, 32)
    assert run_command("pretrain", lambda argv: data.next_batch("text"), ["pretrain"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith(
        "cclm pretrain: text: no usable sample in all 1 shard(s) (up to epoch 0; skipped: "
    )
    assert line.endswith("(in DataLoader worker process 0)") and "Traceback" not in line


def test_pipe_urls_and_joined_patterns(shards, tiny_tokenizer):
    root, _, pairs = shards
    spec = f"pipe:cat {root}/pt/shard-000000.tar::{root}/pt/shard-{{000001..000002}}.tar"
    data = PretrainData(data_cfg(text=spec), tiny_tokenizer, 32, train=False, epochs=1)
    keys = sorted(k for b in drain(data, "text") for k in b["keys"])
    assert keys == sorted(pairs)[:12]  # 3 shards of 4 pairs


def test_resampled_mode_continues_with_a_fresh_stream_after_a_topology_change(shards, tiny_tokenizer, caplog):
    root, _, pairs = shards
    data = PretrainData(data_cfg(text=root / "pt", resampled=True), tiny_tokenizer, 32)
    data.next_batch("text")
    other = PretrainData(data_cfg(text=root / "pt", resampled=True), tiny_tokenizer, 32, rank=1, world_size=2)
    other.load_state_dict(data.state_dict())
    assert "restarts with a fresh seed" in caplog.text
    assert set(other.next_batch("text")["keys"]) <= set(pairs)


def test_manifests_list_their_shards_and_older_ones_vouch_for_sizes_json(tmp_path, tiny_tokenizer, caplog):
    pairs = write_parallel_shards(tmp_path / "pt", n=6, per_shard=4)
    manifest_path = tmp_path / "pt" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["files"] == ["shard-000000.tar", "shard-000001.tar"]
    del manifest["files"]  # as written before manifests listed their files
    manifest_path.write_text(json.dumps(manifest))
    data = PretrainData(
        data_cfg(text=tmp_path / "pt", unlisted_shards="refuse"), tiny_tokenizer, 32, train=False, epochs=1
    )
    assert sorted(k for b in drain(data, "text") for k in b["keys"]) == sorted(pairs)
    assert "manifest" not in caplog.text


# ------------------------------------------------------------------- per-view lengths, normaliser, schedule
def count_rule_masks(n: int, mask_prob: float, cap: int) -> int:
    """The reference's n_pred (Python round), limited to the n - 1 candidates."""
    return min(cap, max(1, int(round(n * mask_prob))), n - 1)


PUNCTUATION_ONLY = {
    "img_punct": "?! ... (*)",
    "pair_punct0": ("Fine.", "--- !"),
    "pair_punct1": ("...", "Gut."),
}


def write_long_shards(root, n=12, punctuation_only=False) -> None:
    """Captions and pairs of very different lengths, cased and with punctuation; ``punctuation_only`` adds one
    caption and two pairs (one per side) that ``pre_caption`` empties."""
    with ShardSink(root / "ic", VIEW_IMAGE_CAPTION, max_samples=4) as sink:
        for i in range(n):
            text = "A Red Circle, above a BLUE square! " * (1 + i % 5)
            meta = {"captions": {"en": text}}
            sink.write(f"img{i:04d}", {"jpg": jpeg(make_image(i)), "json": json.dumps(meta).encode()}, ["en"])
        if punctuation_only:
            meta = {"captions": {"en": PUNCTUATION_ONLY["img_punct"]}}
            sink.write("img_punct", {"jpg": jpeg(make_image(99)), "json": json.dumps(meta).encode()}, ["en"])
        sink.close()
    with ShardSink(root / "pt", VIEW_PARALLEL, max_samples=4) as sink:
        for i in range(n):
            pair = {
                "src": "Two small green Triangles (on the left). " * (1 + i % 4),
                "tgt": "Zwei kleine grüne Dreiecke links! " * (1 + (i + 2) % 4),
                "src_lang": "en",
                "tgt_lang": "de",
            }
            sink.write(f"pair{i:04d}", {"json": json.dumps(pair).encode()}, ["en", "de"])
        for key in ("pair_punct0", "pair_punct1") if punctuation_only else ():
            src, tgt = PUNCTUATION_ONLY[key]
            pair = {"src": src, "tgt": tgt, "src_lang": "en", "tgt_lang": "de"}
            sink.write(key, {"json": json.dumps(pair).encode()}, ["en", "de"])
        sink.close()


def per_view_cfg(root, masking=None, image=None, text=None, **kw):
    cfg = {
        "num_workers": 0,
        "sample_shuffle_buffer": 8,
        "image_caption": {"shards": str(root / "ic"), "batch_size": 4, **(image or {})},
        "parallel_text": {"shards": str(root / "pt"), "batch_size": 3, **(text or {})},
        "masking": masking or {},
        **kw,
    }
    return from_dict(DataConfig, cfg)


def test_each_view_has_its_own_max_length_and_max_masks(tmp_path, tiny_tokenizer):
    write_long_shards(tmp_path)
    cfg = per_view_cfg(
        tmp_path,
        masking={"rule": "count", "mask_prob": 0.4, "skipgram_prob": 0.2, "max_masks": 7},
        image={"max_length": 12, "max_masks": 3},
        text={"max_length": 20, "max_masks": 5},
    )
    data = PretrainData(cfg, tiny_tokenizer, 32, image_size=16, train=False, epochs=1)
    assert data.max_lengths == {"image": 12, "text": 20}
    assert {v: s.max_masks for v, s in data.masking.items()} == {"image": 3, "text": 5}
    for view, width, cap in (("image", 12, 3), ("text", 20, 5)):
        batches = drain(data, view)
        assert batches
        full = 0
        for batch in batches:
            expected = tiny_tokenizer(
                batch["texts"], padding="longest", truncation=True, max_length=width, return_tensors="pt"
            )["input_ids"]
            assert torch.equal(batch["text_ids"], expected)
            lengths = batch["text_mask"].sum(1)
            assert int(lengths.max()) <= width
            full += int((lengths == width).sum())
            ends = batch["text_ids"][torch.arange(len(lengths)), lengths - 1]
            assert (ends == tiny_tokenizer.eos_token_id).all()  # truncated rows still close with </s>
            masks = (batch["mlm_labels"] != -100).sum(1).tolist()
            assert masks == [count_rule_masks(n, 0.4, cap) for n in lengths.tolist()]
            if view == "text":
                assert int(batch["other_mask"].sum(1).max()) <= width
        assert full > 0  # the long texts did hit the view's cap


def test_views_fall_back_to_the_shared_settings(tmp_path, tiny_tokenizer):
    write_long_shards(tmp_path, n=4)
    cfg = per_view_cfg(tmp_path, masking={"rule": "count", "max_masks": 7}, text={"max_masks": 2})
    data = PretrainData(cfg, tiny_tokenizer, 24, image_size=16)
    assert data.max_lengths == {"image": 24, "text": 24}
    assert {v: s.max_masks for v, s in data.masking.items()} == {"image": 7, "text": 2}
    with pytest.raises(ValueError, match="data.parallel_text.max_masks=0"):
        PretrainData(per_view_cfg(tmp_path, text={"max_masks": 0}), tiny_tokenizer, 24)
    with pytest.raises(ValueError, match="skipgram_size"):
        bad = {"rule": "count", "skipgram_prob": 0.2, "skipgram_size": 1}
        PretrainData(per_view_cfg(tmp_path, masking=bad), tiny_tokenizer, 24)


def test_the_normaliser_is_applied_and_texts_it_empties_are_skipped(tmp_path, tiny_tokenizer):
    import functools

    from cclm.data.normalize import pre_caption

    write_long_shards(tmp_path, punctuation_only=True)
    normalizer = functools.partial(pre_caption, max_words=0)
    cfg = per_view_cfg(tmp_path, num_workers=2)
    data = PretrainData(cfg, tiny_tokenizer, 40, image_size=16, train=False, epochs=1, normalizer=normalizer)
    keys = {}
    views = {"image": [("text_ids", "texts")], "text": [("text_ids", "texts"), ("other_ids", "other_texts")]}
    for view, fields in views.items():
        keys[view] = set()
        for batch in drain(data, view):
            keys[view] |= set(batch["keys"])
            for ids_key, texts_key in fields:
                raw = batch[texts_key]
                cleaned = [pre_caption(t) for t in raw]
                assert all(c != r for c, r in zip(cleaned, raw))  # the raw texts are cased and punctuated
                expected = tiny_tokenizer(
                    cleaned, padding="longest", truncation=True, max_length=40, return_tensors="pt"
                )["input_ids"]
                assert torch.equal(batch[ids_key], expected)
    assert keys["image"] == {f"img{i:04d}" for i in range(12)}
    assert keys["text"] == {f"pair{i:04d}" for i in range(12)}
    assert data.skip_counts() == {"empty_after_normalize": 3}
    data.close()
    # without a normaliser the same samples are read as they are
    plain = PretrainData(per_view_cfg(tmp_path), tiny_tokenizer, 40, image_size=16, train=False, epochs=1)
    assert "img_punct" in {k for b in drain(plain, "image") for k in b["keys"]}
    assert plain.skip_counts() == {}


def test_interleave_takes_text_then_image_and_resumes_exactly(tmp_path, tiny_tokenizer):
    write_long_shards(tmp_path)
    cfg = per_view_cfg(tmp_path, masking={"rule": "count", "skipgram_prob": 0.2}, num_workers=2)

    def build():
        return PretrainData(cfg, tiny_tokenizer, 24, image_size=16, seed=3, view_schedule="interleave")

    full = build()
    assert [full.view_for_step(s) for s in range(6)] == ["text", "image"] * 3
    total, cut = 16, 7  # an odd cut: the resumed run starts with an image step
    reference = run_steps(full, range(total))
    full.close()
    first = build()
    head = run_steps(first, range(cut))
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    resumed = build()
    resumed.load_state_dict(state)
    assert_same(head + run_steps(resumed, range(cut, total)), reference)
    assert [v for v, _ in reference] == ["text", "image"] * (total // 2)
    resumed.close()


def test_interleave_refuses_stream_weights_and_unknown_schedules(tmp_path, tiny_tokenizer):
    write_long_shards(tmp_path, n=4)
    weighted = per_view_cfg(tmp_path, image={"weight": 2.0})
    with pytest.raises(ValueError, match=r"data\.image_caption\.weight=2"):
        PretrainData(weighted, tiny_tokenizer, 24, view_schedule="interleave")
    assert (
        PretrainData(weighted, tiny_tokenizer, 24).view_schedule == "alternate"
    )  # the default draws by weight
    with pytest.raises(ValueError, match="view_schedule"):
        PretrainData(per_view_cfg(tmp_path), tiny_tokenizer, 24, view_schedule="round_robin")
    only_text = from_dict(DataConfig, {"parallel_text": {"shards": str(tmp_path / "pt")}, "num_workers": 0})
    data = PretrainData(only_text, tiny_tokenizer, 24, view_schedule="interleave")
    assert {data.view_for_step(s) for s in range(5)} == {"text"}
