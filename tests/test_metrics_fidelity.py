"""What the run logs says is what the run did: the logged ``loss`` under gradient accumulation, the samples and
FLOPs (MFU) of region and short batches, attention in the FLOP count, the device peaks, the loss panel of
``cclm plot``, and the data benchmark's headline ratio (the logging-bench findings)."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cclm.config import (
    DeepSpeedConfig,
    ModelConfig,
    OptimizerConfig,
    SchedulerConfig,
    ViewSchedule,
    load_config,
)
from cclm.runtime import trainer as trainer_module
from cclm.runtime.env import init_distributed, seed_everything
from cclm.runtime.trainer import LoopSettings, Trainer

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "model" / "tiny.yaml"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return sys.modules[name]


def _tiny_model(**options):
    from cclm.model import CrossViewModel

    cfg = load_config(ModelConfig, str(TINY))
    for key, value in options.items():
        target, name = cfg, key
        if "." in key:
            section, name = key.split(".")
            target = getattr(cfg, section)
        setattr(target, name, value)
    torch.manual_seed(0)
    return CrossViewModel(cfg, load_pretrained=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is faster than two contending ones on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    """The tiny model (default attention: SDPA); tests that train it train at lr 0."""
    return _tiny_model()


def _attention_by_hand(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """QK^T and AV of [B, h, L, d] shapes: 2 B h Lq Lk d + 2 B h Lq Lk d_v."""
    b, h, lq, d = query
    return 2 * b * h * lq * key[2] * d + 2 * b * h * lq * key[2] * value[3]


def _reference_flops(model, batch, view) -> float:
    """3x the forward of exactly this batch, counted with torch's counter plus the attention of the CPU kernel
    by hand (torch has no formula for it)."""
    aten = torch.ops.aten
    counter = FlopCounterMode(
        display=False, custom_mapping={aten._scaled_dot_product_flash_attention_for_cpu: _attention_by_hand}
    )
    with torch.random.fork_rng(devices=[]), torch.no_grad(), counter:
        model(batch, view)
    return 3.0 * counter.get_total_flops()


class _OneBatch:
    """A source serving the same batch of one view every micro-step."""

    def __init__(self, view: str, batch: dict):
        self.views, self.view, self.batch = (view,), view, batch

    def view_for_step(self, step):
        return self.view

    def next_batch(self, view):
        return {k: v.clone() if torch.is_tensor(v) else v for k, v in self.batch.items()}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def close(self):
        pass


def _trainer(model, source, out, steps=2, grad_accum=1, schedule=ViewSchedule.alternate, flops=None):
    env = init_distributed("cpu")
    seed_everything(0)
    loop = LoopSettings(
        max_steps=steps,
        log_every=1,
        save_every=0,
        grad_accum=grad_accum,
        view_schedule=schedule,
        progress_bar=False,
    )
    return Trainer(
        model,
        source,
        loop,
        env=env,
        optimizer_cfg=OptimizerConfig(lr=0.0),
        scheduler_cfg=SchedulerConfig(),
        deepspeed_cfg=DeepSpeedConfig(zero_stage=0),
        micro_batch=4,
        output_dir=out,
        flops_per_sample=flops,
    )


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------- 1: loss under grad_accum
class _CountingLosses(nn.Module):
    """View "a" returns loss k at its k-th call, view "b" 10 k: known values for every micro-step."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.calls = {"a": 0, "b": 0}

    def forward(self, batch, view):
        self.calls[view] += 1
        value = float(self.calls[view]) * (1.0 if view == "a" else 10.0)
        return {"loss": value + 0.0 * self.w.sum() + 0.0 * batch["x"].sum()}


class _TwoViews:
    views = ("a", "b")

    def view_for_step(self, step):
        return self.views[step % 2]

    def next_batch(self, view):
        return {"x": torch.ones(4, 2), "text_mask": torch.ones(4, 3)}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def close(self):
        pass


def test_logged_loss_is_the_sum_of_the_view_losses_with_grad_accum(tmp_path):
    trainer = _trainer(_CountingLosses(), _TwoViews(), tmp_path / "run", 2, 2, ViewSchedule.sum)
    trainer.run()
    trainer.close()
    records = _records(tmp_path / "run")
    # step 1: micro-steps 1, 2 -> a 1, 2 and b 10, 20; step 2: a 3, 4 and b 30, 40
    assert [(r["a/loss"], r["b/loss"], r["loss"]) for r in records] == [(1.5, 15.0, 16.5), (3.5, 35.0, 38.5)]
    for record in records:
        assert record["loss"] == record["a/loss"] + record["b/loss"]


# ---------------------------------------------------------------------------------- 2: region samples and FLOPs
def _region_batch(model, images=3, texts=7, length=11, seed=0):
    """A region batch as the pipeline builds it (collate_regions, then the text fields): ``images`` images,
    ``texts`` region texts (unevenly spread), texts padded to ``length`` tokens."""
    from cclm.data.regions import RegionTarget, collate_regions

    rng = np.random.default_rng(seed)
    per_image = [texts // images + (1 if i < texts % images else 0) for i in range(images)]
    examples = [
        {
            "image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
            "key": f"img{i}",
            "targets": [
                RegionTarget(f"r{i}-{j}", "en", (0.1, 0.1, 0.6, 0.7), j == 0, j - 1) for j in range(count)
            ],
        }
        for i, count in enumerate(per_image)
    ]
    batch = collate_regions(examples, texts, random.Random(0))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, model.encoder_config.vocab_size, (texts, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1:, length - 3 :] = 0  # the batch is padded to its longest text (row 0)
    labels = torch.where(torch.rand(ids.shape, generator=g) < 0.3, ids, torch.full_like(ids, -100))
    labels[:, 0] = ids[:, 0]
    batch.update({"text_ids": ids, "text_mask": mask, "mlm_ids": ids, "mlm_labels": labels})
    return batch


def test_region_step_counts_pairs_and_charges_images_and_texts(tmp_path, monkeypatch):
    from cclm.train.flops import train_flops_per_sample

    model = _tiny_model(**{"objectives.bbox": True})
    flops = {"region": train_flops_per_sample(model, "region", 32, 32)}
    batch = _region_batch(model)
    assert batch["images"].shape[0] == 3 and batch["text_ids"].shape[0] == 7
    expected = _reference_flops(model, batch, "region")
    assert trainer_module._batch_counts(batch)[0] == 7  # the region-text pairs, not the 3 images

    peak = 1e12
    monkeypatch.setattr(trainer_module, "peak_flops", lambda device: peak)
    trainer = _trainer(model, _OneBatch("region", batch), tmp_path / "run", steps=1, flops=flops)
    trainer.run()
    trainer.close()
    for record in _records(tmp_path / "run"):
        seconds = 7 / record["samples_per_s"]  # the interval's time, from its 7 samples
        logged_flops = record["mfu"] * peak * seconds
        assert logged_flops == pytest.approx(expected, rel=1e-3)
        assert record["tokens_per_s"] * seconds == pytest.approx(float(batch["text_mask"].sum()))


# ---------------------------------------------------------------------------- 3: attention and padded length
def test_cpu_attention_is_counted():
    from cclm.train.flops import count_flops

    q, k = torch.randn(2, 2, 32, 16), torch.randn(2, 2, 24, 16)
    # QK^T and AV: 2 x (2 * B * h * Lq * Lk * d)
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, k)) == 4 * 2 * 2 * 32 * 24 * 16


def test_sdpa_model_counts_what_eager_attention_counts(tiny):
    """The text view's self- and cross-attention (HF layers, cclm's fusion): SDPA (the default) as eager."""
    from cclm.config import AttnImplementation
    from cclm.train.flops import train_flops_per_sample

    eager = _tiny_model(attn_implementation=AttnImplementation.eager)
    sdpa = train_flops_per_sample(tiny, "text", 32, 32)
    assert float(sdpa) == pytest.approx(float(train_flops_per_sample(eager, "text", 32, 32)), rel=1e-9)


def _text_batch(model, length=12, other=9, texts=4):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, model.encoder_config.vocab_size, (texts, length), generator=g)
    other_ids = torch.randint(5, model.encoder_config.vocab_size, (texts, other), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, 2:7] = ids[:, 2:7]
    return {
        "text_ids": ids,
        "text_mask": torch.ones_like(ids),
        "mlm_ids": ids,
        "mlm_labels": labels,
        "other_ids": other_ids,
        "other_mask": torch.ones_like(other_ids),
        "group_ids": torch.arange(texts),
    }


def test_short_batches_are_charged_at_their_padded_length(tmp_path, monkeypatch, tiny):
    from cclm.train.flops import train_flops_per_sample

    model = tiny
    flops = {"text": train_flops_per_sample(model, "text", 32, 32)}  # max_length 32
    batch = _text_batch(model)  # padded to 12 and 9 tokens
    expected = _reference_flops(model, batch, "text")

    peak = 1e12
    monkeypatch.setattr(trainer_module, "peak_flops", lambda device: peak)
    trainer = _trainer(model, _OneBatch("text", batch), tmp_path / "run", steps=1, flops=flops)
    trainer.run()
    trainer.close()
    (record,) = _records(tmp_path / "run")
    assert record["mfu"] * peak * 4 / record["samples_per_s"] == pytest.approx(expected, rel=1e-3)
    assert flops["text"].batch_flops(batch) == pytest.approx(expected, rel=1e-3)


def test_image_flops_follow_length_and_mlm_positions(tiny):
    from cclm.train.flops import dummy_batch, train_flops_per_sample

    model = tiny
    flops = train_flops_per_sample(model, "image", 32, 32)
    for length, masked in ((32, 12), (7, 1), (20, 5)):
        batch = dummy_batch("image", 3, length, 32, model.encoder_config.vocab_size, masked=masked)
        assert flops.batch_flops(batch) == pytest.approx(_reference_flops(model, batch, "image"), rel=1e-3)
    full = dummy_batch("image", 2, 32, 32, model.encoder_config.vocab_size)
    assert float(flops) == pytest.approx(_reference_flops(model, full, "image") / 2, rel=1e-9)


def test_open_clip_peer_is_counted_like_ours(tmp_path):
    """bench_gpu counts open_clip with the counter ours uses: attention included (0 before on the CPU)."""
    bench = _load_script("bench_gpu")
    setup = bench.tiny_setup(torch.device("cpu"))
    torch.manual_seed(0)
    model, clip_loss = bench.open_clip_model(setup, tmp_path / "text")
    images, ids = bench.open_clip_inputs(setup, 2)
    plain = FlopCounterMode(display=False)  # torch's registry alone: no CPU attention
    with torch.no_grad(), plain:
        bench.open_clip_loss(model, clip_loss, setup, images, ids)
    # attention by hand, per forward: 4 * B * tokens^2 * width per layer (QK^T and AV)
    patches = (setup.image_size // setup.vision["patch_size"]) ** 2 + 1
    vision = setup.vision["layers"] * 4 * 2 * patches**2 * setup.vision["width"]
    text = setup.text_layers * 4 * 2 * setup.length**2 * setup.text["hidden_size"]
    expected = 3.0 * (plain.get_total_flops() + vision + text) / 2
    result = bench.bench_open_clip(setup, 2, tmp_path)
    assert result["flops_per_sample"] == pytest.approx(expected, rel=1e-9)


# ----------------------------------------------------------------------------------------------- 4: cclm plot
def test_plot_loss_panel_holds_losses_only(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cclm.train import plot

    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in (10, 20, 30):
            record = {
                "step": step,
                "loss": 5.0 - step / 100,
                "image/itc": 2.0,
                "image/loss": 5.0 - step / 100,
                "region/bbox": 0.5,
                "region/loss": 1.0,
                "lr": 1e-4,
                "samples_per_s": 100.0,
                "skipped_samples": 3.0 * step,
                "skipped/bad_image": 3.0 * step,
                "eval/coco/en/r_mean": 10.0,
            }
            f.write(json.dumps(record) + "\n")
    panels = {}
    original = plt.Figure.savefig

    def savefig(self, *args, **kwargs):
        for ax in self.axes:
            panels[ax.get_title()] = sorted(line.get_label() for line in ax.get_lines())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", savefig)
    plot.plot_curves(tmp_path)
    assert panels["losses by view"] == ["image/itc", "image/loss", "loss", "region/bbox", "region/loss"]


# ------------------------------------------------------------------------------------------- 5: device peaks
@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L40", 181e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA A10", 125e12),
        ("NVIDIA A10G", None),  # not the A10's peak
        ("NVIDIA GeForce RTX 4090", 165e12),
        ("Some Other GPU", None),
    ],
)
def test_peak_flops_of_specific_cards(monkeypatch, name, peak):
    from cclm.runtime import flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert flops.peak_flops(torch.device("cuda", 0)) == peak
    assert flops.peak_flops(torch.device("cpu")) is None


# -------------------------------------------------------------------------------------- note: bench-data ratio
def test_bench_data_headline_is_the_median_paired_ratio():
    bench = _load_script("bench_data")
    passes = {
        "cclm": [
            {"samples_per_s": 354.3, "samples_per_cpu_s": 183.7},
            {"samples_per_s": 374.4, "samples_per_cpu_s": 191.8},
            {"samples_per_s": 453.7, "samples_per_cpu_s": 233.4},
        ],
        "ceiling": [
            {"samples_per_s": 447.9, "samples_per_cpu_s": 227.8},
            {"samples_per_s": 451.0, "samples_per_cpu_s": 228.3},
            {"samples_per_s": 461.2, "samples_per_cpu_s": 235.2},
        ],
    }
    passes["open_clip"] = passes["bare"] = passes["ceiling"]
    ratios = bench.ratio_summary(passes)
    assert ratios["cclm_vs_ceiling_median"] == round(374.4 / 451.0, 3) == 0.83
    assert ratios["cclm_vs_ceiling_per_cpu_s_median"] == round(191.8 / 228.3, 3)
    assert ratios["cclm_vs_ceiling_best_of"] == round(453.7 / 461.2, 3)
    result = {
        "date": "d",
        "repeats": 3,
        "ratios": ratios,
        "cclm_samples_per_s": 453.7,
        "open_clip_samples_per_s": 461.2,
        "bare_decode_samples_per_s": 461.2,
        "ceiling_samples_per_s": 461.2,
    }
    line = bench.result_line(result, 2, {"images": 2000, "mean_kb": 66.1})
    assert "**83% of the ceiling (84% per CPU-second)**" in line
    assert "best-of (best pass over best pass)" in line and "98% of the ceiling" in line


def test_bench_data_adds_its_line_to_its_own_section(tmp_path):
    bench = _load_script("bench_data")
    results = tmp_path / "RESULTS.md"
    bench.append_result_line(results, "- first\n")  # a new file: the section is made
    assert results.read_text() == f"{bench.SECTION}\n\n- first\n"
    results.write_text(f"# Results\n\n{bench.SECTION}\n\n- old run\n  continued\n\n## Other\n\n- other\n")
    bench.append_result_line(results, "- new run\n")
    assert results.read_text() == (
        f"# Results\n\n{bench.SECTION}\n\n- old run\n  continued\n- new run\n\n## Other\n\n- other\n"
    )
    assert results.read_text().count(bench.SECTION) == 1
