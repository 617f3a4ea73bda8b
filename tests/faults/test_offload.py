"""ZeRO-Offload of the optimizer (``deepspeed.offload_optimizer=true``, ``configs/deepspeed/zero3_offload.json``)
trains: DeepSpeed is told it may step cclm's own AdamW (its param groups, lr multipliers and decay rule) on the
CPU, where it used to refuse any optimizer but its compiled CPU Adam and crash at start. The offloaded runs
themselves (the same updates as without offload, exact resume, the shipped ``zero3_offload.json``) are in
``test_docs_promises.py``."""

from __future__ import annotations

from cclm.config import PretrainConfig, from_dict
from cclm.runtime.engine import deepspeed_config, offloads_optimizer


def test_only_an_offloaded_optimizer_lets_deepspeed_run_a_client_optimizer():
    def config(**deepspeed):
        return deepspeed_config(from_dict(PretrainConfig, {"deepspeed": deepspeed}).deepspeed, 8, 1)

    offloaded = config(zero_stage=2, offload_optimizer=True)
    assert offloads_optimizer(offloaded) and offloaded["zero_force_ds_cpu_optimizer"] is False
    assert "zero_force_ds_cpu_optimizer" not in config(zero_stage=2)
