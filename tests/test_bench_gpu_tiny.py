"""``make bench-gpu``'s script (benchmarks/bench_gpu.py) in its tiny mode, end to end on the CPU (issue 16): the
same code as the GPU run (Trainer intervals per mode, open_clip peer, phase breakdown, report), so that the GPU
run cannot rot unseen; and its batch-size rule."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

from .pretrain_runs import quiet_env

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "bench_gpu.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_gpu", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_tiny_mode_end_to_end(tmp_path):
    out, results_md, copies = tmp_path / "gpu.json", tmp_path / "RESULTS.md", tmp_path / "copies"
    env = (
        quiet_env()
    )  # a process of its own: not a rank of a group that an earlier test in this process created
    command = [sys.executable, str(SCRIPT), "--tiny", "--out", str(out), "--results-md", str(results_md)]
    proc = subprocess.run(
        [*command, "--copy-to", str(copies), "--smoke", "7 passed"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    ours, peer = result["ours"], result["open_clip"]
    length = 16  # the tiny setup's text length; every batch is full length
    tokens_per_sample = {"image": length, "text": 2 * length, "alternate": 1.5 * length}  # text: both sides
    for mode, per_sample in tokens_per_sample.items():
        figures = ours["modes"][mode]
        assert figures["samples_per_s"] > 0
        assert abs(figures["tokens_per_s"] / figures["samples_per_s"] - per_sample) < 1e-6 * per_sample
    assert peer["batch"] == ours["batch_per_view"] == 8 and peer["samples_per_s"] > 0
    # both sides' FLOPs counted with one counter (cclm.train.flops.count_flops, on the CPU)
    assert set(ours["flops_per_sample"]) == {"image", "text"} and peer["flops_per_sample"] > 0
    assert abs(peer["tokens_per_s"] / peer["samples_per_s"] - length) < 1e-6 * length
    assert set(ours["phases_ms"]) == {"data", "forward", "backward", "optimizer", "host_sync"}
    assert all(ms >= 0 for ms in ours["phases_ms"].values())
    assert "skipped" in result["compiled"]
    if not torch.cuda.is_available():  # no GPU: no GPU figure, nothing appended
        assert ours["modes"]["image"]["mfu"] is None and peer["mfu"] is None
        assert "MFU not measured (no GPU)" in proc.stdout
    assert result["appended_to_results_md"] is False and not results_md.exists()
    assert json.loads((copies / "gpu.json").read_text()) == result
    line = (copies / "bench_gpu_line.md").read_text()
    assert line.startswith(f"- {result['date']} bench-gpu on ") and "smoke test: 7 passed" in line


def test_largest_batch_fits_under_the_memory_fraction():
    largest_batch = _bench_module().largest_batch
    gib = 2**30
    # 10 GiB resident, 100 MiB per sample, 80 GiB card: 0.85 * 80 - 10 = 58 GiB -> 593 samples -> 592
    assert largest_batch(10 * gib, 100 * 2**20, 80 * gib) == 592
    assert largest_batch(79 * gib, 100 * 2**20, 80 * gib) == 16  # nothing fits: the smallest it tries
    assert largest_batch(0, 1, 80 * gib, most=1024) == 1024


def test_compiled_run_keeps_to_the_time_budget(monkeypatch):
    import argparse
    import time

    bench = _bench_module()
    setup = bench.Setup("base", {}, {}, 6, 6, 40, 256, torch.device("cuda"), "bf16", 8, 10, 0)
    monkeypatch.setattr(bench, "bench_ours", lambda *args, **kwargs: time.sleep(5) or {"modes": {}})
    started = time.monotonic()
    auto = argparse.Namespace(compile="auto", budget_s=2.0)
    assert "time budget: " in bench.bench_compiled(setup, REPO, 16, auto, started)["skipped"]
    monkeypatch.setattr(bench, "COMPILE_LEAST_S", 1)
    assert (
        "stopped at the end of the time budget"
        in bench.bench_compiled(setup, REPO, 16, auto, started)["skipped"]
    )
    assert time.monotonic() - started < 4
    no = argparse.Namespace(compile="no", budget_s=100.0)
    assert bench.bench_compiled(setup, REPO, 16, no, started) == {"skipped": "not asked for"}
