"""ZeRO-Offload of the optimizer (``deepspeed.offload_optimizer=true``, ``configs/deepspeed/zero3_offload.json``)
trains: DeepSpeed is told it may step cclm's own AdamW (its param groups, lr multipliers and decay rule) on the
CPU, where it used to refuse any optimizer but its compiled CPU Adam and crash at start."""

from __future__ import annotations

import pytest

from cclm.config import PretrainConfig, from_dict
from cclm.runtime.engine import deepspeed_config, offloads_optimizer

from ..pretrain_runs import REPO, metrics, overrides, run_pretrain, small_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return small_world(tmp_path_factory.mktemp("offload") / "world")


def losses(run) -> list[float]:
    return [round(row["loss"], 4) for row in metrics(run)]


def test_an_offloaded_optimizer_trains_as_the_one_on_the_device(world, tmp_path):
    steps = {"train.max_steps": 3, "data.num_workers": 0}
    run_pretrain(1, overrides(world, tmp_path / "plain", **steps, **{"deepspeed.zero_stage": 2}))
    run_pretrain(
        1,
        overrides(
            world,
            tmp_path / "offload",
            **steps,
            **{"deepspeed.zero_stage": 2, "deepspeed.offload_optimizer": "true"},
        ),
    )
    plain, offloaded = losses(tmp_path / "plain"), losses(tmp_path / "offload")
    assert len(plain) == 3 and plain == pytest.approx(offloaded, abs=2e-3)


def test_the_shipped_offload_file_trains(world, tmp_path):
    run = tmp_path / "file"
    run_pretrain(
        1,
        overrides(
            world,
            run,
            **{
                "train.max_steps": 2,
                "data.num_workers": 0,
                "deepspeed.zero_stage": "null",
                "deepspeed.precision": "null",
                "deepspeed.config_file": str(REPO / "configs" / "deepspeed" / "zero3_offload.json"),
            },
        ),
    )
    assert [row["step"] for row in metrics(run)] == [1, 2]


def test_only_an_offloaded_optimizer_lets_deepspeed_run_a_client_optimizer():
    def config(**deepspeed):
        return deepspeed_config(from_dict(PretrainConfig, {"deepspeed": deepspeed}).deepspeed, 8, 1)

    offloaded = config(zero_stage=2, offload_optimizer=True)
    assert offloads_optimizer(offloaded) and offloaded["zero_force_ds_cpu_optimizer"] is False
    assert "zero_force_ds_cpu_optimizer" not in config(zero_stage=2)
