"""``make demo`` at toy length: the three runs (with and without parallel text, then the grounding run continued
from the first with ``init_from``), their exports and ``results.json`` -- so the demo's wiring cannot rot between
``make demo`` runs. The claims themselves (the tables) are what ``make demo`` measures at full length."""

from __future__ import annotations

import json
import subprocess
import sys

from safetensors.torch import load_file

from .pretrain_runs import REPO, quiet_env

LANGS = ["de", "en", "es", "fr", "ja", "zh"]


def test_the_demo_runs_end_to_end_and_writes_every_table(tmp_path):
    out = tmp_path / "demo"
    command = [sys.executable, "-m", "cclm.demo", "--output-dir", str(out), "--images", "64", "--steps", "4",
               "--grounding-steps", "3"]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, env=quiet_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    for run in (
        "with_parallel",
        "without_parallel",
        "with_parallel_itm_rerank",
        "without_parallel_itm_rerank",
    ):
        assert sorted(results[run]) == LANGS
        assert all(0 <= row["r_mean"] <= 100 for row in results[run].values())
    assert sorted(results["grounding"]) == LANGS and all(0 <= a <= 100 for a in results["grounding"].values())
    # the grounding run starts from the with-parallel model: its text tower has the first run's weights to begin
    # with, so after 3 box-only steps at lr 3e-4 it is still close to them (a fresh init would be far away)
    first = load_file(str(out / "with_parallel" / "model" / "model.safetensors"))
    grounded = load_file(str(out / "grounding" / "model" / "model.safetensors"))
    name = "text.embeddings.position_embeddings.weight"
    assert (grounded[name] - first[name]).abs().max() < 0.01
    assert any(key.startswith("box_head.") for key in grounded)
    records = [json.loads(line) for line in (out / "grounding" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records][-1] == 3 and all(
        "region/giou" in r and "region/xlc" in r and "image/itc" not in r for r in records
    )
    assert not any(key.startswith("text/") for r in records for key in r)  # parallel text feeds xlc only
