"""What README and docs promise about ZeRO-Offload of the optimizer (``deepspeed.offload_optimizer=true``,
``deepspeed.config_file=configs/deepspeed/zero3_offload.json``): it trains, in pretraining and fine-tuning, and
makes the updates of the run without offload; DeepSpeed's CPU Adam steps it where its op loads, cclm's AdamW (with
one warning) where it does not; a resume restores the optimizer state exactly, whichever of the two saved it.
It used to crash at start: DeepSpeed refuses a client torch AdamW under offload."""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cclm.config import ConfigError, DeepSpeedConfig, ModelConfig, load_config
from cclm.model.cross_view import CrossViewModel
from cclm.runtime import engine, optim
from cclm.runtime.checkpoint import FP32_WEIGHTS
from cclm.runtime.env import init_distributed
from cclm.runtime.sources import EpochBatches
from cclm.tasks import finetune
from cclm.tasks.task_model import TaskModel

from ..conftest import REPO
from ..pretrain_runs import metrics, overrides, run_pretrain, small_world

pytestmark = pytest.mark.usefixtures("one_thread")

LOADING = "deepspeed.offload_optimizer: loading DeepSpeed's CPU Adam"
LR = 2e-3  # pretraining runs (tests.pretrain_runs.overrides)
SLOWER = "stepping torch's AdamW on the CPU instead, the slower path"


@pytest.fixture(scope="module")
def cpu_adam():
    """DeepSpeed's CPU Adam op (compiled once into TORCH_EXTENSIONS_DIR on a machine that has not built it)."""
    from deepspeed.ops.op_builder import CPUAdamBuilder

    try:
        CPUAdamBuilder().load(verbose=False)
    except Exception as err:  # no compiler, no ninja
        pytest.skip(f"DeepSpeed's CPU Adam cannot load here ({err}); the AdamW path is tested without it")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return small_world(tmp_path_factory.mktemp("offload") / "world")


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{step:08d}" / FP32_WEIGHTS))


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_same_weights(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], lr: float) -> None:
    """The same AdamW update up to float rounding: DeepSpeed's CPU Adam rounds otherwise than torch's, and Adam
    turns that into a visible difference only where a gradient is noise-sized (its step is m / (sqrt(v) + eps)):
    every weight within a tenth of the learning rate, 99% of them within 1e-6."""
    assert largest_difference(expected, got) < 0.1 * lr
    apart = sum(((expected[k] - got[k]).abs() > 1e-6).sum().item() for k in expected)
    assert apart < 0.01 * sum(v.numel() for v in expected.values())


def assert_same_updates(reference: Path, offloaded: Path, steps: int, lr: float) -> None:
    """Every step changed the weights, and the offloaded run's are the reference run's (:func:`assert_same_weights`)."""
    for step in range(1, steps + 1):
        if step > 1:
            assert largest_difference(weights(reference, step - 1), weights(reference, step)) > 0.1 * lr
            assert largest_difference(weights(offloaded, step - 1), weights(offloaded, step)) > 0.1 * lr
        assert_same_weights(weights(reference, step), weights(offloaded, step), lr)


# ------------------------------------------------------------------------------------------------ pretraining
def test_offloaded_pretraining_makes_the_updates_of_the_run_without_offload_and_resumes_exactly(
    world, tmp_path, cpu_adam
):
    common = {"train.max_steps": 3, "train.save_every": 1, "data.num_workers": 0, "deepspeed.zero_stage": 2}
    plain, offloaded = tmp_path / "plain", tmp_path / "offload"
    run_pretrain(1, overrides(world, plain, **common))
    offload = {**common, "deepspeed.offload_optimizer": "true"}
    proc = run_pretrain(1, overrides(world, offloaded, **offload))
    assert LOADING in proc.stderr and "cannot load" not in proc.stderr  # DeepSpeed's CPU Adam stepped it
    losses = [row["loss"] for row in metrics(offloaded)]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert losses == pytest.approx([row["loss"] for row in metrics(plain)], abs=1e-4)
    assert_same_updates(plain, offloaded, 3, LR)

    # resume from step 1: the optimizer state (moments, step count) comes back, so steps 2-3 are the same bits
    resumed = tmp_path / "resumed"
    shutil.copytree(offloaded / "checkpoints" / "step_00000001", resumed / "checkpoints" / "step_00000001")
    run_pretrain(1, overrides(world, resumed, **offload, resume="auto"))
    assert [row["loss"] for row in metrics(resumed)] == losses[1:]
    for step in (2, 3):
        got, expected = weights(resumed, step), weights(offloaded, step)
        assert all(torch.equal(got[k], expected[k]) for k in expected), step


def test_the_shipped_zero3_offload_file_trains_as_zero3_without_offload(world, tmp_path):
    """README's only JSON example: ZeRO-3 with optimizer and parameters offloaded, bf16."""

    def run(name: str, file: str) -> Path:
        out = tmp_path / name
        settings = {
            "train.max_steps": 2,
            "train.save_every": 1,
            "data.num_workers": 0,
            "deepspeed.zero_stage": "null",
            "deepspeed.precision": "null",
            "deepspeed.config_file": str(REPO / "configs" / "deepspeed" / file),
        }
        run_pretrain(1, overrides(world, out, **settings))
        return out

    plain, offloaded = run("zero3", "zero3.json"), run("zero3_offload", "zero3_offload.json")
    losses = [row["loss"] for row in metrics(offloaded)]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert losses == pytest.approx([row["loss"] for row in metrics(plain)], abs=1e-3)
    assert_same_updates(plain, offloaded, 2, LR)


# ------------------------------------------------------------------------------------------------ fine-tuning
@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory, tiny_tokenizer):
    cfg = load_config(ModelConfig, REPO / "configs" / "model" / "tiny.yaml")
    cfg.text.encoder["vocab_size"] = len(tiny_tokenizer)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("pretrained")
    CrossViewModel(cfg).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(str(folder))
    return folder


def xvnli_batches() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        {
            "images": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=generator),
            "text_ids": torch.randint(5, 50, (4, 6), generator=generator),
            "text_mask": torch.ones(4, 6, dtype=torch.long),
            "labels": torch.tensor([0, 1, 2, 1]),
        }
        for _ in range(2)
    ]


def fine_tune(pretrained_dir: Path, out: Path, monkeypatch, **deepspeed) -> tuple[dict, list[str]]:
    """Three steps of XVNLI fine-tuning (the head at 5x the learning rate: two multipliers, two decay groups);
    returns the trained weights and the names of the optimizers the engine was given."""
    built = []

    def spy(*args, **kwargs):
        optimizer = build_optimizer(*args, **kwargs)
        built.append(type(optimizer).__name__)
        return optimizer

    build_optimizer = engine.build_optimizer
    monkeypatch.setattr(engine, "build_optimizer", spy)
    torch.manual_seed(0)
    model = TaskModel(
        CrossViewModel.from_pretrained(pretrained_dir),
        "xvnli",
        "single",
        ["contradiction", "neutral", "entailment"],
    )
    scores = iter(range(10))
    trained, _ = finetune.finetune(
        model,
        EpochBatches(xvnli_batches(), 1, lambda items: items[0], seed=0),
        lambda m: float(next(scores)),  # each evaluation better: the last weights are kept
        finetune.FinetuneSettings(lr=1e-3, epochs=2, head_lr_mult=5.0, warmup_ratio=0.0),
        env=init_distributed("cpu"),
        output_dir=out,
        deepspeed_cfg=DeepSpeedConfig(**deepspeed),
    )
    monkeypatch.setattr(engine, "build_optimizer", build_optimizer)
    return {k: v.detach().float().clone() for k, v in trained.state_dict().items()}, built


def initial_backbone(pretrained_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in CrossViewModel.from_pretrained(pretrained_dir).state_dict().items()}


def test_offloaded_fine_tuning_steps_deepspeeds_cpu_adam_as_adamw_without_offload(
    pretrained_dir, tmp_path, monkeypatch, cpu_adam
):
    plain, built = fine_tune(pretrained_dir, tmp_path / "plain", monkeypatch, zero_stage=2)
    assert built == ["AdamW"]
    offloaded, built = fine_tune(
        pretrained_dir, tmp_path / "offload", monkeypatch, zero_stage=2, offload_optimizer=True
    )
    assert built == ["DeepSpeedCPUAdam"]
    initial = initial_backbone(pretrained_dir)
    moved = [k for k in initial if not torch.equal(initial[k], offloaded[f"backbone.{k}"])]
    assert len(moved) > len(initial) // 2, "fine-tuning moved the weights"
    assert_same_weights(plain, offloaded, lr=1e-3)


def test_offloaded_fine_tuning_steps_adamw_with_one_warning_where_cpu_adam_cannot_load(
    pretrained_dir, tmp_path, monkeypatch, caplog
):
    """No C++ compiler or no ninja: cclm's own AdamW steps on the CPU (DeepSpeed is told it may), the same
    updates as without offload, and one line says that this is the slower path."""
    plain, _ = fine_tune(pretrained_dir, tmp_path / "plain", monkeypatch, zero_stage=2)
    monkeypatch.setattr(
        engine, "cpu_adam_unavailable", lambda: "RuntimeError: no C++ compiler", raising=False
    )
    with caplog.at_level(logging.WARNING, logger="cclm.runtime.engine"):
        fallback, built = fine_tune(
            pretrained_dir, tmp_path / "fallback", monkeypatch, zero_stage=2, offload_optimizer=True
        )
    assert built == ["AdamW"]
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == "cclm.runtime.engine" and r.levelno >= logging.WARNING
    ]
    assert len(warnings) == 1 and "(RuntimeError: no C++ compiler)" in warnings[0] and SLOWER in warnings[0]
    assert "\n" not in warnings[0]
    initial = initial_backbone(pretrained_dir)
    moved = [k for k in initial if not torch.equal(initial[k], fallback[f"backbone.{k}"])]
    assert len(moved) > len(initial) // 2, "fine-tuning moved the weights"
    assert all(torch.equal(fallback[k], plain[k]) for k in plain), "the same AdamW, offloaded or not"


def test_a_file_that_allows_only_deepspeeds_cpu_optimizer_is_refused_where_it_cannot_load(
    pretrained_dir, tmp_path, monkeypatch
):
    file = tmp_path / "ds.json"
    file.write_text(json.dumps({"zero_optimization": {"stage": 2}, "zero_force_ds_cpu_optimizer": True}))
    monkeypatch.setattr(
        engine, "cpu_adam_unavailable", lambda: "RuntimeError: no C++ compiler", raising=False
    )
    with pytest.raises(ConfigError, match=r"zero_force_ds_cpu_optimizer: true .*no C\+\+ compiler"):
        fine_tune(
            pretrained_dir, tmp_path / "run", monkeypatch, config_file=str(file), offload_optimizer=True
        )
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("saved_by, resumed_by", [("adamw", "cpu_adam"), ("cpu_adam", "adamw")])
def test_optimizer_state_resumes_under_the_other_adamw(saved_by, resumed_by, cpu_adam):
    """A run saved where DeepSpeed's CPU Adam loaded and resumed where it does not (or the other way round, or
    with offload switched) continues its moments and step count: the same update as the uninterrupted run. It
    failed on the missing ``bias_correction`` or kept counting from the saved step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3))
    options = {"lr": 2e-3, "weight_decay": 0.05, "lr_mults": {"2.weight": 5.0}}
    first = optim.build_optimizer(model, cpu_adam=saved_by == "cpu_adam", **options)
    inputs = [torch.randn(8, 16) for _ in range(6)]

    def step(module, optimizer, x):
        optimizer.zero_grad()
        module(x).pow(2).mean().backward()
        optimizer.step()

    for x in inputs[:3]:
        step(model, first, x)
    other = copy.deepcopy(model)
    second = optim.build_optimizer(other, cpu_adam=resumed_by == "cpu_adam", **options)
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    for x in inputs[3:]:
        step(model, first, x)
        step(other, second, x)
    assert max((p - q).abs().max().item() for p, q in zip(model.parameters(), other.parameters())) < 1e-6
    steps = {float(state["step"]) for state in second.state.values()}
    assert steps == {6.0}


def test_the_documented_stop_command_signals_the_trainers_not_the_deepspeed_launcher(tmp_path):
    """docs/launch.md's pkill pattern: it matched the DeepSpeed launcher too (``--module cclm.train.cli``),
    which does not catch SIGUSR1 and died, leaving its processes saving unwatched."""
    import re
    import subprocess
    import sys

    (pattern,) = re.findall(r"`pkill -USR1 -f -- '([^']+)'`", (REPO / "docs" / "launch.md").read_text())
    sleep = "import time; time.sleep(60)"
    marker = f"run-{tmp_path.name}"  # only this test's processes
    launcher = subprocess.Popen([sys.executable, "-c", sleep, "--module", "cclm.train.cli", marker])
    trainer = subprocess.Popen([sys.executable, "-u", "-c", sleep, "-m", "cclm.train.cli", marker])
    try:
        found = subprocess.run(["pgrep", "-f", "--", pattern], capture_output=True, text=True).stdout.split()
        ours = {int(pid) for pid in found} & {launcher.pid, trainer.pid}
        assert ours == {trainer.pid}
    finally:
        for process in (launcher, trainer):
            process.kill()
            process.wait()
