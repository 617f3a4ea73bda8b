"""``make bench-gpu``: the base model's training step on one GPU, against open_clip, with a per-phase breakdown.

In one process, on one device:
1. ours: the cross-view model at the shapes of configs/model/base.yaml (ViT-B/16 at 224 px + 6 text and 6 fusion
   layers of xlm-roberta-large's width, 40 text tokens; random init: the shapes are what count), all objectives,
   bf16, DeepSpeed ZeRO-2, at the largest micro-batch that fits (the activation memory of a forward+backward is
   measured at two small batches; the largest multiple of 16 under 85% of the GPU's memory is taken), trained by
   the real Trainer: samples/s, tokens/s and MFU of a steady-state log interval of image-only, text-only and
   alternating steps (each mode runs two intervals; the first warms up);
2. the per-phase breakdown of our step, the device synchronised at each phase boundary: data wait (a ready host
   batch to the device), forward, backward, optimizer, host syncs (a log step's read of the losses); and the
   synchronising operations of one unsynchronised step (CUDA's sync debug mode), by source line;
3. open_clip: a CLIP training step with the same towers (ViT-B/16 + an HF XLM-R tower of 6 large-width layers,
   CLS pooling, linear projection) and batch, bf16 autocast, fused AdamW: samples/s, tokens/s, MFU;
4. ours again with ``model.compile`` (torch.compile of the tower layers), when the time budget leaves room.

MFU's FLOPs: ours and open_clip's are counted the same way, with :func:`cclm.train.flops.count_flops` on the
CPU before the models move to the device (3x the forward; attention counted on both sides).

``--tiny`` (the default without CUDA) runs the same code on a tiny model, fp32 on the CPU, a few steps each: the
test suite runs it (tests/test_bench_gpu_tiny.py) so that it cannot rot. Only a GPU run of the base model appends
to RESULTS.md; a run without a GPU measures no GPU figure.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from benchmarks.results_md import append_to_section  # noqa: E402

VIEWS = ("image", "text")
MODES = ("image", "text", "alternate")
XLMR_LARGE = {
    "vocab_size": 250002,
    "hidden_size": 1024,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "max_position_embeddings": 514,
    "type_vocab_size": 1,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
}
TINY_TEXT = {
    "vocab_size": 1000,
    "hidden_size": 64,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 66,
    "type_vocab_size": 1,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
TINY_VISION = {
    "image_size": 32,
    "patch_size": 8,
    "width": 64,
    "layers": 2,
    "head_width": 32,
    "mlp_ratio": 2.0,
}
# The compiled run starts with at least this much of the time budget left, and is stopped at its end.
COMPILE_LEAST_S = 120


@dataclass(frozen=True)
class Setup:
    """What a run trains and how long it measures."""

    name: str
    vision: dict
    text: dict
    text_layers: int
    fusion_layers: int
    length: int
    embed_dim: int
    device: torch.device
    precision: str
    log_every: int  # steps per log interval; each mode runs two intervals and measures the second
    timed_steps: int  # open_clip's timed steps and the breakdown's steps
    fixed_batch: int  # 0: the largest that fits (GPU only)

    @property
    def image_size(self) -> int:
        return int(self.vision["image_size"])

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def base_setup(device: torch.device) -> Setup:
    from cclm.model.vision import resolve_open_clip_vision_cfg

    vision, _ = resolve_open_clip_vision_cfg("ViT-B-16")
    return Setup("base", dict(vision, image_size=224), XLMR_LARGE, 6, 6, 40, 256, device, "bf16", 8, 10, 0)


def tiny_setup(device: torch.device) -> Setup:
    precision = "bf16" if device.type == "cuda" else "fp32"
    return Setup("tiny", TINY_VISION, TINY_TEXT, 2, 2, 16, 64, device, precision, 2, 2, 8)


def model_config(setup: Setup, compile_towers: bool = False):
    from cclm.config import ModelConfig, from_dict

    layers = setup.text_layers + setup.fusion_layers
    return from_dict(
        ModelConfig,
        {
            "vision": {"tower": dict(setup.vision), "image_size": setup.image_size},
            "text": {
                "encoder": dict(setup.text, num_hidden_layers=layers),
                "text_layers": list(range(setup.text_layers)),
                "fusion_layers": list(range(setup.text_layers, layers)),
                "max_length": setup.length,
            },
            "embed_dim": setup.embed_dim,
            "compile": compile_towers,
        },
    )


def host_batch(setup: Setup, view: str, size: int, seed: int = 0) -> dict:
    """A full-length batch in host memory, as the data pipeline delivers it (uint8 images, 40% MLM labels)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, setup.text["vocab_size"], (size, setup.length), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    mask = torch.ones_like(ids)
    pick = torch.rand(ids.shape, generator=g) < 0.4
    pick[:, 0] = pick[:, -1] = False
    batch = {
        "text_ids": ids,
        "text_mask": mask,
        "mlm_ids": ids.masked_fill(pick, 4),
        "mlm_labels": torch.where(pick, ids, torch.full_like(ids, -100)),
        "group_ids": torch.arange(size),
    }
    if view == "image":
        shape = (size, 3, setup.image_size, setup.image_size)
        batch["images"] = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    else:
        batch["other_ids"], batch["other_mask"] = ids.flip(0), mask.clone()
    return batch


class PlannedViews:
    """A batch source for the Trainer: ready host batches, the view of each step set by a plan (image-only,
    text-only, then alternating steps)."""

    views = VIEWS

    def __init__(self, plan: list[str]):
        self.plan = plan
        self.batches: dict[str, list[dict]] = {}
        self.drawn: Counter = Counter()

    def fill(self, setup: Setup, size: int) -> None:
        self.batches = {view: [host_batch(setup, view, size, seed) for seed in (0, 1)] for view in VIEWS}

    def view_for_step(self, step: int) -> str:
        return self.plan[min(step, len(self.plan) - 1)]

    def next_batch(self, view: str) -> dict:
        choices = self.batches[view]
        self.drawn[view] += 1
        return choices[self.drawn[view] % len(choices)]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def close(self) -> None:
        pass


def view_plan(log_every: int, modes: tuple[str, ...] = MODES) -> list[str]:
    """Two log intervals of steps per mode: image-only, text-only, alternating."""
    steps = 2 * log_every
    plans = {
        "image": ["image"] * steps,
        "text": ["text"] * steps,
        "alternate": [VIEWS[i % 2] for i in range(steps)],
    }
    return [view for mode in modes for view in plans[mode]]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------- batch size
def largest_batch(
    resident_bytes: float,
    bytes_per_sample: float,
    capacity_bytes: float,
    fraction: float = 0.85,
    multiple: int = 16,
    most: int = 4096,
) -> int:
    """The largest multiple of ``multiple`` (at least that, at most ``most``) whose forward+backward, at
    ``resident + per_sample * batch`` bytes, stays under ``fraction`` of the device's memory."""
    room = fraction * capacity_bytes - resident_bytes
    fits = int(room // max(bytes_per_sample, 1.0)) if room > 0 else 0
    return max(multiple, min(most, fits // multiple * multiple))


def measure_activation_memory(engine, setup: Setup, sizes=(16, 32)) -> tuple[float, float]:
    """(resident bytes, bytes per sample) of a forward+backward of the heavier view, from its peak memory at two
    batch sizes (real optimizer steps: the weights are random anyway)."""
    from cclm.runtime.env import to_device

    warm = to_device(host_batch(setup, "image", sizes[0]), setup.device)
    engine.backward(engine(warm, "image")["loss"])
    engine.step()  # the optimizer's states exist from the first step on: resident, not per sample
    del warm
    peaks = {}
    for view in VIEWS:
        for size in sizes:
            batch = to_device(host_batch(setup, view, size), setup.device)
            synchronize(setup.device)
            torch.cuda.reset_peak_memory_stats(setup.device)
            engine.backward(engine(batch, view)["loss"])
            synchronize(setup.device)
            peaks[view, size] = torch.cuda.max_memory_allocated(setup.device)
            engine.step()
    small, large = sizes
    per_sample = max((peaks[v, large] - peaks[v, small]) / (large - small) for v in VIEWS)
    resident = max(peaks[v, small] - per_sample * small for v in VIEWS)
    return resident, per_sample


# --------------------------------------------------------------------------------------------- ours
def build_trainer(
    setup: Setup, output_dir: Path, compile_towers: bool = False, modes: tuple[str, ...] = MODES
):
    from cclm.config import DeepSpeedConfig, OptimizerConfig, SchedulerConfig
    from cclm.model import CrossViewModel
    from cclm.runtime.env import init_distributed
    from cclm.runtime.trainer import LoopSettings, Trainer
    from cclm.train.flops import train_flops_per_sample

    env = init_distributed(setup.device)
    torch.manual_seed(0)
    model = CrossViewModel(model_config(setup, compile_towers), load_pretrained=False)
    # counted on the CPU before the engine moves the model, with the counter open_clip's step is counted with
    flops = {v: train_flops_per_sample(model, v, setup.length, setup.image_size) for v in VIEWS}
    source = PlannedViews(view_plan(setup.log_every, modes))
    loop = LoopSettings(
        max_steps=len(source.plan), log_every=setup.log_every, save_every=0, progress_bar=False
    )
    return Trainer(
        model,
        source,
        loop,
        env=env,
        optimizer_cfg=OptimizerConfig(),
        scheduler_cfg=SchedulerConfig(),
        deepspeed_cfg=DeepSpeedConfig(zero_stage=2, precision=setup.precision),
        # DeepSpeed only records the micro-batch (the largest that fits is measured on this engine)
        micro_batch=max(setup.fixed_batch, 1),
        output_dir=output_dir,
        flops_per_sample=flops,
    )


def release(trainer) -> None:
    trainer.close()
    if hasattr(trainer.engine, "destroy"):
        trainer.engine.destroy()
    trainer.engine = trainer.model = trainer.optimizer = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_ours(
    setup: Setup,
    work: Path,
    compile_towers: bool = False,
    batch_size: int = 0,
    modes: tuple[str, ...] = MODES,
) -> dict:
    """Throughput per mode from the Trainer's own log intervals; with a fresh batch search unless given."""
    name = "compiled" if compile_towers else "eager"
    trainer = build_trainer(setup, work / name, compile_towers, modes)
    try:
        memory = {}
        if not batch_size:
            batch_size = setup.fixed_batch
            if not batch_size:
                resident, per_sample = measure_activation_memory(trainer.engine, setup)
                capacity = torch.cuda.get_device_properties(setup.device).total_memory
                batch_size = largest_batch(resident, per_sample, capacity)
                memory = {"resident_mib": resident / 2**20, "activation_mib_per_sample": per_sample / 2**20}
        trainer.source.fill(setup, batch_size)
        start = time.perf_counter()
        trainer.run()
        seconds = time.perf_counter() - start
        records = {
            r["step"]: r for r in map(json.loads, (work / name / "metrics.jsonl").read_text().splitlines())
        }
        per_mode = {}
        for i, mode in enumerate(modes):
            record = records[(2 * i + 2) * setup.log_every]
            per_mode[mode] = {
                "samples_per_s": record["samples_per_s"],
                "tokens_per_s": record["tokens_per_s"],
                "mfu": record.get("mfu"),
                "data_wait_frac": record["data_wait_frac"],
            }
        result = {
            "batch_per_view": batch_size,
            **memory,
            "modes": per_mode,
            "run_seconds": seconds,
            # one full-length sample (the MFU above charges each batch at its shapes: these are all full length)
            "flops_per_sample": {view: float(f) for view, f in trainer.flops_per_sample.items()},
        }
        if not compile_towers:
            result["phases_ms"] = phase_breakdown(trainer, setup.timed_steps)
            result["synchronising_ops_per_step"] = synchronising_ops(trainer)
        return result
    finally:
        release(trainer)


def phase_breakdown(trainer, steps: int) -> dict[str, float]:
    """Median ms per phase of alternating steps, the device synchronised at each phase boundary."""
    from cclm.runtime.env import to_device
    from cclm.runtime.trainer import IntervalStats

    engine, source, device = trainer.engine, trainer.source, trainer.env.device
    phases: dict[str, list[float]] = defaultdict(list)
    stats = IntervalStats()
    for i in range(max(steps, 2)):
        view = VIEWS[i % 2]
        marks = [time.perf_counter()]
        batch = to_device(source.next_batch(view), device)
        synchronize(device)
        marks.append(time.perf_counter())
        out = engine(batch, view)
        synchronize(device)
        marks.append(time.perf_counter())
        engine.backward(out["loss"])
        synchronize(device)
        marks.append(time.perf_counter())
        engine.step()
        synchronize(device)
        marks.append(time.perf_counter())
        for key, value in out.items():
            stats.add_loss(f"{view}/{key}", value)
        stats.loss_means(device)[1].tolist()  # what a log step reads; the one host sync of the loop
        marks.append(time.perf_counter())
        for phase, begin, end in zip(
            ("data", "forward", "backward", "optimizer", "host_sync"), marks, marks[1:]
        ):
            phases[phase].append(1000 * (end - begin))
    return {phase: statistics.median(ms) for phase, ms in phases.items()}


def synchronising_ops(trainer) -> dict[str, int] | None:
    """Operations that made the host wait during one Trainer step, by source line (CUDA only)."""
    from cclm.runtime.trainer import IntervalStats

    if trainer.env.device.type != "cuda":
        return None
    synchronize(trainer.env.device)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train_step(IntervalStats())
    finally:
        torch.cuda.set_sync_debug_mode(0)
    lines = Counter(
        f"{_short(w.filename)}:{w.lineno}" for w in caught if "synchroniz" in str(w.message).lower()
    )
    return dict(lines.most_common())


def _short(filename: str) -> str:
    for marker in ("site-packages/", "dist-packages/", str(REPO) + "/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


# ----------------------------------------------------------------------------------------- open_clip
def open_clip_model(setup: Setup, folder: Path):
    """open_clip's CLIP with our towers' shapes: the same vision config, an HF XLM-R text tower with as many
    layers as our text stack (CLS pooling, linear projection)."""
    import open_clip
    from open_clip.loss import ClipLoss
    from transformers import XLMRobertaConfig

    XLMRobertaConfig(**dict(setup.text, num_hidden_layers=setup.text_layers)).save_pretrained(folder)
    text_cfg = {
        "hf_model_name": str(folder),
        "hf_model_pretrained": False,
        "hf_pooler_type": "cls_pooler",
        "hf_proj_type": "linear",
        "context_length": setup.length,
        "vocab_size": setup.text["vocab_size"],
    }
    return open_clip.model.CustomTextCLIP(setup.embed_dim, dict(setup.vision), text_cfg), ClipLoss()


def bench_open_clip(setup: Setup, batch_size: int, work: Path) -> dict:
    """open_clip's training step at ``batch_size`` (halved while it does not fit)."""
    from cclm.runtime.flops import peak_flops

    torch.manual_seed(0)
    model, clip_loss = open_clip_model(setup, work / "open_clip_text")
    model.train()
    flops_per_sample = open_clip_flops_per_sample(model, clip_loss, setup)
    model.to(setup.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=setup.is_cuda or None)
    while True:
        try:
            seconds = time_open_clip_steps(model, clip_loss, optimizer, setup, batch_size)
            break
        except torch.cuda.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            if batch_size <= 16:
                raise
            batch_size //= 2
    peak = peak_flops(setup.device)
    return {
        "batch": batch_size,
        "samples_per_s": batch_size / seconds,
        "tokens_per_s": batch_size * setup.length / seconds,
        "mfu": flops_per_sample * batch_size / seconds / peak if peak else None,
        "flops_per_sample": flops_per_sample,
    }


def open_clip_flops_per_sample(model, clip_loss, setup: Setup) -> float:
    """Training FLOPs per sample of open_clip's step (3x the forward), counted as ours are
    (:func:`cclm.train.flops.count_flops`, the same counter on the same device, the CPU, before the model moves:
    attention counted alike on both sides)."""
    from cclm.train.flops import TRAIN_FACTOR, count_flops

    first = next(model.parameters())
    if first.device.type != "cpu":
        raise ValueError("count open_clip's FLOPs on the CPU, as ours are, before moving it to the device")
    inputs = open_clip_inputs(setup, 2, torch.device("cpu"))
    return TRAIN_FACTOR * count_flops(lambda: open_clip_loss(model, clip_loss, setup, *inputs)) / 2


def open_clip_inputs(
    setup: Setup, size: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised float images, token ids) on the device: open_clip's loaders deliver normalised floats."""
    from cclm.model.vision import CLIP_MEAN, CLIP_STD

    host = host_batch(setup, "image", size)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    images = (host["images"].float() / 255 - mean) / std
    device = setup.device if device is None else device
    return images.to(device), host["text_ids"].to(device)


def open_clip_loss(model, clip_loss, setup: Setup, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    from cclm.runtime.env import autocast

    with autocast(setup.device, setup.precision):
        image_feats = model.encode_image(images, normalize=True)
        text_feats = model.encode_text(ids, normalize=True)
        return clip_loss(image_feats, text_feats, model.logit_scale.exp())


def time_open_clip_steps(model, clip_loss, optimizer, setup: Setup, batch_size: int) -> float:
    """Seconds per training step, after 3 warm-up steps."""
    images, ids = open_clip_inputs(setup, batch_size)

    def step() -> None:
        open_clip_loss(model, clip_loss, setup, images, ids).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    synchronize(setup.device)
    start = time.perf_counter()
    for _ in range(setup.timed_steps):
        step()
    synchronize(setup.device)
    return (time.perf_counter() - start) / setup.timed_steps


# ------------------------------------------------------------------------------------------------- report
def fmt_mode(mode: dict) -> str:
    mfu = f"MFU {mode['mfu']:.1%}" if mode.get("mfu") is not None else "MFU not measured (no GPU)"
    return f"{mode['samples_per_s']:.0f} samples/s, {mode['tokens_per_s']:.0f} tokens/s, {mfu}"


def summary_line(result: dict) -> str:
    ours, peer = result["ours"], result["open_clip"]
    modes = "; ".join(f"{m} {fmt_mode(ours['modes'][m])}" for m in MODES)
    compiled = result.get("compiled")
    if compiled and "modes" in compiled:
        compiled_text = "; ".join(f"{m} {fmt_mode(figures)}" for m, figures in compiled["modes"].items())
    else:
        compiled_text = "not measured" + (f" ({compiled['skipped']})" if compiled else "")
    phases = ", ".join(f"{k} {v:.1f}" for k, v in ours["phases_ms"].items())
    syncs = ours.get("synchronising_ops_per_step")
    sync_text = (
        "not counted (CUDA only)"
        if syncs is None
        else f"{sum(syncs.values())} ({', '.join(f'{k} x{n}' for k, n in list(syncs.items())[:4]) or 'none'})"
    )
    return (
        f"- {result['date']} bench-gpu on {result['device_name']} ({result['machine']}): {result['shapes']}, "
        f"{result['precision']}, ZeRO-2, batch {ours['batch_per_view']} per view: {modes} (target MFU >= 45%); "
        f"compiled towers (model.compile): {compiled_text}; open_clip CLIP step, same towers, batch "
        f"{peer['batch']}: {fmt_mode(peer)}; phases of our step, ms, synchronised: {phases}; synchronising "
        f"operations in one step: {sync_text}; smoke test: {result['smoke']}"
    )


def bench_compiled(setup: Setup, work: Path, batch_size: int, args, started: float) -> dict:
    """Alternating steps with compiled towers at our batch, within what is left of the time budget."""
    wanted = args.compile == "yes" or (args.compile == "auto" and setup.is_cuda and setup.name == "base")
    left = args.budget_s - (time.monotonic() - started)
    if not wanted:
        return {"skipped": "not asked for" if args.compile == "no" else "CPU or tiny run"}
    if args.compile == "auto" and left < COMPILE_LEAST_S:
        return {"skipped": f"time budget: {left:.0f} s left, {COMPILE_LEAST_S} s needed"}
    begun = time.monotonic()
    try:
        with time_limit(left if args.compile == "auto" else None):
            return bench_ours(setup, work, compile_towers=True, batch_size=batch_size, modes=("alternate",))
    except OutOfTime:
        return {"skipped": f"stopped at the end of the time budget, after {time.monotonic() - begun:.0f} s"}
    except Exception as err:  # the eager figures stand; the smoke test says whether compiling itself works
        return {
            "skipped": f"failed after {time.monotonic() - begun:.0f} s: {type(err).__name__}: {err}"[:300]
        }


class OutOfTime(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise :class:`OutOfTime` in the main thread after ``seconds`` (None: no limit)."""
    if seconds is None:
        yield
        return

    def stop(signum, frame):
        raise OutOfTime

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(max(1, int(seconds)))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


SECTION = "## GPU training step (`make bench-gpu`)"


def append_results(line: str, results_md: Path) -> None:
    """Add ``line`` at the end of this benchmark's section of RESULTS.md (made at the file's end if missing)."""
    append_to_section(results_md, SECTION, line + "\n", match="## GPU training step")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="the tiny model (the default without CUDA)")
    parser.add_argument("--budget-s", type=float, default=330.0, help="skip the compiled run past this")
    parser.add_argument("--compile", choices=("auto", "yes", "no"), default="auto", help="auto: on a GPU")
    parser.add_argument("--smoke", default="not run", help="the GPU smoke test's summary, for the record")
    parser.add_argument(
        "--out", help="JSON results (default benchmarks/results/gpu.json, tiny: benchmarks/work/)"
    )
    parser.add_argument("--results-md", default=str(HERE / "RESULTS.md"))
    parser.add_argument("--copy-to", help="also copy the JSON and the summary line into this folder")
    args = parser.parse_args(argv)
    started = time.monotonic()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    tiny = args.tiny or not cuda
    if not cuda:
        torch.set_num_threads(1)  # a tiny model trains fastest single-threaded, more so on a shared machine
    setup = tiny_setup(device) if tiny else base_setup(device)
    out = Path(args.out or (HERE / "work" / "gpu_tiny.json" if tiny else HERE / "results" / "gpu.json"))
    result: dict = {
        "date": str(datetime.date.today()),
        "device_name": torch.cuda.get_device_name(device)
        if cuda
        else "CPU (no GPU: GPU figures not measured)",
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}",
        "setup": setup.name,
        "shapes": (
            "tiny model"
            if tiny
            else "base model (ViT-B/16 224 px + 6+6 XLM-R-large-width layers, 40 tokens, ITC+ITM+MLM)"
        ),
        "precision": setup.precision,
        "smoke": args.smoke,
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        result["ours"] = bench_ours(setup, work)
        print("ours:", json.dumps(result["ours"]), flush=True)
        result["open_clip"] = bench_open_clip(setup, result["ours"]["batch_per_view"], work)
        print("open_clip:", json.dumps(result["open_clip"]), flush=True)
        result["compiled"] = bench_compiled(setup, work, result["ours"]["batch_per_view"], args, started)
        print("compiled:", json.dumps(result["compiled"]), flush=True)
    result["seconds"] = time.monotonic() - started
    line = summary_line(result)
    appended = cuda and not tiny
    result["appended_to_results_md"] = appended
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if appended:
        append_results(line, Path(args.results_md))
    if args.copy_to:
        Path(args.copy_to).mkdir(parents=True, exist_ok=True)
        shutil.copy(out, Path(args.copy_to) / out.name)
        (Path(args.copy_to) / "bench_gpu_line.md").write_text(line + "\n")
    print(line if appended else f"(not appended to RESULTS.md: {'tiny run' if cuda else 'no GPU'}) {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
