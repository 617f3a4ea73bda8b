"""``grad_norm`` in the run's metrics: the global 2-norm of the averaged gradients before clipping, under ZeRO-0
(where DeepSpeed's engine computes it only to clip, and drops it) as under ZeRO-1 (where its optimizer keeps it),
checked against ``torch.nn.utils.clip_grad_norm_`` on the same batches."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from cclm.config import DeepSpeedConfig, OptimizerConfig, SchedulerConfig
from cclm.runtime.env import init_distributed
from cclm.runtime.trainer import LoopSettings, Trainer

STEPS, ACCUM, CLIP = 3, 2, 0.01  # a clip far below the norms: the logged norm must be the one before clipping


class Regression(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(4, 8)
        self.out = nn.Linear(8, 1)

    def forward(self, batch, view):
        prediction = self.out(torch.tanh(self.hidden(batch["x"]))).squeeze(1)
        return {"loss": nn.functional.mse_loss(prediction, batch["y"])}


class FixedBatches:
    """The given batches in order (one view)."""

    views = ("image",)

    def __init__(self, batches):
        self.batches, self.position = batches, 0

    def view_for_step(self, step):
        return "image"

    def next_batch(self, view):
        batch = self.batches[self.position]
        self.position += 1
        return batch

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]

    def close(self):
        pass


def make_batches() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(STEPS * ACCUM):
        x = torch.randn(8, 4, generator=generator)
        batches.append({"x": x, "y": x @ torch.tensor([1.0, -2.0, 0.5, 3.0])})
    return batches


def norms_by_hand(model: nn.Module, batches) -> list[float]:
    """Per update: the gradient of the mean loss over its micro-batches, its norm from clip_grad_norm_. The
    learning rate is 0, so the weights never change and each update starts from ``model``."""
    norms = []
    for step in range(STEPS):
        model.zero_grad()
        for batch in batches[step * ACCUM : (step + 1) * ACCUM]:
            (model(batch, "image")["loss"] / ACCUM).backward()
        norms.append(float(nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
    return norms


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_grad_norm_is_logged_at_every_step_as_computed_by_hand(tmp_path, zero_stage):
    torch.manual_seed(0)
    model, batches = Regression(), make_batches()
    expected = norms_by_hand(copy.deepcopy(model), batches)
    trainer = Trainer(
        model,
        FixedBatches(batches),
        LoopSettings(max_steps=STEPS, log_every=1, grad_accum=ACCUM, grad_clip=CLIP, progress_bar=False),
        env=init_distributed("cpu"),
        optimizer_cfg=OptimizerConfig(lr=0.0, weight_decay=0.0),
        scheduler_cfg=SchedulerConfig(),
        deepspeed_cfg=DeepSpeedConfig(zero_stage=zero_stage, precision="fp32"),
        micro_batch=8,
        output_dir=tmp_path / "run",
    )
    trainer.run()
    trainer.close()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    logged = [r["grad_norm"] for r in records]
    assert min(expected) > 10 * CLIP and len(set(expected)) == STEPS
    assert logged == pytest.approx(expected, rel=1e-5)
