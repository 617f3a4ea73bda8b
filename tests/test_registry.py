"""The pretrained registry: ``cclm.load(NAME)`` downloads a released checkpoint from its URL (here a local HTTP
server on 127.0.0.1 serving a reference-layout fixture), checks its sha256, converts it once with
convert-reference and loads the cached folder afterwards; partial downloads never look complete and resume;
checkpoints published where a program cannot download them are asked for by hand."""

from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

import cclm
from cclm.inference import convert_reference as cr
from cclm.inference import registry
from cclm.inference.download import ChecksumMismatch, DownloadError, download, part_path
from cclm.inference.registry import ImportSettings, ManualDownloadRequired, Pretrained, PretrainedError
from tests.test_convert_reference import TEXT, TINY_SWIN, reference_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
TEXTS = ["a red circle above a blue square", "ein roter Kreis über einem blauen Quadrat"]


class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the fixture folder; the server's ``ranges`` honours Range requests (206), ``range_cap`` answers
    one with at most that many bytes (as a CDN capping ranges does), ``wrong_start`` from another byte than asked,
    ``cut_after`` sends only that many bytes of
    a body and hangs up; every request's path and Range header is logged."""

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start, end = 0, len(data)
        wanted = self.headers.get("Range")
        if wanted and server.ranges:
            start = server.wrong_start or int(wanted.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_error(416)
                return
            end = min(end, start + (server.range_cap or end))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:end]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body if server.cut_after is None else body[: server.cut_after])


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: Handler(*a, directory=str(root)))
    httpd.requests, httpd.ranges, httpd.range_cap, httpd.cut_after, httpd.root = [], True, None, None, root
    httpd.wrong_start = None  # answer a range request from this byte instead
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def settings(tmp_path, tiny_tokenizer) -> ImportSettings:
    """convert-reference settings for the tiny fixture: its template config and a local tokenizer."""
    template = tmp_path / "tiny_swin.yaml"
    template.write_text(
        f"vision:\n  tower: {{timm_model_name: {TINY_SWIN}, image_size: 32}}\n  image_size: 32\n"
        f"text:\n  encoder: {{num_attention_heads: {TEXT['heads']}}}\n  max_length: 32\n"
    )
    tokenizer = tmp_path / "tokenizer"
    tiny_tokenizer.save_pretrained(str(tokenizer))
    return ImportSettings(config=str(template), tokenizer=str(tokenizer))


@pytest.fixture
def released(server, tiny_tokenizer) -> Path:
    """A CCLM pretraining checkpoint in the reference layout, as the server publishes it."""
    path = server.root / "cclm_tiny_epoch_29.th"
    torch.save({"model": reference_checkpoint(len(tiny_tokenizer)), "epoch": 29}, path)
    return path


@pytest.fixture
def entry(server, released, settings):
    made = registry.register_pretrained(
        Pretrained(
            name="cclm-test-tiny",
            description="tiny reference-layout fixture",
            url=f"{server.url}/{released.name}",
            filename="cclm-test-tiny.th",
            settings=settings,
        )
    )
    yield made
    registry.unregister_pretrained(made.name)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------ the registry
def test_the_released_checkpoints_are_listed_with_their_urls_and_import_settings():
    names = cclm.list_pretrained()
    assert names[:4] == ["cclm-3m-base", "cclm-4m-base", "cclm-x2vlm-base", "cclm-x2vlm-large"]
    info = cclm.pretrained_info("cclm-4m-base")
    # the Google Drive file id of the reference README's "CCLM (4M, 30 epochs)" link
    assert "1fZxxJMq_f3NpxM7qDDAHGULVwolN0Lbi" in info["url"]
    assert "1sR-yyWnSFeyfSNo9K5O9VL-e_VOCHnk5" in cclm.pretrained_info("cclm-3m-base")["url"]
    assert info["settings"]["normalize"] == "pre_caption" and info["settings"]["max_words"] == 40
    assert (
        info["settings"]["position_ids"] == "reference"
        and info["settings"]["tokenizer"] == "xlm-roberta-large"
    )
    assert info["convert_command"] == "cclm convert-reference cclm-4m-base.th models/cclm-4m-base"
    for name in names:
        described = cclm.pretrained_info(name)
        # every entry either downloads, or says why it must be downloaded by hand or cannot be imported
        assert described["downloadable"] or described["manual_download"] or described["unsupported"]
    assert ImportSettings(allow_missing_mlm_head=True, image_size=384, tokenizer=None).command(
        "a.th", "out"
    ) == ("cclm convert-reference a.th out --tokenizer none --image-size 384 --allow-missing-mlm-head")


def test_load_downloads_checks_converts_once_and_then_loads_from_the_cache(
    entry, server, released, settings, tmp_path, monkeypatch, caplog
):
    cache = tmp_path / "cache"
    monkeypatch.setenv("CCLM_CACHE", str(cache))
    with caplog.at_level("WARNING", logger="cclm.inference"):
        model = cclm.load("cclm-test-tiny", device="cpu")
    assert len(server.requests) == 1
    # the publisher gives no digest: the first download's is recorded (sha256sum format) and said so
    record = cache / "checkpoints" / "cclm-test-tiny.th.sha256"
    assert record.read_text().split() == [_sha256(released), "cclm-test-tiny.th"]
    assert "recorded" in caplog.text and "publisher gives no sha256" in caplog.text
    assert (cache / "checkpoints" / "cclm-test-tiny.th").read_bytes() == released.read_bytes()
    assert not part_path(cache / "checkpoints" / "cclm-test-tiny.th").exists()

    # the cached folder is what convert-reference makes of the file with the entry's settings
    cr.convert(released, tmp_path / "by-hand", config=settings.config, tokenizer=settings.tokenizer)
    by_hand = cclm.load(tmp_path / "by-hand", device="cpu")
    torch.testing.assert_close(model.encode_texts(TEXTS), by_hand.encode_texts(TEXTS), rtol=0, atol=0)
    assert model.model.cfg.text.normalize == "pre_caption" and model.model.cfg.text.max_words == 40

    # afterwards: no download, no conversion, not even the checkpoint file is needed
    (cache / "checkpoints" / "cclm-test-tiny.th").unlink()

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(cr, "convert", no_conversion)
    again = cclm.load("cclm-test-tiny", device="cpu")
    assert len(server.requests) == 1
    torch.testing.assert_close(again.encode_texts(TEXTS), model.encode_texts(TEXTS), rtol=0, atol=0)


def test_other_settings_convert_again_from_the_verified_file(entry, server, tmp_path):
    cache = tmp_path / "cache"
    first = registry.pretrained_folder("cclm-test-tiny", cache_dir=cache)
    assert cclm.load(first, device="cpu").model.cfg.text.max_words == 40
    registry.register_pretrained(
        Pretrained(
            **{**entry.__dict__, "settings": ImportSettings(**{**entry.settings.__dict__, "max_words": 0})}
        ),
        overwrite=True,
    )
    again = registry.pretrained_folder("cclm-test-tiny", cache_dir=cache)
    assert again == first and cclm.load(again, device="cpu").model.cfg.text.max_words == 0
    assert len(server.requests) == 1  # the cached checkpoint was re-verified, not downloaded again


@pytest.mark.parametrize("changed", ["converter", "template"])
def test_a_folder_converted_by_another_converter_is_converted_again_from_the_cached_file(
    entry, server, tmp_path, changed
):
    cache = tmp_path / "cache"
    folder = registry.pretrained_folder("cclm-test-tiny", cache_dir=cache)
    marker = json.loads((folder / registry.MARKER).read_text())
    assert marker["converter"] == registry.converter_version()
    if changed == "converter":
        del marker["converter"]  # as an older cclm wrote it: its conversion may lack what ours keeps
        (folder / registry.MARKER).write_text(json.dumps(marker))
    else:  # the entry's template config edited under the same path
        template = Path(entry.settings.config)
        template.write_text(template.read_text() + "# edited\n")
    (folder / "left-by-the-old-conversion").write_text("")
    assert registry.pretrained_folder("cclm-test-tiny", cache_dir=cache) == folder
    assert not (folder / "left-by-the-old-conversion").exists()
    assert json.loads((folder / registry.MARKER).read_text())["converter"] == registry.converter_version()
    assert len(server.requests) == 1  # converted again from the cached, verified checkpoint


@pytest.mark.parametrize("cached_by", ["this cclm", "an older cclm"])
def test_an_entry_moved_to_another_url_downloads_and_converts_that_urls_file(
    entry, server, released, tmp_path, tiny_tokenizer, cached_by
):
    cache = tmp_path / "cache"
    first = registry.pretrained_folder("cclm-test-tiny", cache_dir=cache)
    v1 = cclm.load(first, device="cpu").encode_texts(TEXTS)
    if cached_by == "an older cclm":  # no .url record: the converted folder's marker names the URL
        (cache / "checkpoints" / "cclm-test-tiny.th.url").unlink()
    moved = server.root / "v2.th"
    torch.manual_seed(1)
    torch.save({"model": reference_checkpoint(len(tiny_tokenizer))}, moved)  # other weights, same file name
    server.cut_after = moved.stat().st_size // 2
    registry.register_pretrained(
        Pretrained(**{**entry.__dict__, "url": f"{server.url}/v2.th"}), overwrite=True
    )
    with pytest.raises(
        DownloadError
    ):  # the old file is not taken for the new URL's, even when its part is cut
        registry.pretrained_folder("cclm-test-tiny", cache_dir=cache)
    server.cut_after = None
    again = registry.pretrained_folder("cclm-test-tiny", cache_dir=cache)
    assert [path for path, _ in server.requests] == [f"/{released.name}", "/v2.th", "/v2.th"]
    assert server.requests[-1][1] is not None  # the new URL's part was resumed
    cached = cache / "checkpoints" / "cclm-test-tiny.th"
    assert cached.read_bytes() == moved.read_bytes()
    assert (cache / "checkpoints" / "cclm-test-tiny.th.sha256").read_text().split()[0] == _sha256(moved)
    v2 = cclm.load(again, device="cpu").encode_texts(TEXTS)
    assert not torch.allclose(v1, v2)
    cr.convert(moved, tmp_path / "by-hand", config=entry.settings.config, tokenizer=entry.settings.tokenizer)
    torch.testing.assert_close(v2, cclm.load(tmp_path / "by-hand", device="cpu").encode_texts(TEXTS))


def test_a_file_given_for_a_moved_entry_is_its_reference_from_then_on(entry, server, released, tmp_path):
    cache = tmp_path / "cache"
    registry.pretrained_folder("cclm-test-tiny", cache_dir=cache)
    registry.register_pretrained(
        Pretrained(**{**entry.__dict__, "url": f"{server.url}/v2.th"}), overwrite=True
    )
    given = tmp_path / "v2-by-hand.th"
    shutil.copy(released, given)
    registry.pretrained_folder(
        "cclm-test-tiny", cache_dir=cache, checkpoint=given
    )  # recorded for the new URL
    damaged = tmp_path / "damaged.th"
    damaged.write_bytes(released.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ChecksumMismatch, match="differs from the one recorded"):
        registry.pretrained_folder("cclm-test-tiny", cache_dir=cache, checkpoint=damaged)


def test_a_file_that_changed_on_the_server_is_refused_against_the_recorded_digest(
    entry, server, released, tmp_path, tiny_tokenizer
):
    cache = tmp_path / "cache"
    registry.pretrained_folder("cclm-test-tiny", cache_dir=cache)
    cached = cache / "checkpoints" / "cclm-test-tiny.th"
    original = cached.read_bytes()
    cached.write_bytes(original[:-10] + b"0123456789")  # damaged on disk
    with pytest.raises(ChecksumMismatch, match="differs from the one recorded"):
        registry.pretrained_folder("cclm-test-tiny", cache_dir=cache, checkpoint=cached)
    cached.unlink()
    shutil.rmtree(cache / "models")
    torch.save({"model": reference_checkpoint(len(tiny_tokenizer))}, released)  # other weights, same URL
    with pytest.raises(ChecksumMismatch, match="expected"):
        registry.pretrained_folder("cclm-test-tiny", cache_dir=cache)
    assert (
        not cached.exists() and not part_path(cached).exists()
    )  # nothing that looks complete, nothing to resume


def test_a_published_digest_is_checked_before_the_file_is_put_in_place(server, released, tmp_path):
    dest = tmp_path / "dl" / "ckpt.th"
    url = f"{server.url}/{released.name}"
    with pytest.raises(ChecksumMismatch):
        download(url, dest, sha256="0" * 64, progress=False)
    assert not dest.exists() and not part_path(dest).exists()
    assert download(url, dest, sha256=_sha256(released), progress=False) == _sha256(released)
    assert dest.read_bytes() == released.read_bytes()


@pytest.mark.parametrize("server_ranges", [True, False], ids=["resumed", "restarted"])
def test_an_interrupted_download_leaves_only_a_part_file_and_completes_on_the_next_call(
    server, released, tmp_path, server_ranges
):
    dest = tmp_path / "dl" / "ckpt.th"
    url = f"{server.url}/{released.name}"
    size = released.stat().st_size
    server.cut_after = size // 3
    with pytest.raises(
        DownloadError, match=f"stopped after {size // 3} of {size} bytes; run again to resume"
    ):
        download(url, dest, progress=False)
    assert not dest.exists() and part_path(dest).stat().st_size == size // 3
    server.cut_after, server.ranges = None, server_ranges
    assert download(url, dest, progress=False) == _sha256(released)
    assert dest.read_bytes() == released.read_bytes() and not part_path(dest).exists()
    assert server.requests[-1][1] == f"bytes={size // 3}-"  # asked to resume either way


def interrupted_download(server, released: Path, tmp_path: Path) -> tuple[Path, str, int]:
    """(dest, url, size) of a download of ``released`` the server cut after a third: its .part is left."""
    dest = tmp_path / "dl" / "ckpt.th"
    url = f"{server.url}/{released.name}"
    size = released.stat().st_size
    server.cut_after = size // 3
    with pytest.raises(DownloadError):
        download(url, dest, progress=False)
    server.cut_after = None
    return dest, url, size


def test_a_range_answer_that_stops_short_of_the_file_is_resumed_until_the_file_is_whole(
    server, released, tmp_path
):
    dest, url, size = interrupted_download(server, released, tmp_path)
    server.range_cap = size // 3  # each range answer covers a third of the file
    with pytest.raises(DownloadError, match=f"stopped after {2 * (size // 3)} of {size} bytes; run again"):
        download(url, dest, progress=False)
    assert not dest.exists() and part_path(dest).stat().st_size == 2 * (size // 3)
    server.range_cap = None
    assert download(url, dest, progress=False) == _sha256(released)
    assert dest.read_bytes() == released.read_bytes()


def test_a_range_answer_for_another_part_of_the_file_starts_the_download_over(server, released, tmp_path):
    dest, url, size = interrupted_download(server, released, tmp_path)
    server.wrong_start = size // 2  # 206, but from the middle: not the bytes asked for
    assert download(url, dest, progress=False) == _sha256(released)
    assert dest.read_bytes() == released.read_bytes()
    plain_request_after = [f"bytes={size // 3}-", None]
    assert [wanted for _, wanted in server.requests[-2:]] == plain_request_after


def test_an_unreachable_url_fails_with_a_clear_message(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(f"{server.url}/missing.th", tmp_path / "x.th", progress=False)


# ------------------------------------------------------------------------------------------------ by hand
def test_google_drive_checkpoints_are_asked_for_by_hand_and_then_taken_from_the_given_file(
    server, released, settings, tmp_path, monkeypatch
):
    with pytest.raises(ManualDownloadRequired) as err:
        cclm.load("cclm-4m-base", cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert "drive.google.com" in message and "checkpoint=" in message and "cannot download it" in message
    assert not (tmp_path / "cache" / "checkpoints" / "cclm-4m-base.th").exists()

    manual = registry.register_pretrained(
        Pretrained(
            name="cclm-test-manual",
            description="a fixture published where only a browser gets it",
            url="https://drive.google.com/file/d/XYZ/view",
            filename="cclm-test-manual.th",
            manual_download=registry.GOOGLE_DRIVE,
            settings=settings,
        )
    )
    try:
        cache = tmp_path / "cache"
        with pytest.raises(ManualDownloadRequired, match="cclm-test-manual.th"):
            cclm.load("cclm-test-manual", cache_dir=cache)
        model = cclm.load("cclm-test-manual", checkpoint=released, cache_dir=cache, device="cpu")
        assert model.model.cfg.text.normalize == "pre_caption"
        assert (cache / "checkpoints" / "cclm-test-manual.th.sha256").read_text().split()[0] == _sha256(
            released
        )
        assert not (cache / "checkpoints" / "cclm-test-manual.th").exists()  # the user's file is not copied
        # cached from now on; the same file passed again (as every rank of a job may) is not even hashed again
        monkeypatch.setattr(registry, "sha256_of", lambda path: pytest.fail("hashed again"))
        assert cclm.load("cclm-test-manual", cache_dir=cache, device="cpu") is not None
        assert cclm.load("cclm-test-manual", checkpoint=released, cache_dir=cache, device="cpu") is not None
        monkeypatch.undo()
        # or the file put where the message says
        other = tmp_path / "other-cache"
        (other / "checkpoints").mkdir(parents=True)
        shutil.copy(released, other / "checkpoints" / "cclm-test-manual.th")
        assert cclm.load("cclm-test-manual", cache_dir=other, device="cpu").model.cfg.text.max_words == 40
        assert server.requests == []
    finally:
        registry.unregister_pretrained(manual.name)


def test_x2vlm_releases_and_unknown_names_are_refused_by_name(tmp_path):
    with pytest.raises(PretrainedError, match="BEiT"):
        cclm.load("cclm-x2vlm-base", cache_dir=tmp_path)
    assert not (tmp_path / "checkpoints").exists()  # refused before downloading anything
    with pytest.raises(FileNotFoundError, match="cclm-4m-base"):
        cclm.load("cclm-9m-huge", cache_dir=tmp_path)
    with pytest.raises(PretrainedError, match="needs a registered pretrained name"):
        cclm.load(tmp_path, checkpoint=tmp_path / "x.th")


def test_a_checkpoint_that_does_not_convert_leaves_no_model_folder(server, settings, tmp_path):
    torch.save({"model": {"encoder.weight": torch.zeros(2, 2)}}, server.root / "other.th")
    entry = registry.register_pretrained(
        Pretrained(
            name="cclm-test-other",
            description="not a CCLM checkpoint",
            url=f"{server.url}/other.th",
            filename="other.th",
            settings=settings,
        )
    )
    try:
        with pytest.raises(PretrainedError, match="cclm-test-other: cannot convert .*other.th"):
            cclm.load(entry.name, cache_dir=tmp_path / "cache")
        assert list((tmp_path / "cache" / "models").iterdir()) == []  # no folder, no half-written temporary
    finally:
        registry.unregister_pretrained(entry.name)
