"""Progress of long runs (pretraining, fine-tuning, the recipes' stages: all on the one Trainer): a bar on a
terminal; in a log file or pipe, a line at the first step, then at most one per interval, and at the end; and a
line before and after every evaluation."""

from __future__ import annotations

import logging

import cclm.runtime.logging as run_logging
from cclm.config import DeepSpeedConfig, OptimizerConfig, SchedulerConfig
from cclm.runtime.env import init_distributed
from cclm.runtime.logging import RunLogger
from cclm.runtime.trainer import LoopSettings, Trainer

from .test_grad_norm import FixedBatches, Regression, make_batches


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def progress_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "cclm.train" and " step " in r.getMessage()]


def test_log_lines_instead_of_a_bar_outside_a_terminal(tmp_path, monkeypatch, caplog):
    clock = Clock()
    monkeypatch.setattr(run_logging.time, "monotonic", clock)
    logger = RunLogger(
        tmp_path, 0, max_steps=12, start_step=0, desc="xvnli", terminal=False, line_interval_s=30
    )
    assert logger.bar.disable  # no bar redraws running together in the file
    with caplog.at_level(logging.INFO, logger="cclm.train"):
        for step in range(1, 12):
            clock.now += 3.0 if step < 11 else 10.0  # steps 1-10 every 3 s, then 10 s: step 11 at 40 s
            logger.advance()
            if step == 10:
                logger.log(step, {"loss": 0.5, "samples_per_s": 8.0})
        clock.now += 2.0
        logger.advance()
        logger.close()
    lines = progress_lines(caplog)
    assert len(lines) == 3
    assert lines[0].startswith("xvnli step 1/12 (8%), 0.33 steps/s, 0m03s elapsed, 0m33s left")
    assert lines[1].startswith("xvnli step 11/12 (92%), loss 0.5000, 0.28 steps/s, 0m40s elapsed, 0m04s left")
    assert lines[2].startswith("xvnli step 12/12 (100%), loss 0.5000")


def test_a_terminal_gets_the_bar_and_no_lines(tmp_path, caplog):
    logger = RunLogger(tmp_path, 0, max_steps=3, start_step=0, terminal=True)
    with caplog.at_level(logging.INFO, logger="cclm.train"):
        for _ in range(3):
            logger.advance()
        drawn, count = not logger.bar.disable, logger.bar.n
        logger.close()
    assert drawn and count == 3
    assert progress_lines(caplog) == []


def test_each_evaluation_is_announced_and_reported(tmp_path, caplog):
    batches = make_batches()
    trainer = Trainer(
        Regression(),
        FixedBatches(batches),
        LoopSettings(max_steps=4, log_every=2, eval_every=2, progress_bar=False, desc="toy"),
        env=init_distributed("cpu"),
        optimizer_cfg=OptimizerConfig(lr=0.01),
        scheduler_cfg=SchedulerConfig(),
        deepspeed_cfg=DeepSpeedConfig(zero_stage=0, precision="fp32"),
        micro_batch=8,
        output_dir=tmp_path / "run",
        evaluate=lambda model: {"dev": 0.25, "dev_loss": 1.5},
    )
    with caplog.at_level(logging.INFO, logger="cclm.train"):
        trainer.run()
    trainer.close()
    messages = [r.getMessage() for r in caplog.records if r.name == "cclm.train"]
    evaluations = [m for m in messages if m.startswith("toy: evaluat")]
    assert evaluations[0] == "toy: evaluating at step 2" and evaluations[2] == "toy: evaluating at step 4"
    assert evaluations[1].startswith("toy: evaluated in ") and evaluations[1].endswith(
        " s: dev 0.25, dev_loss 1.5"
    )
    assert len(evaluations) == 4
