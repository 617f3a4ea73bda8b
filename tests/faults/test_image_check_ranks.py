"""The up-front image check on several ranks (docs/iglue.md): the ranks of one host share the decoding, each host
decodes every image once (image roots may be node-local copies), and every rank stops with the same error for a
problem any rank found -- also when a rank's own check fails -- instead of one rank raising while the others wait
in the next collective. Real 2-rank gloo groups on the CPU."""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from cclm.errors import DataError
from cclm.runtime.env import node_name
from cclm.tasks import images
from cclm.tasks.images import ImageRef, MissingImageError, require_images

NAMES = [
    "a.jpg",
    "b.png",
    "c.jpg",
    "d.jpg",
    "e.png",
]  # sorted: rank 0 decodes a, c, e and rank 1 b, d on one host
JOIN_TIMEOUT_S = 60


def write_images(folder: Path, names: list[str] = NAMES) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (64, 48), (40 * i, 0, 0)).save(folder / name)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def refs(names: list[str]) -> list[ImageRef]:
    return [ImageRef("images", name) for name in names] * 3  # an image named in several examples (xGQA)


def _worker(rank: int, scenario: str, folder: str) -> None:
    """One rank: runs ``scenario``'s checks and writes what each raised, and the images it decoded, to
    ``rank{rank}.json`` in ``folder``."""
    folder = Path(folder)
    decoded: list[str] = []
    real_decode = images.decode_problem

    def counting_decode(path: Path) -> str:
        decoded.append(str(path))
        if scenario == "rank 1 fails" and rank == 1:
            raise RuntimeError("boom")
        return real_decode(path)

    images.decode_problem = counting_decode
    if scenario == "rank 1 cannot stat" and rank == 1:  # a stale NFS mount on one node, say

        def stale(path: Path) -> bool:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))

        Path.is_file = stale
    checks = [(refs(NAMES), {"images": str(folder / "images")})]
    if scenario in ("two hosts", "two nodes, one host name"):
        # each host has its own copy of the images, at the same path
        if scenario == "two hosts":
            socket.gethostname = lambda: f"node{rank}"
        else:  # containers on two nodes that share a host name; torchrun tells them apart
            socket.gethostname = lambda: "pod"
            os.environ["GROUP_RANK"] = str(rank)
        os.chdir(folder / f"node{rank}")
        checks = [(refs(NAMES), {"images": "images"}), (refs([*NAMES, "f.jpg"]), {"images": "images"})]
    dist.init_process_group(
        "gloo",
        init_method=f"file://{folder / 'store'}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=30),
    )
    outcomes = []
    try:
        for check_refs, roots in checks:
            try:
                require_images(check_refs, roots)
                outcomes.append(None)
            except Exception as err:
                outcomes.append([type(err).__name__, str(err)])
        dist.barrier()  # the next collective: every rank gets here
    except Exception:
        outcomes.append(["collective failed", traceback.format_exc()])
    finally:
        dist.destroy_process_group()
        (folder / f"rank{rank}.json").write_text(json.dumps({"outcomes": outcomes, "decoded": decoded}))


def run_ranks(scenario: str, folder: Path) -> list[dict]:
    """Both ranks' reports; fails if a rank does not end within ``JOIN_TIMEOUT_S``."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(rank, scenario, str(folder))) for rank in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(JOIN_TIMEOUT_S)
    alive = [rank for rank, proc in enumerate(procs) if proc.is_alive()]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert not alive, f"rank(s) {alive} still running after {JOIN_TIMEOUT_S} s"
    assert [proc.exitcode for proc in procs] == [0, 0]
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_the_ranks_of_one_host_share_the_decoding_and_raise_the_same_error(tmp_path):
    root = tmp_path / "images"
    write_images(root)
    truncate(root / "c.jpg")  # decoded by rank 0
    truncate(root / "d.jpg")  # decoded by rank 1
    reports = run_ranks("one host", tmp_path)
    decoded = [sorted(Path(p).name for p in report["decoded"]) for report in reports]
    assert decoded == [["a.jpg", "c.jpg", "e.png"], ["b.png", "d.jpg"]]
    outcomes = [report["outcomes"] for report in reports]
    assert outcomes[0] == outcomes[1], outcomes
    [(kind, message)] = outcomes[0]
    assert kind == DataError.__name__
    assert message.startswith(f"2 of 5 image(s) do not decode: {root / 'c.jpg'} (")
    assert f", {root / 'd.jpg'} (" in message and "\n" not in message
    assert "; on " not in message  # one host: no host named


def test_each_host_decodes_every_image_and_a_problem_of_one_host_stops_every_rank(tmp_path):
    for node in ("node0", "node1"):
        write_images(tmp_path / node / "images")
    write_images(tmp_path / "node0" / "images", ["f.jpg"])  # missing from node1's copy
    truncate(tmp_path / "node1" / "images" / "c.jpg")  # damaged in node1's copy only
    reports = run_ranks("two hosts", tmp_path)
    outcomes = [report["outcomes"] for report in reports]
    assert outcomes[0] == outcomes[1], outcomes
    (kind, message), (missing_kind, missing_message) = outcomes[0]
    assert kind == DataError.__name__
    assert message.startswith(f"1 of 5 image(s) do not decode: {Path('images/c.jpg')} (")
    assert "; on node1)" in message, message
    assert missing_kind == MissingImageError.__name__
    assert missing_message.startswith(f"1 image(s) missing: {Path('images/f.jpg')} (on node1) ")
    for report in reports:  # no share of node0's work counts for node1; the missing image stopped both before
        assert sorted(Path(p).name for p in report["decoded"]) == NAMES


def test_nodes_that_share_a_host_name_are_told_apart_by_the_launchers_node_index(tmp_path):
    for node in ("node0", "node1"):
        write_images(tmp_path / node / "images")
    write_images(tmp_path / "node0" / "images", ["f.jpg"])
    truncate(tmp_path / "node1" / "images" / "c.jpg")
    reports = run_ranks("two nodes, one host name", tmp_path)
    outcomes = [report["outcomes"] for report in reports]
    assert outcomes[0] == outcomes[1], outcomes
    (kind, message), (missing_kind, missing_message) = outcomes[0]
    assert kind == DataError.__name__ and "; on pod#node1)" in message, message
    assert missing_kind == MissingImageError.__name__
    assert missing_message.startswith(f"1 image(s) missing: {Path('images/f.jpg')} (on pod#node1) ")
    for report in reports:  # one node's share of the decoding would leave node1's damaged c.jpg unseen
        assert sorted(Path(p).name for p in report["decoded"]) == NAMES


@pytest.mark.parametrize(
    ("environment", "name"),
    [
        ({}, "host"),
        ({"GROUP_RANK": "3", "SLURM_NODEID": "1"}, "host#node3"),
        ({"CROSS_RANK": "2"}, "host#node2"),
        ({"SLURM_NODEID": "0"}, "host#node0"),
        ({"GROUP_RANK": " "}, "host"),
    ],
)
def test_a_node_is_named_by_its_host_and_the_launchers_node_index(monkeypatch, environment, name):
    from cclm.runtime import env

    for variable in env.NODE_INDEX_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    monkeypatch.setattr(env.socket, "gethostname", lambda: "host")
    assert env.node_name() == name


def test_a_rank_whose_check_fails_stops_every_rank_naming_it(tmp_path):
    write_images(tmp_path / "images")
    reports = run_ranks("rank 1 fails", tmp_path)
    outcomes = [report["outcomes"] for report in reports]
    assert outcomes[0] == outcomes[1], outcomes
    expected = f"the image check failed on rank 1 ({node_name()}): RuntimeError: boom"
    assert outcomes[0] == [["RuntimeError", expected]]


def test_a_rank_that_cannot_even_look_for_the_files_stops_every_rank_naming_it(tmp_path):
    write_images(tmp_path / "images")
    reports = run_ranks("rank 1 cannot stat", tmp_path)
    outcomes = [report["outcomes"] for report in reports]
    assert outcomes[0] == outcomes[1], outcomes
    [(kind, message)] = outcomes[0]
    assert kind == "RuntimeError" and message.startswith("the image check failed on rank 1 (")
    assert "OSError: [Errno 5] Input/output error" in message
    assert all(report["decoded"] == [] for report in reports)  # stopped before decoding


def test_without_a_process_group_every_image_is_decoded_here(tmp_path, monkeypatch):
    assert not (
        dist.is_initialized() and dist.get_world_size() > 1
    )  # an earlier test may leave a 1-rank group
    root = tmp_path / "images"
    write_images(root)
    truncate(root / "d.jpg")
    decoded = []
    real_decode = images.decode_problem
    monkeypatch.setattr(images, "decode_problem", lambda path: decoded.append(path.name) or real_decode(path))
    bad = re.escape(str(root / "d.jpg"))
    with pytest.raises(DataError, match=rf"^1 of 5 image\(s\) do not decode: {bad} \([^;]*\) \(`cclm"):
        require_images(refs(NAMES), {"images": str(root)})
    assert sorted(decoded) == NAMES


@pytest.mark.parametrize(
    ("cores", "ranks", "threads"),
    [(2, 1, 2), (64, 1, 8), (16, 8, 2), (96, 8, 8), (4, 8, 1), (None, 1, 1)],
)
def test_the_ranks_of_a_host_share_its_cores_for_decoding(monkeypatch, cores, ranks, threads):
    monkeypatch.setattr(images.os, "cpu_count", lambda: cores)
    assert images.decode_threads(ranks) == threads
