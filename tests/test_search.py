"""``cclm index`` / ``cclm search``: unreadable files are skipped and reported, indexing resumes, search ranks by
the model's similarity, and the HTML page shows the thumbnails (checked in headless Chromium)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cclm
from cclm.cli import main as cclm_main
from cclm.inference import search

SOLID = {
    "red.jpg": (230, 20, 20),
    "green.png": (20, 200, 40),
    "sub/blue.jpg": (20, 40, 230),
    "yellow.jpg": (240, 220, 20),
}


def write_solid(path: Path, colour, size=(48, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, quality=95)


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "photos"
    for name, colour in SOLID.items():
        write_solid(folder / name, colour)
    (folder / "notes.txt").write_text("not an image\n")
    cut = folder / "truncated.jpg"
    Image.new("RGB", (64, 64), (10, 120, 200)).save(cut, quality=95)
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    return folder


def test_index_skips_unreadable_files_and_reports_them(tiny_model_dir, image_dir, tmp_path, capsys):
    out = tmp_path / "index"
    code = cclm_main(
        ["index", str(image_dir), "--model", str(tiny_model_dir), "--out", str(out), "--num-workers", "0"]
    )
    assert code == 0
    captured = capsys.readouterr()
    assert "indexed 4 new images" in captured.out
    assert "skipped 2 unreadable files" in captured.err
    assert re.search(r"notes\.txt: .*cannot identify image file", captured.err)
    assert re.search(r"(?i)truncated\.jpg: .*truncated", captured.err)

    index = search.ImageIndex.read(out)
    assert sorted(index.paths) == sorted(SOLID)
    assert set(index.skipped) == {"notes.txt", "truncated.jpg"}
    engine = cclm.load(tiny_model_dir, device="cpu")
    expected = engine.encode_images([image_dir / p for p in index.paths])
    torch.testing.assert_close(index.embeddings(out), expected, atol=1e-5, rtol=1e-5)


def test_index_resumes_after_interruption_and_adds_new_files(
    tiny_model_dir, image_dir, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "index"
    real_save = search.save_tensors
    calls = []

    def save_then_crash(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        real_save(tensors, path)

    monkeypatch.setattr(search, "save_tensors", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        search.build_index(image_dir, tiny_model_dir, out, batch_size=2, chunk_size=2)
    first = search.ImageIndex.read(out)
    # files are taken in sorted order; the first chunk (3 images + notes.txt skipped) was completed and kept
    assert first.paths == ["green.png", "red.jpg", "sub/blue.jpg"] and len(first.shards) == 1
    assert list(first.skipped) == ["notes.txt"]

    monkeypatch.setattr(search, "save_tensors", real_save)
    report = search.build_index(image_dir, tiny_model_dir, out, batch_size=2, chunk_size=2)
    assert (report.already, report.indexed, list(report.skipped)) == (3, 1, ["truncated.jpg"])
    write_solid(image_dir / "later" / "purple.jpg", (150, 40, 180))
    report = search.build_index(image_dir, tiny_model_dir, out, batch_size=2, chunk_size=2)
    assert (report.already, report.indexed, report.skipped_before, report.skipped) == (4, 1, 2, {})

    fresh = tmp_path / "fresh"
    search.build_index(image_dir, tiny_model_dir, fresh, batch_size=8, chunk_size=100)
    resumed, full = search.ImageIndex.read(out), search.ImageIndex.read(fresh)
    assert sorted(resumed.paths) == sorted(full.paths) and resumed.skipped == full.skipped
    by_path = dict(zip(full.paths, full.embeddings(fresh)))
    for path, row in zip(resumed.paths, resumed.embeddings(out)):
        torch.testing.assert_close(row, by_path[path], atol=1e-5, rtol=1e-5)

    with pytest.raises(ValueError, match="was built with image folder"):
        search.build_index(tmp_path, tiny_model_dir, out)


def test_search_prints_matches_ranked_by_similarity(tiny_model_dir, image_dir, tmp_path, capsys):
    out = tmp_path / "index"
    search.build_index(image_dir, tiny_model_dir, out)
    capsys.readouterr()
    query = "ein roter Kreis über einem blauen Quadrat"
    assert cclm_main(["search", str(out), query, "-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["rank", "cosine", "path"]
    rows = [line.split() for line in lines[1:]]
    assert [r[0] for r in rows] == ["1", "2", "3"]

    engine = cclm.load(tiny_model_dir, device="cpu")
    index = search.ImageIndex.read(out)
    cosine = (engine.encode_texts([query]) @ index.embeddings(out).t())[0]
    expected = [str(image_dir / index.paths[i]) for i in cosine.argsort(descending=True)[:3]]
    assert [r[2] for r in rows] == expected
    assert [float(r[1]) for r in rows] == pytest.approx(sorted(cosine.tolist(), reverse=True)[:3], abs=1e-3)

    assert cclm_main(["search", str(out), query, "-k", "2", "--rerank", "--rerank-k", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["rank", "cosine", "match", "path"]
    matches = [float(line.split()[2]) for line in lines[1:]]
    assert len(matches) == 2 and matches[0] >= matches[1]
    top_path = Path(lines[1].split()[3])
    assert engine.match([top_path], [query])[0].item() == pytest.approx(matches[0], abs=1e-3)

    # an image deleted after indexing is left out of re-ranking, with a warning, instead of failing the search
    top_path.unlink()
    hits = search.search_index(out, query, k=4, rerank=True, rerank_k=4)
    assert len(hits) == 3 and top_path not in [hit.path for hit in hits]


def test_search_of_a_missing_index_says_how_to_build_one(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="cclm index IMAGE_DIR"):
        search.search_index(tmp_path, "query")
    # the command line reports it as one line (a user's error), status 2
    assert cclm_main(["search", str(tmp_path), "query"]) == 2
    assert capsys.readouterr().err == (
        f"cclm search: {tmp_path} is not a cclm image index (index.json missing); "
        "build one with `cclm index IMAGE_DIR --model MODEL --out INDEX`\n"
    )


def _write_page(tiny_model_dir, image_dir, tmp_path) -> Path:
    out = tmp_path / "index"
    search.build_index(image_dir, tiny_model_dir, out)
    page = tmp_path / "result.html"
    assert cclm_main(["search", str(out), "a <red> square", "-k", "4", "--html", str(page)]) == 0
    return page


def test_html_page_is_self_contained(tiny_model_dir, image_dir, tmp_path):
    text = _write_page(tiny_model_dir, image_dir, tmp_path).read_text()
    sources = re.findall(r'<img src="([^"]+)"', text)
    assert len(sources) == 4 and all(s.startswith("data:image/jpeg;base64,") for s in sources)
    assert "a &lt;red&gt; square" in text and "<red>" not in text
    assert len(re.findall(r"cosine -?\d\.\d{3}", text)) == 4


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium binary: tools/install_chromium.sh (run by `make test`) could not install it and said why",
)
def test_html_page_renders_the_thumbnails_in_headless_chromium(tiny_model_dir, image_dir, tmp_path):
    page = _write_page(tiny_model_dir, image_dir, tmp_path)
    shot = tmp_path / "shot.png"
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1000,700",
        page.as_uri(),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.exists(), f"chromium wrote no screenshot: {result.stderr[-2000:]}"
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    # Each solid-colour image must appear as a thumbnail-sized block of its colour (192x160 at this page's
    # scale; at least half of that counts), and the page background must not be mistaken for one.
    thumb_area = 192 * 160
    for name, colour in SOLID.items():
        close = (np.abs(pixels - np.array(colour)).max(axis=2) < 40).sum()
        assert close > 0.5 * thumb_area, f"thumbnail of {name} not visible: {close} pixels of its colour"


def test_index_and_search_at_another_image_size(tiny_model_dir, image_dir, tmp_path, capsys):
    """``--image-size 48`` runs the 32 px model's tower at 48 px (position grid resized): the index holds what
    ``cclm.load(..., image_size=48)`` computes, records the size, and re-ranking decodes at it too."""
    out = tmp_path / "index48"
    argv = ["index", str(image_dir), "--model", str(tiny_model_dir), "--out", str(out), "--num-workers", "0"]
    assert cclm_main([*argv, "--image-size", "48"]) == 0
    index = search.ImageIndex.read(out)
    assert index.image_size == 48
    at_48 = cclm.load(tiny_model_dir, device="cpu", image_size=48)
    assert at_48.image_size == 48
    torch.testing.assert_close(
        index.embeddings(out), at_48.encode_images([image_dir / p for p in index.paths]), atol=1e-5, rtol=1e-5
    )
    at_32 = cclm.load(tiny_model_dir, device="cpu").encode_images([image_dir / p for p in index.paths])
    assert not torch.allclose(index.embeddings(out), at_32, atol=1e-3)
    with pytest.raises(ValueError, match="was built with --image-size 48, not 0"):
        search.build_index(image_dir, tiny_model_dir, out)

    hits = search.search_index(out, "a red circle", k=2, rerank=True, rerank_k=4)
    assert at_48.match([hits[0].path], ["a red circle"])[0].item() == pytest.approx(hits[0].match, abs=1e-4)
    capsys.readouterr()
    assert cclm_main(["search", str(out), "a red circle", "-k", "2", "--image-size", "-1"]) == 2
    assert "--image-size must be positive" in capsys.readouterr().err


def test_search_names_the_parts_of_a_query_the_tokenizer_does_not_know(
    tiny_model_dir, image_dir, tmp_path, caplog
):
    out = tmp_path / "index"
    search.build_index(image_dir, tiny_model_dir, out)
    engine = cclm.load(tiny_model_dir, device="cpu")
    assert search.unknown_pieces(engine, "a red circle above a blue square") == []
    unknown = search.unknown_pieces(engine, "a red circle @ ÷")
    assert unknown and all(piece in "@ ÷" for piece in unknown)
    ids = engine.tokenize(["a red circle @ ÷"])[0][0].tolist()
    assert ids.count(engine.tokenizer.unk_token_id) >= len(unknown)
    with caplog.at_level("WARNING", logger="cclm.inference"):
        search.search_index(out, "a red circle @ ÷", k=1)
    assert "does not know" in caplog.text and repr(unknown[0]) in caplog.text
    assert "lower case" not in caplog.text  # lower-casing would not help this query
    caplog.clear()
    with caplog.at_level("WARNING", logger="cclm.inference"):  # the tokenizer saw no capital A, R, E, C, L
        search.search_index(out, "A RED CIRCLE", k=1)
    assert "'A'" in caplog.text and "try the query in lower case" in caplog.text


@pytest.mark.parametrize(
    "options, message",
    [
        (["-k", "-2"], "-k must be at least 1, got -2"),
        (["-k", "0"], "-k must be at least 1, got 0"),
        (["--rerank-k", "8"], "--rerank-k sets how many candidates --rerank re-scores"),
        (["-k", "5", "--rerank", "--rerank-k", "3"], "--rerank-k 3 is smaller than -k 5"),
    ],
)
def test_search_numbers_that_would_be_ignored_or_fail_are_refused(tmp_path, capsys, options, message):
    """Checked before the index is even opened (it does not exist here)."""
    with pytest.raises(SystemExit) as status:
        cclm_main(["search", str(tmp_path / "no-index"), "a red circle", *options])
    assert status.value.code == 2
    assert message in capsys.readouterr().err


def test_search_index_refuses_k_below_one(tmp_path):
    with pytest.raises(ValueError, match="k must be at least 1, got 0"):
        search.search_index(tmp_path / "no-index", "a red circle", k=0)
