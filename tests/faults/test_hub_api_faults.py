"""Publishing, downloading and the Python API under a tester's faults (no network anywhere: the Hub is
unreachable through ``HF_HUB_OFFLINE`` or a closed local port, downloads come from local socket servers).

- a push that cannot reach the Hub is one ``HubError`` naming the folder, the repository and how to push again;
  ``cclm export --push-only`` pushes the complete folder later; a repository name the Hub would refuse is
  refused before anything is exported;
- a ``batch_size`` below 1 is refused by every public entry point of ``cclm.load``'s model;
- a download without a length is put in place only when proven whole, a chunked download cut short is a
  ``DownloadError`` and what arrived is kept for the resume;
- a card pulled from the Hub and pushed again names only the new repository;
- a cclm snapshot without its weights says the download is incomplete and how to fetch it again;
- ``cclm clip-benchmark --output results/{...}.json`` creates ``results``.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import HfApi, constants
from PIL import Image

import cclm
from cclm.inference import registry
from cclm.inference.api import CCLM
from cclm.inference.download import DownloadError, download, part_path
from cclm.inference.hub import HubError, push_to_hub
from cclm.inference.registry import Pretrained
from cclm.train.export import main as export_main
from cclm.train.publish import hub_card
from tests.faults.test_export_faults import make_checkpoint, one_error_line
from tests.test_hub import COMMIT, put_in_hub_cache

pytestmark = pytest.mark.usefixtures("one_thread")
REPO_ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------- the Hub
@pytest.fixture
def hub(monkeypatch):
    """HfApi.create_repo / create_commit replaced by recorders: {repo: {path: bytes}}."""
    state = SimpleNamespace(repos={}, calls=0)

    def create_repo(self, repo_id, **kwargs):
        state.calls += 1

    def create_commit(self, repo_id, operations, **kwargs):
        files = {}
        for op in operations:
            with op.as_file() as handle:
                files[op.path_in_repo] = handle.read()
        state.repos[repo_id] = files
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{COMMIT}")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return state


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed when the socket is: a connection there is refused


@pytest.fixture(params=["offline", "unreachable"])
def no_hub(request, monkeypatch):
    """The real Hub client, unable to reach the Hub: HF_HUB_OFFLINE=1, or the endpoint a closed local port."""
    offline = request.param == "offline"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    if not offline:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    return request.param


def test_a_push_that_cannot_reach_the_hub_is_one_hub_error_saying_how_to_push_again(tiny_model_dir, no_hub):
    before = {p.name: p.read_bytes() for p in tiny_model_dir.iterdir()}
    with pytest.raises(HubError) as err:
        push_to_hub(tiny_model_dir, "cclm-org/tiny", token="hf_not_a_real_token")
    message = str(err.value)
    assert len(message.splitlines()) == 1
    assert f"cannot push {tiny_model_dir} to cclm-org/tiny" in message
    assert ("HF_HUB_OFFLINE is set" if no_hub == "offline" else "the Hub cannot be reached") in message
    assert f"cclm export --push-only {tiny_model_dir} --push-to-hub cclm-org/tiny" in message
    assert f"push_to_hub('{tiny_model_dir}', 'cclm-org/tiny')" in message
    assert {p.name: p.read_bytes() for p in tiny_model_dir.iterdir()} == before  # the folder is untouched


def test_export_whose_push_fails_exits_2_in_one_line_and_push_only_pushes_the_folder_later(
    tmp_path, tiny_model_cfg, tiny_tokenizer, capsys, monkeypatch
):
    run = tmp_path / "run"
    make_checkpoint(run, tiny_model_cfg, tokenizer=tiny_tokenizer)
    out = tmp_path / "exported"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert export_main(["export", str(run), str(out), "--push-to-hub", "cclm-org/run"]) == 2
    err = one_error_line(capsys)
    assert "HF_HUB_OFFLINE is set" in err and f"--push-only {out} --push-to-hub cclm-org/run" in err
    assert (out / "model.safetensors").is_file()  # the export itself is complete

    pushed = {}

    def create_commit(self, repo_id, operations, **kwargs):
        pushed.update({op.path_in_repo: op for op in operations})
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{COMMIT}")

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: None)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    argv = ["export", "--push-only", str(out), "--push-to-hub", "cclm-org/run"]
    assert export_main(argv) == 0
    assert "pushed to https://huggingface.co/cclm-org/run" in capsys.readouterr().out
    assert {"model.safetensors", "config.json", "README.md"} <= set(pushed)
    assert not list(tmp_path.glob("exported.old-*"))  # nothing exported again, nothing moved aside


@pytest.mark.parametrize("name", ["my-org/my cclm", "my-org/model.git", "my-org/-model"])
def test_a_repository_name_the_hub_refuses_fails_before_the_export(
    tmp_path, tiny_model_cfg, hub, capsys, name
):
    run = tmp_path / "run"
    make_checkpoint(run, tiny_model_cfg)
    out = tmp_path / "exported"
    assert export_main(["export", str(run), str(out), "--push-to-hub", name]) == 2
    assert "not a valid Hub repository name" in one_error_line(capsys)
    assert not out.exists() and hub.calls == 0


def test_a_card_pulled_from_the_hub_and_pushed_again_names_only_the_new_repository(tiny_model_dir, tmp_path):
    snapshot = tmp_path / "snapshot"
    shutil.copytree(tiny_model_dir, snapshot)
    (snapshot / "README.md").write_text(hub_card(tiny_model_dir, "alice/cclm-tiny"))  # what the Hub holds
    card = hub_card(snapshot, "bob/cclm-mirror")
    loads = [line for line in card.splitlines() if line.startswith("Load it with")]
    assert loads == ['Load it with `cclm.load("hf-hub:bob/cclm-mirror")`.']
    assert card == hub_card(tiny_model_dir, "bob/cclm-mirror")  # the same card as a first push


@pytest.mark.parametrize("revision", [None, COMMIT])
def test_a_cclm_snapshot_without_its_weights_says_the_download_is_incomplete(
    tiny_model_dir, tmp_path, monkeypatch, revision
):
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    files = {
        "config.json": (tiny_model_dir / "config.json").read_bytes()
    }  # `hf download ORG/NAME config.json`
    put_in_hub_cache(cache, "cclm-org/part", files)
    name = "hf-hub:cclm-org/part" + (f"@{revision}" if revision else "")
    with pytest.raises(HubError) as err:
        cclm.load(name)
    message = str(err.value)
    assert "no model.safetensors" in message and "incomplete" in message
    assert "hf download cclm-org/part" + (f" --revision {revision}" if revision else "") in message


# ------------------------------------------------------------------------------------------------- batch_size
@pytest.fixture(scope="module")
def api_model(tiny_tokenizer) -> CCLM:
    from cclm.config import ModelConfig, load_config
    from cclm.model import CrossViewModel

    cfg = load_config(ModelConfig, REPO_ROOT / "configs" / "model" / "tiny.yaml")
    cfg.text.encoder["vocab_size"] = len(tiny_tokenizer)
    return CCLM(
        CrossViewModel(cfg, load_pretrained=False), tiny_tokenizer, torch.device("cpu"), torch.float32
    )


CALLS = {
    "encode_images": lambda m, images, texts, bs: m.encode_images(images, batch_size=bs),
    "encode_texts": lambda m, images, texts, bs: m.encode_texts(texts, batch_size=bs),
    "match": lambda m, images, texts, bs: m.match(images, texts, batch_size=bs),
    "retrieve": lambda m, images, texts, bs: m.retrieve(texts, images, k=1, batch_size=bs),
    "retrieve_rerank": lambda m, images, texts, bs: m.retrieve(
        texts, images, k=1, rerank=True, batch_size=bs
    ),
    "rerank": lambda m, images, texts, bs: m.rerank(
        texts, images, torch.tensor([[0, 1], [1, 0]]), batch_size=bs
    ),
    "ground": lambda m, images, texts, bs: m.ground(images, texts, batch_size=bs),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_a_batch_size_below_one_is_refused_by_every_entry_point(api_model, call):
    images = [Image.new("RGB", (40, 30), colour) for colour in ("red", "blue")]
    texts = ["a red image", "a blue image"]
    for bad in (-1, 0):
        with pytest.raises(ValueError, match=f"batch_size must be a whole number, 1 or more, got {bad}"):
            CALLS[call](api_model, images, texts, bad)


# ------------------------------------------------------------------------------------------------- downloads
class Server:
    """A raw HTTP server on 127.0.0.1: each connection is answered by the next of ``replies`` (bytes sent as
    they are, then the connection closed); the request heads are kept."""

    def __init__(self, replies: list[bytes]):
        self.replies, self.requests = list(replies), []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/ckpt.th"
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while self.replies:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                head = b""
                while b"\r\n\r\n" not in head:
                    head += conn.recv(65536)
                self.requests.append(head.decode("latin-1"))
                conn.sendall(self.replies.pop(0))

    def close(self):
        self.sock.close()


def close_delimited(body: bytes) -> bytes:
    """HTTP/1.0, no Content-Length: the body ends where the server closes the connection."""
    return b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n" + body


def chunked(body: bytes, status: str = "200 OK", headers: str = "", cut: int | None = None) -> bytes:
    """One chunk of ``body``; ``cut``: only that many of its bytes are sent, and no closing chunk."""
    head = f"HTTP/1.1 {status}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n{headers}\r\n".encode()
    if cut is not None:
        return head + b"%x\r\n" % len(body) + body[:cut]
    return head + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"


@pytest.fixture
def checkpoint_bytes(tmp_path) -> bytes:
    path = tmp_path / "whole.th"
    torch.save({"model": {"weight": torch.arange(5000, dtype=torch.float32)}}, path)
    return path.read_bytes()


def test_a_download_without_length_is_put_in_place_only_when_proven_whole(tmp_path, checkpoint_bytes):
    import hashlib

    cut = checkpoint_bytes[: len(checkpoint_bytes) // 2]
    server = Server([close_delimited(cut)] * 2 + [close_delimited(checkpoint_bytes)] * 2)
    dest = tmp_path / "dl" / "ckpt.th"
    try:
        with pytest.raises(DownloadError, match="announced no length.*no sha256 is expected"):
            download(server.url, dest, progress=False)
        assert not dest.exists() and part_path(dest).read_bytes() == cut
        check = registry.readable_checkpoint("ckpt.th")  # the registry's: it loads as a checkpoint
        with pytest.raises(DownloadError, match="announced no length.*do not read as a whole file"):
            download(server.url, dest, progress=False, check=check)
        assert not dest.exists()
        # whole: proven by the expected digest, or by the caller's check
        digest = hashlib.sha256(checkpoint_bytes).hexdigest()
        assert download(server.url, dest, sha256=digest, progress=False) == digest
        assert dest.read_bytes() == checkpoint_bytes
        dest.unlink()
        assert download(server.url, dest, progress=False, check=check) == digest
        assert dest.read_bytes() == checkpoint_bytes and not part_path(dest).exists()
    finally:
        server.close()


def test_a_registered_mirror_without_length_never_caches_a_cut_checkpoint(tmp_path, checkpoint_bytes):
    server = Server([close_delimited(checkpoint_bytes[:2000])] * 2)
    entry = registry.register_pretrained(
        Pretrained(name="cclm-test-nolength", description="a mirror", url=server.url, filename="nolength.th")
    )
    cache = tmp_path / "cache"
    try:
        for _ in range(2):  # the second call downloads again: nothing was put in place as complete
            with pytest.raises(DownloadError, match="may be a download cut short"):
                cclm.load(entry.name, cache_dir=cache)
        assert len(server.requests) == 2
        assert not (cache / "checkpoints" / "nolength.th").exists()
        assert not (cache / "checkpoints" / "nolength.th.sha256").exists()
    finally:
        registry.unregister_pretrained(entry.name)
        server.close()


def test_a_chunked_download_cut_short_keeps_what_arrived_and_resumes(tmp_path, checkpoint_bytes):
    size, first = len(checkpoint_bytes), 3000
    rest = f"Content-Range: bytes {first}-{size - 1}/{size}\r\n"
    server = Server(
        [
            chunked(checkpoint_bytes, cut=first),
            chunked(checkpoint_bytes[first:], status="206 Partial Content", headers=rest),
        ]
    )
    dest = tmp_path / "dl" / "ckpt.th"
    try:
        with pytest.raises(DownloadError, match=f"stopped after {first} bytes.*run again to resume"):
            download(server.url, dest, progress=False)
        assert not dest.exists() and part_path(dest).read_bytes() == checkpoint_bytes[:first]
        download(
            server.url, dest, progress=False
        )  # a chunked body that ended with its closing chunk is whole
        assert dest.read_bytes() == checkpoint_bytes and not part_path(dest).exists()
        assert f"Range: bytes={first}-" in server.requests[1]
    finally:
        server.close()


# ------------------------------------------------------------------------------------------------- clip_benchmark
def test_clip_benchmark_creates_the_folder_of_its_output_template(tiny_model_dir, tmp_path, monkeypatch):
    from cclm.inference.clip_benchmark import main
    from tests.test_clip_benchmark_adapter import captions, draw_images

    root = tmp_path / "xm3600"
    images = draw_images(root / "images", n=4)
    for language in ("de", "ja"):
        annotation = {
            "image_paths": images,
            "annotations": [t[0] for t in captions(4, per_image=1)],
            "indicies": list(range(4)),
        }
        (root / f"crossmodal3600_captions-{language}.json").write_text(json.dumps(annotation))
    monkeypatch.chdir(tmp_path)
    argv = [
        "eval", "--model_type", "cclm", "--model", "tiny", "--pretrained", str(tiny_model_dir),
        "--dataset", "crossmodal3600", "--dataset_root", str(root), "--language", "de", "ja",
        "--recall_k", "1", "--batch_size", "4", "--num_workers", "0", "--quiet",
        "--output", "results/run1/{dataset}_{language}_{model}.json",
    ]  # fmt: skip
    assert main(argv) == 0
    for language in ("de", "ja"):  # every language ran and was written
        result = json.loads((tmp_path / f"results/run1/crossmodal3600_{language}_tiny.json").read_text())
        assert result["language"] == language
