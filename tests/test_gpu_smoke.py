"""GPU smoke test (``pytest -m gpu``; ``make bench-gpu`` runs it first): a few bf16 steps of each view under
ZeRO-2 and ZeRO-3 on the test world, resume, export, retrieval evaluation of the exported model on the GPU, a
compiled step against the eager one, and the copy and host-sync behaviour of the training loop on a real device.
Skipped without CUDA: the CPU suite covers the same code in fp32."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from .pretrain_runs import metrics, overrides, run_pretrain, small_world

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU (`make bench-gpu` runs it on one)"
    ),
]
DEMO_EVAL = Path(__file__).resolve().parent.parent / "configs" / "eval" / "demo_world.yaml"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return small_world(tmp_path_factory.mktemp("world") / "w")


def _check_views(records: list[dict], steps: list[int]) -> None:
    assert [r["step"] for r in records] == steps
    for view in ("image", "text"):
        losses = [r[f"{view}/loss"] for r in records if f"{view}/loss" in r]
        assert losses and all(torch.isfinite(torch.tensor(losses))), (view, losses)


def test_zero2_bf16_both_views_then_resume(world, tmp_path):
    out = tmp_path / "zero2"
    options = {"deepspeed.zero_stage": 2, "deepspeed.precision": "bf16", "train.save_every": 4}
    run_pretrain(1, overrides(world, out, **options, **{"train.max_steps": 4}))
    run_pretrain(1, overrides(world, out, **options, **{"train.max_steps": 8, "resume": "auto"}))
    _check_views(metrics(out), list(range(1, 9)))
    assert (out / "checkpoints" / "step_00000008" / "complete.json").exists()


def test_zero3_bf16_periodic_eval_export_and_retrieval(world, tmp_path):
    from cclm.cli import main as cclm_main
    from cclm.train.export import export

    out = tmp_path / "zero3"
    options = {
        "deepspeed.zero_stage": 3,
        "deepspeed.precision": "bf16",
        "train.max_steps": 6,
        "train.save_every": 6,
        "train.eval_every": 6,
        "eval.datasets": f"{{world: {world / 'heldout'}}}",
    }
    run_pretrain(1, overrides(world, out, **options))
    records = metrics(out)
    _check_views(records, list(range(1, 7)))
    assert "eval/world/en/txt_r1" in records[-1]

    exported = export(out / "checkpoints" / "step_00000006", tmp_path / "exported")
    args = [f"checkpoint={exported}", f"data.root={world / 'heldout'}", "languages=en", "eval.k_test=8"]
    assert (
        cclm_main(["evaluate", "retrieval", str(DEMO_EVAL), *args, "device=cuda", f"output_dir={tmp_path}"])
        == 0
    )
    result = json.loads((tmp_path / "demo_world.json").read_text())["en"]
    assert all(0.0 <= result[k] <= 100.0 for k in ("txt_r1", "img_r1", "r_mean")), result


def test_compiled_step_equals_eager_with_inductor(tiny_model_cfg):
    from cclm.model import CrossViewModel
    from cclm.runtime.compile import compile_towers

    from .test_compile import _image_batch, _step

    model = CrossViewModel(tiny_model_cfg, load_pretrained=False).cuda().train()
    batch = {k: v.cuda() for k, v in _image_batch(tiny_model_cfg.text.encoder["vocab_size"]).items()}
    eager_loss, _ = _step(model, batch)
    assert compile_towers(model, fullgraph=True) == 6
    compiled_loss, _ = _step(model, batch)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-3, atol=1e-4)


def test_batches_are_pinned_and_copied_without_waiting():
    from cclm.runtime.env import _pinned, to_device

    host = {"images": torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8), "lang": ["en"] * 4}
    assert _pinned(host["images"]).is_pinned()
    moved = to_device(host, torch.device("cuda"))
    torch.cuda.synchronize()
    assert moved["images"].is_cuda and torch.equal(moved["images"].cpu(), host["images"])
    assert moved["lang"] == host["lang"]


def test_micro_steps_do_not_synchronise_in_our_code(tmp_path):
    """CUDA's sync debug mode flags every operation that makes the host wait; none may come from the loop's
    own code (DeepSpeed's optimizer step may synchronise: that is counted and reported by bench_gpu.py)."""
    import cclm
    from cclm.config import DeepSpeedConfig, OptimizerConfig, SchedulerConfig, ViewSchedule
    from cclm.runtime.env import init_distributed
    from cclm.runtime.trainer import IntervalStats, LoopSettings, Trainer

    from .test_host_syncs import TwoLosses, TwoViewSource

    loop = LoopSettings(
        max_steps=4, log_every=4, save_every=0, view_schedule=ViewSchedule.sum, progress_bar=False
    )
    trainer = Trainer(
        TwoLosses(tracked=False),
        TwoViewSource(),
        loop,
        env=init_distributed(),
        optimizer_cfg=OptimizerConfig(lr=0.05),
        scheduler_cfg=SchedulerConfig(),
        deepspeed_cfg=DeepSpeedConfig(zero_stage=2, precision="fp32"),  # the toy batch is fp32
        micro_batch=8,
        output_dir=tmp_path / "run",
    )
    stats = IntervalStats()
    trainer.train_step(stats)  # first step: allocations, lazy initialisation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train_step(stats)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    package = str(Path(cclm.__file__).parent)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    ours = [f"{w.filename}:{w.lineno}" for w in syncs if w.filename.startswith(package)]
    assert ours == []
    trainer.close()
