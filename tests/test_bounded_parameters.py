"""A learnable temperature clamped in place (CCLM's ``temp``, the CLIP recipe's logit scale) stays within its
bounds under every ZeRO stage and precision. ZeRO and bf16 keep an fp32 copy of each parameter in the optimizer
and rewrite the model's parameter from it at every update, so a clamp of the model's parameter alone was undone:
the optimizer's value drifted past the bound (to 2.3 for a bound of 0.5 in 8 steps here) and a gradient that
turned would have taken as many steps to bring it back. The trainer now clamps both after each update
(``bounded_parameters`` / :func:`cclm.runtime.optim.clamp_bounded`): every stage then trains as ZeRO-0 in fp32,
the reference's single clamped parameter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from cclm.config import DeepSpeedConfig, OptimizerConfig, Precision, SchedulerConfig
from cclm.runtime.env import init_distributed, seed_everything
from cclm.runtime.sources import EpochBatches
from cclm.runtime.trainer import LoopSettings, Trainer
from tests.faults.toy_run import _collate, _examples

LOW, HIGH = 0.001, 0.5


class Tempered(nn.Module):
    """A regression plus a term that pushes the temperature up for 5 steps, then pulls it down."""

    def __init__(self):
        super().__init__()
        self.temp = nn.Parameter(torch.tensor([0.07]))
        self.linear = nn.Linear(4, 1)
        self.seen: list[float] = []  # the temperature each forward finds, before its own clamp

    def bounded_parameters(self):
        return [(self.temp, LOW, HIGH)]

    def forward(self, batch, view):
        self.seen.append(float(self.temp.detach().float()))
        with torch.no_grad():
            self.temp.clamp_(LOW, HIGH)
        temp = self.temp.squeeze(0).clone().float()
        direction = -1.0 if len(self.seen) <= 5 else 1.0
        x = batch["x"].to(self.linear.weight.dtype)
        fit = nn.functional.mse_loss(self.linear(x).squeeze(1).float(), batch["y"])
        return {"loss": fit + direction * 10 * temp}


def run(tmp_path, stage: int, precision: Precision) -> tuple[list[float], float]:
    env = init_distributed("cpu")
    seed_everything(0)
    model = Tempered()
    trainer = Trainer(
        model,
        EpochBatches(_examples(), 8, _collate, seed=0),
        LoopSettings(max_steps=16, save_every=0, progress_bar=False, log_every=8),
        env=env,
        optimizer_cfg=OptimizerConfig(lr=0.5),
        scheduler_cfg=SchedulerConfig(),
        deepspeed_cfg=DeepSpeedConfig(zero_stage=stage, precision=precision),
        micro_batch=8,
        output_dir=tmp_path / f"zero{stage}-{precision.value}",
        run_config={},
    )
    trainer.run()
    from deepspeed.utils import safe_get_full_fp32_param

    from cclm.runtime.optim import _fp32_copy

    param = trainer.engine.module.temp
    master = safe_get_full_fp32_param(param)
    if master is None:  # DeepSpeed's bf16 optimizer without ZeRO
        master = _fp32_copy(trainer.engine.optimizer, param)
    trainer.close()
    return trainer.engine.module.seen, float((master if master is not None else param.detach()).float())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return run(tmp_path_factory.mktemp("zero0"), 0, Precision.fp32)


@pytest.mark.parametrize(
    ("stage", "precision"),
    [(0, Precision.fp32), (2, Precision.fp32), (3, Precision.fp32), (0, Precision.bf16), (2, Precision.bf16)],
)
def test_a_clamped_temperature_stays_in_bounds_and_comes_back_at_once(tmp_path, reference, stage, precision):
    seen, optimizer_value = run(tmp_path, stage, precision)
    assert max(seen) <= HIGH and LOW <= optimizer_value <= HIGH
    assert seen[2:6] == [pytest.approx(HIGH)] * 4  # pushed up: held at the bound
    assert seen[-1] < 0.9 * HIGH  # pulled down: back inside within the run
    if precision == Precision.fp32:  # every stage trains as the reference's single clamped fp32 parameter
        assert seen == pytest.approx(reference[0], abs=1e-6)
        assert optimizer_value == pytest.approx(reference[1], abs=1e-6)


def test_the_fp32_copy_of_a_parameter_is_found_among_the_optimizers_groups():
    """DeepSpeed's fp16-style optimizer (bf16 without ZeRO) keeps one fp32 tensor per parameter, group by group:
    a clamp reaches the bounded parameter's copy and no other."""
    from types import SimpleNamespace

    from cclm.runtime.optim import _fp32_copy, clamp_bounded

    weight, temp, bias = (
        nn.Parameter(torch.zeros(2, 3)),
        nn.Parameter(torch.zeros(1)),
        nn.Parameter(torch.zeros(4)),
    )
    copies = [torch.full((2, 3), 2.0), torch.full((1,), 2.0), torch.full((4,), 2.0)]
    optimizer = SimpleNamespace(fp16_groups=[[weight], [temp, bias]], fp32_groups=[copies[:1], copies[1:]])
    assert _fp32_copy(optimizer, temp) is copies[1] and _fp32_copy(optimizer, bias) is copies[2]
    assert _fp32_copy(optimizer, nn.Parameter(torch.zeros(1))) is None
    assert _fp32_copy(SimpleNamespace(), temp) is None  # a plain torch optimizer
    clamp_bounded([(temp, 0.0, 0.5)], optimizer)
    assert [c.max().item() for c in copies] == [2.0, 0.5, 2.0]


def test_two_ranks_under_zero3_clamp_their_own_shards_and_train_as_one(tmp_path, reference):
    """Under ZeRO-3 each rank holds a shard of the temperature and of its fp32 copy (rank 1's is padding for a
    one-element parameter): each clamps its own, with no collective, and both end where ZeRO-0 on one process
    does."""
    from cclm.train.launch import local_torchrun_command

    from .pretrain_runs import quiet_env

    command = local_torchrun_command(2, "-m", "tests.test_bounded_parameters", str(tmp_path), "3", "fp32")
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run(command, cwd=repo, env=quiet_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in range(2):
        seen, optimizer_value = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen == pytest.approx(reference[0], abs=1e-6)
        assert optimizer_value == pytest.approx(reference[1], abs=1e-6)


if (
    __name__ == "__main__"
):  # one rank of the two-rank test: python -m torch.distributed.run ... OUT STAGE PRECISION
    out, stage, precision = Path(sys.argv[1]), int(sys.argv[2]), Precision(sys.argv[3])
    result = run(out, stage, precision)
    rank = torch.distributed.get_rank()
    (out / f"rank{rank}.json").write_text(json.dumps(result))
