"""The training loop never waits for the accelerator between log steps (issue 16): a loss read on the host
(``.item()``, ``float()``, ``.tolist()``, ``.cpu()``) forces the host to wait for every kernel queued so far.

No GPU here, so the test follows the values instead of the device: the toy model's losses are a tensor subclass
that records every host read of itself or of anything computed from it. Reads may happen at log steps only, and
the logged means must equal what reading every loss with ``.item()`` gave before (computed here directly)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from cclm.config import DeepSpeedConfig, OptimizerConfig, SchedulerConfig, ViewSchedule
from cclm.runtime import trainer as trainer_module
from cclm.runtime.env import init_distributed, seed_everything
from cclm.runtime.trainer import LoopSettings, Trainer

HOST_READS = {"item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__"}
READS: list[str] = []


class Tracked(torch.Tensor):
    """A tensor that records host reads of itself and of every tensor computed from it."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            READS.append(name)
        return super().__torch_function__(func, types, args, kwargs or {})


class TwoLosses(nn.Module):
    """A regression with two named losses; keeps every loss it returns (on the device, unread) for the check.
    ``tracked``: the losses are :class:`Tracked` (plain tensors for CUDA's sync debug mode, which would name the
    subclass's own frame as the reader)."""

    def __init__(self, tracked: bool = True):
        super().__init__()
        self.linear = nn.Linear(4, 1)
        self.tracked = tracked
        self.returned: list[tuple[str, dict[str, torch.Tensor]]] = []

    def forward(self, batch, view):
        pred = self.linear(batch["x"]).squeeze(1)
        mse = nn.functional.mse_loss(pred, batch["y"])
        size = pred.abs().mean()
        out = {"mse": mse, "size": size, "loss": mse + 0.1 * size}
        self.returned.append((view, {k: v.detach().clone() for k, v in out.items()}))
        return {k: v.as_subclass(Tracked) for k, v in out.items()} if self.tracked else out


class TwoViewSource:
    """Endless random batches of two views, with a token mask as the real batches have."""

    views = ("a", "b")

    def __init__(self):
        self.drawn = 0

    def view_for_step(self, step: int) -> str:
        return self.views[step % 2]

    def next_batch(self, view: str) -> dict:
        g = torch.Generator().manual_seed(self.drawn)
        self.drawn += 1
        x = torch.randn(8, 4, generator=g)
        return {"x": x, "y": x.sum(1) + (1.0 if view == "a" else -1.0), "text_mask": torch.ones(8, 5)}

    def state_dict(self):
        return {"drawn": self.drawn}

    def load_state_dict(self, state):
        self.drawn = state["drawn"]

    def close(self):
        pass


@pytest.mark.parametrize(
    "schedule, grad_accum", [(ViewSchedule.sum, 2), (ViewSchedule.alternate, 1)], ids=["sum", "alternate"]
)
def test_no_host_reads_between_log_steps(tmp_path, monkeypatch, schedule, grad_accum):
    env = init_distributed("cpu")
    seed_everything(0)
    model = TwoLosses()
    loop = LoopSettings(
        max_steps=6,
        log_every=3,
        save_every=0,
        grad_accum=grad_accum,
        view_schedule=schedule,
        progress_bar=False,
    )
    trainer = Trainer(
        model,
        TwoViewSource(),
        loop,
        env=env,
        optimizer_cfg=OptimizerConfig(lr=0.05),
        scheduler_cfg=SchedulerConfig(),
        deepspeed_cfg=DeepSpeedConfig(zero_stage=0),
        micro_batch=8,
        output_dir=tmp_path / "run",
    )
    reads_per_phase: list[tuple[str, int, int]] = []

    def watched(method, phase):
        def call(self, *args, **kwargs):
            before = len(READS)
            result = method(self, *args, **kwargs)
            reads_per_phase.append((phase, self.step, len(READS) - before))
            return result

        return call

    monkeypatch.setattr(Trainer, "train_step", watched(trainer_module.Trainer.train_step, "step"))
    monkeypatch.setattr(Trainer, "_scalars", watched(trainer_module.Trainer._scalars, "log"))
    trainer.run()
    trainer.close()

    steps = [(step, reads) for phase, step, reads in reads_per_phase if phase == "step"]
    logs = [(step, reads) for phase, step, reads in reads_per_phase if phase == "log"]
    assert [s for s, _ in steps] == [1, 2, 3, 4, 5, 6]
    assert all(reads == 0 for _, reads in steps), steps
    assert [s for s, _ in logs] == [3, 6] and all(reads > 0 for _, reads in logs), logs  # the counter counts

    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [
        {**record, **expected} for record, expected in zip(logged, _reference(model.returned, loop))
    ]


def _reference(returned, loop: LoopSettings) -> list[dict[str, float]]:
    """Interval means as the loop computed them before, reading each loss with ``.item()`` when it came: every
    ``<view>/<name>`` over its micro-steps, and ``loss`` as the mean over micro-steps of the step's summed view
    losses (the step's loss, whatever ``grad_accum``: it is not divided by it)."""
    views_per_micro_step = 2 if loop.view_schedule == ViewSchedule.sum else 1
    per_interval = loop.log_every * loop.grad_accum * views_per_micro_step
    intervals = []
    for first in range(0, len(returned), per_interval):
        interval = returned[first : first + per_interval]
        read: list[tuple[str, float]] = []
        for start in range(0, len(interval), views_per_micro_step):
            total = 0.0
            for view, losses in interval[start : start + views_per_micro_step]:
                read += [(f"{view}/{name}", value.float().item()) for name, value in losses.items()]
                total = total + losses["loss"]
            read.append(("loss", total.float().item()))
        intervals.append(_means(read))
    assert len(intervals) == loop.max_steps // loop.log_every
    return intervals


def _means(values: list[tuple[str, float]]) -> dict[str, float]:
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for key, value in values:
        sums[key] = sums.get(key, 0.0) + value
        counts[key] = counts.get(key, 0) + 1
    return {key: sums[key] / counts[key] for key in sums}
