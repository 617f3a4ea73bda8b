"""``cclm index`` / ``cclm search`` under faults a tester found: an index is tied to its model's weights (not to a
path typed relative to some directory), linked folders and broken links under the image folder are indexed or
listed, a damaged index stops with one line naming the file (a resumed index never reports success over a damaged
shard), re-ranking skips an indexed image that no longer decodes, and k values that would give a silently wrong
result or a raw error are refused."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import cclm
from cclm.cli import main as cclm_main
from cclm.config import ConfigError
from cclm.evaluation.retrieval import Embeddings, two_stage_ranks
from cclm.inference import search
from cclm.model import CrossViewModel

pytestmark = pytest.mark.usefixtures("one_thread")
QUERY = "a red circle"


def one_error_line(capsys, command: str) -> str:
    """The single ``cclm COMMAND: message`` line of a refused command (no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"cclm {command}: ")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def write_image(path: Path, colour) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 32), colour).save(path)


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    for name, colour in (
        ("red.png", (230, 20, 20)),
        ("green.png", (20, 200, 40)),
        ("blue.png", (20, 40, 230)),
    ):
        write_image(folder / name, colour)
    return folder


def index_argv(photos: Path, model, out: Path) -> list[str]:
    return ["index", str(photos), "--model", str(model), "--out", str(out), "--num-workers", "0"]


def other_weights(model_dir: Path, out: Path) -> Path:
    """A model of the same architecture (and tokenizer) with other weights."""
    shutil.copytree(model_dir, out)
    model = CrossViewModel.from_pretrained(model_dir)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05)
    model.save_pretrained(out)
    return out


def searched(capsys, *argv) -> list[str]:
    """The result rows ``cclm search ARGV`` prints."""
    capsys.readouterr()
    assert cclm_main(["search", *map(str, argv)]) == 0, capsys.readouterr().err
    return capsys.readouterr().out.strip().splitlines()[1:]


# ------------------------------------------------------------------------------------ 1. the index's model
def test_an_index_records_its_model_by_absolute_path_and_weights(
    tiny_model_dir, photos, tmp_path, monkeypatch, capsys
):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    shutil.copytree(tiny_model_dir, work / "model")
    other_weights(tiny_model_dir, elsewhere / "model")  # another model under the same relative name
    monkeypatch.chdir(work)
    assert cclm_main(index_argv(photos, "model", work / "index")) == 0
    recorded = json.loads((work / "index" / "index.json").read_text())
    assert recorded["model"] == str(work / "model") and len(recorded["model_sha256"]) == 64
    here = searched(capsys, work / "index", QUERY, "-k", "3")

    monkeypatch.chdir(elsewhere)  # "model" here is the other model: the index's own is still used
    assert searched(capsys, work / "index", QUERY, "-k", "3") == here
    # the same weights given another way resume the index
    assert cclm_main(index_argv(photos, work / "model", work / "index")) == 0
    capsys.readouterr()
    # other weights are refused, naming both, for searching and for resuming
    assert cclm_main(["search", str(work / "index"), QUERY, "--model", "model"]) == 2
    line = one_error_line(capsys, "search")
    assert str(work / "model") in line and str(elsewhere / "model") in line and "sha256" in line
    assert cclm_main(index_argv(photos, "model", work / "index")) == 2
    line = one_error_line(capsys, "index")
    assert str(work / "model") in line and str(elsewhere / "model") in line


def test_search_with_another_copy_of_the_same_weights_is_allowed(tiny_model_dir, photos, tmp_path, capsys):
    assert cclm_main(index_argv(photos, tiny_model_dir, tmp_path / "index")) == 0
    capsys.readouterr()
    here = searched(capsys, tmp_path / "index", QUERY, "-k", "2")
    copy = shutil.copytree(tiny_model_dir, tmp_path / "moved")
    shutil.rmtree(tiny_model_dir)  # moved away: --model names where it is now
    assert searched(capsys, tmp_path / "index", QUERY, "-k", "2", "--model", copy) == here


def test_an_index_written_before_the_digest_loads_with_the_path_check_only(
    tiny_model_dir, photos, tmp_path, caplog, capsys
):
    out = tmp_path / "index"
    assert cclm_main(index_argv(photos, tiny_model_dir, out)) == 0
    data = json.loads((out / "index.json").read_text())
    del data["model_sha256"]
    (out / "index.json").write_text(json.dumps(data))
    capsys.readouterr()
    assert len(searched(capsys, out, QUERY, "-k", "2")) == 2
    other = other_weights(tiny_model_dir, tmp_path / "other")
    with caplog.at_level(logging.WARNING, logger="cclm.inference"):
        assert len(searched(capsys, out, QUERY, "-k", "2", "--model", other)) == 2
    assert "records no digest" in caplog.text
    assert cclm_main(index_argv(photos, other, out)) == 2  # resuming: another path is refused
    assert "was built with model" in one_error_line(capsys, "index")


# ------------------------------------------------------------------------------------ 5. links in the folder
def test_linked_folders_are_indexed_and_broken_links_listed(tiny_model_dir, photos, tmp_path, capsys):
    external = tmp_path / "external" / "2023"
    write_image(external / "yellow.png", (240, 220, 20))
    (photos / "2023").symlink_to(external, target_is_directory=True)
    (photos / "again").symlink_to(photos, target_is_directory=True)  # a loop back to the top
    (photos / "dangling.png").symlink_to(photos / "nowhere.png")
    (photos / "loop.png").symlink_to(photos / "loop.png")
    (photos / "a-favourite.png").symlink_to(photos / "blue.png")  # one photo, two paths: listed once
    out = tmp_path / "index"
    assert cclm_main(index_argv(photos, tiny_model_dir, out)) == 0
    err = capsys.readouterr().err
    index = search.ImageIndex.read(out)
    assert sorted(index.paths) == ["2023/yellow.png", "blue.png", "green.png", "red.png"]
    assert sorted(index.skipped) == ["a-favourite.png", "again", "dangling.png", "loop.png"]
    assert "skipped 4 unreadable files" in err and "dangling.png: broken link" in err
    assert "loop.png: broken link" in err and "a link to a file already listed (blue.png)" in err


def test_an_index_holding_a_photo_under_two_paths_shows_it_once(
    tiny_model_dir, photos, tmp_path, capsys, monkeypatch
):
    """An index built before links to one photo were listed once (or resumed since) holds both paths."""
    (photos / "a-favourite.png").symlink_to(photos / "blue.png")
    monkeypatch.setattr(search, "_one_path_per_file", lambda files, image_dir, skipped: files)
    out = tmp_path / "index"
    assert cclm_main(index_argv(photos, tiny_model_dir, out)) == 0
    assert "a-favourite.png" in search.ImageIndex.read(out).paths
    for extra in ([], ["--rerank", "--rerank-k", "4"]):
        shown = [row.split()[-1] for row in searched(capsys, out, QUERY, "-k", "4", *extra)]
        assert len(shown) == 3 and len({Path(p).resolve() for p in shown}) == 3, shown


# ------------------------------------------------------------------------------------ 6. a damaged index
def _cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _edit_index(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


DAMAGE = {
    "index.json without paths": ("index.json", lambda p: _edit_index(p, lambda d: d.pop("paths"))),
    "index.json holding []": ("index.json", lambda p: p.write_text("[]")),
    "index.json cut short": ("index.json", _cut),
    "index.json empty": ("index.json", lambda p: p.write_text("")),
    "index.json with a number for a path": (
        "index.json",
        lambda p: _edit_index(p, lambda d: d["paths"].append(5)),
    ),
    "shard cut short": ("embeddings-00000.safetensors", lambda p: _cut(p, 0.9)),
    "shard missing": ("embeddings-00000.safetensors", Path.unlink),
}


@pytest.fixture
def built_index(tiny_model_dir, photos, tmp_path, capsys) -> Path:
    out = tmp_path / "index"
    assert cclm_main(index_argv(photos, tiny_model_dir, out)) == 0
    capsys.readouterr()
    return out


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_index_is_one_line_naming_the_file(built_index, tiny_model_dir, photos, capsys, damage):
    name, spoil = DAMAGE[damage]
    spoil(built_index / name)
    assert cclm_main(["search", str(built_index), QUERY]) == 2
    assert str(built_index / name) in one_error_line(capsys, "search")
    # resuming never reports success over it
    assert cclm_main(index_argv(photos, tiny_model_dir, built_index)) == 2
    assert str(built_index / name) in one_error_line(capsys, "index")


def test_an_index_inside_its_image_folder_does_not_list_itself(tiny_model_dir, photos, capsys):
    """Before, the second run over photos/ reported the index's own index.json and shards as unreadable files."""
    out = photos / ".index"
    for _ in range(2):
        assert cclm_main(index_argv(photos, tiny_model_dir, out)) == 0
    index = search.ImageIndex.read(out)
    assert sorted(index.paths) == ["blue.png", "green.png", "red.png"] and index.skipped == {}


def test_rerank_skips_indexed_images_that_no_longer_decode(built_index, photos, caplog):
    (photos / "red.png").write_bytes(b"not an image")
    (photos / "blue.png").unlink()
    with caplog.at_level(logging.WARNING, logger="cclm.inference"):
        hits = search.search_index(built_index, QUERY, k=3, rerank=True, device="cpu")
    assert [hit.path.name for hit in hits] == ["green.png"]
    assert "2 indexed images" in caplog.text and "red.png" in caplog.text and "blue.png" in caplog.text


# ------------------------------------------------------------------------------------ 7. k
def test_retrieve_refuses_a_negative_k(tiny_model_dir, photos):
    model = cclm.load(tiny_model_dir, device="cpu")
    images = sorted(photos.iterdir())
    with pytest.raises(ValueError, match="k must be 0 or more, got -1"):
        model.retrieve([QUERY], images, k=-1)
    with pytest.raises(ValueError, match="k must be 0 or more, got -2"):
        model.retrieve([QUERY], images, k=-2, rerank=True)
    assert model.retrieve([QUERY], images, k=0).indices.shape == (1, 0)


@pytest.mark.parametrize(
    ("k", "rerank", "message"),
    [
        (0, True, "eval.k_test must be at least 1 when re-ranking"),
        (-1, True, "eval.k_test must be at least 1 when re-ranking"),
        (-1, False, "eval.k_test must be 0 or more, got -1"),
    ],
)
def test_k_test_that_would_skip_re_ranking_or_fail_is_refused(k, rerank, message):
    feats = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    emb = Embeddings(feats, feats.clone())
    with pytest.raises(ConfigError, match=message):
        two_stage_ranks(None, emb, [0, 1, 2], [[0], [1], [2]], k, do_rerank=rerank)


# -------------------------------------------------------------------------------------- 7. photos stored sideways
def test_a_photo_stored_sideways_is_indexed_upright(tiny_model_dir, tmp_path):
    """Before, the index embedded the stored (sideways) pixels, while the training converters turn such photos
    upright: a phone's portrait photo was searched lying on its side."""
    upright = Image.new("RGB", (24, 48), (230, 20, 20))
    upright.paste((20, 40, 230), (0, 0, 24, 12))  # blue on top: a turned image differs
    folder = tmp_path / "photos"
    folder.mkdir()
    upright.save(folder / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to view": the camera stored it turned the other way
    upright.transpose(Image.Transpose.ROTATE_90).save(folder / "sideways.png", exif=exif)
    report = search.build_index(folder, tiny_model_dir, tmp_path / "index", progress=False)
    assert report.skipped == {}
    index = search.ImageIndex.read(tmp_path / "index")
    features = dict(zip(index.paths, index.embeddings(tmp_path / "index")))
    torch.testing.assert_close(features["sideways.png"], features["upright.png"])
    # the thumbnail of the results page is upright too
    assert search.thumbnail_data_uri(folder / "sideways.png") == search.thumbnail_data_uri(
        folder / "upright.png"
    )
