"""Optimizer parameter groups, the learning-rate schedule and the generated DeepSpeed config."""

import json
import math

import pytest

from cclm.config import ConfigError, PretrainConfig, from_dict
from cclm.model import CrossViewModel
from cclm.runtime.engine import deepspeed_config
from cclm.runtime.optim import build_optimizer, multipliers, param_groups
from cclm.runtime.schedule import build_scheduler, lr_factor


def test_no_weight_decay_for_biases_norms_and_temperature_and_lr_multiplier_for_new_parameters(
    tiny_model_cfg,
):
    model = CrossViewModel(tiny_model_cfg)
    groups = param_groups(
        model, lr=1e-4, weight_decay=0.05, lr_mults=multipliers(model.new_parameter_names(), 5.0)
    )
    name_of = {id(p): n for n, p in model.named_parameters()}
    new = set(model.new_parameter_names())
    seen = set()
    for group in groups:
        for param in group["params"]:
            name = name_of[id(param)]
            seen.add(name)
            decays = not (
                param.ndim < 2 or name == "temp" or name.endswith(("class_embedding", "positional_embedding"))
            )
            assert group["weight_decay"] == (0.05 if decays else 0.0), name
            assert group["lr"] == pytest.approx(1e-4 * (5.0 if name in new else 1.0)), name
    assert seen == set(name_of.values())  # every trainable parameter in exactly one group
    assert "temp" in new and any(".crossattention." in n for n in new)
    assert not any(n.startswith("text.") for n in new)  # the text stack is "pretrained"


def test_warmup_then_cosine_or_linear_decay():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(55, 100, 10, "linear") == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine", min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(40, 100, 0, "constant") == 1.0
    with pytest.raises(ValueError, match="unknown scheduler"):
        lr_factor(0, 10, 0, "exponential")


def test_scheduler_keeps_group_multipliers(tiny_model_cfg):
    cfg = from_dict(
        PretrainConfig,
        {
            "train": {
                "max_steps": 20,
                "scheduler": {"warmup_steps": 4},
                "optimizer": {"lr": 1e-3, "new_param_lr_mult": 2.0},
            }
        },
    )
    model = CrossViewModel(tiny_model_cfg)
    opt = cfg.train.optimizer
    optimizer = build_optimizer(
        model,
        lr=opt.lr,
        weight_decay=opt.weight_decay,
        lr_mults=multipliers(model.new_parameter_names(), opt.new_param_lr_mult),
    )
    scheduler = build_scheduler(optimizer, cfg.train.scheduler, cfg.train.max_steps)
    for _ in range(12):
        optimizer.step()
        scheduler.step()
    factor = lr_factor(12, 20, 4)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(1e-3 * group["lr_mult"] * factor)
    assert not math.isnan(factor)


def test_deepspeed_config_from_typed_config_and_file(tmp_path):
    cfg = from_dict(
        PretrainConfig,
        {
            "train": {"grad_accum": 2, "grad_clip": 0.5},
            "deepspeed": {"zero_stage": 3, "precision": "bf16", "offload_params": True},
        },
    )
    ds = deepspeed_config(
        cfg.deepspeed,
        micro_batch_size=16,
        world_size=4,
        grad_accum=cfg.train.grad_accum,
        grad_clip=cfg.train.grad_clip,
    )
    assert ds["train_batch_size"] == 16 * 2 * 4 and ds["gradient_clipping"] == 0.5
    assert (
        ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    )
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    # a JSON file gives stage and precision when the typed config leaves them unset
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 2}, "fp16": {"enabled": true}}')
    ds = deepspeed_config(
        from_dict(PretrainConfig, {"deepspeed": {"config_file": str(path)}}).deepspeed, 8, 1
    )
    assert ds["zero_optimization"]["stage"] == 2 and ds["fp16"]["enabled"]
    with pytest.raises(ConfigError, match="offload_params needs"):
        deepspeed_config(
            from_dict(PretrainConfig, {"deepspeed": {"zero_stage": 2, "offload_params": True}}).deepspeed,
            8,
            1,
        )
    with pytest.raises(ConfigError, match="precision"):
        deepspeed_config(from_dict(PretrainConfig, {"deepspeed": {"precision": "fp8"}}).deepspeed, 8, 1)


def test_precision_left_unset_is_bf16_on_a_gpu_that_has_it_as_documented(tmp_path, monkeypatch):
    """No ``deepspeed.precision`` and no config file: ``auto`` (the default every IGLUE fine-tuning config and
    a custom pretraining config get), not fp32; a config file without bf16/fp16 sections is fp32, as
    DeepSpeed reads it. Fine-tuning evaluates in the precision it trains in."""
    import torch

    from cclm.runtime.engine import configured_precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    gpu = torch.device("cuda", 0)
    unset = from_dict(PretrainConfig, {}).deepspeed
    assert configured_precision(unset) == "auto"
    assert deepspeed_config(unset, 8, 1, device=gpu)["bf16"]["enabled"]
    assert not deepspeed_config(unset, 8, 1, device=torch.device("cpu"))["bf16"]["enabled"]
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 2}}')
    from_file = from_dict(PretrainConfig, {"deepspeed": {"config_file": str(path)}}).deepspeed
    assert configured_precision(from_file) == "fp32"
    assert not deepspeed_config(from_file, 8, 1, device=gpu)["bf16"]["enabled"]
    with pytest.raises(ConfigError, match="does not exist"):
        configured_precision(
            from_dict(PretrainConfig, {"deepspeed": {"config_file": str(tmp_path / "no")}}).deepspeed
        )


def test_a_deepspeed_file_keeps_its_bf16_options_and_may_not_set_what_cclm_builds(tmp_path):
    """Before, a file's optimizer and scheduler sections were ignored by DeepSpeed in silence (cclm hands it
    its own), and every bf16 option but 'enabled' was dropped while fp16's were kept."""
    path = tmp_path / "ds.json"

    def generated(file: dict) -> dict:
        path.write_text(json.dumps(file))
        return deepspeed_config(
            from_dict(PretrainConfig, {"deepspeed": {"config_file": str(path)}}).deepspeed, 8, 1
        )

    ds = generated({"bf16": {"enabled": True, "immediate_grad_update": False}})
    assert ds["bf16"] == {"enabled": True, "immediate_grad_update": False}
    ds = generated({"bfloat16": {"enabled": True, "immediate_grad_update": False}})  # DeepSpeed's older name
    assert ds["bf16"] == {"enabled": True, "immediate_grad_update": False} and "bfloat16" not in ds
    for section, key in (("optimizer", "train.optimizer"), ("scheduler", "train.scheduler")):
        with pytest.raises(ConfigError, match=rf"ds\.json sets '{section}' \(set {key}\)"):
            generated({section: {"type": "SGD", "params": {"lr": 0.5}}})
    with pytest.raises(ConfigError, match=r"ds\.json holds a list, not a JSON object"):
        generated([1, 2])
    with pytest.raises(ConfigError, match=r"ds\.json: 'bfloat16' holds a boolean, not an object"):
        generated({"bfloat16": True})


def test_deepspeeds_cpu_adam_steps_the_same_groups_as_adamw(tiny_model_cfg):
    """ZeRO-Offload steps DeepSpeed's CPU Adam where its op loads: the same parameter groups (decay rule, lr
    multipliers) and AdamW's decoupled weight decay, so one step moves the weights as torch's AdamW does."""
    from cclm.runtime.optim import cpu_adam_unavailable

    reason = cpu_adam_unavailable()
    if reason:
        pytest.skip(f"DeepSpeed's CPU Adam cannot load here ({reason})")
    import torch

    torch.manual_seed(0)
    models = [CrossViewModel(tiny_model_cfg) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    options = {
        "lr": 1e-3,
        "weight_decay": 0.05,
        "lr_mults": multipliers(models[0].new_parameter_names(), 5.0),
    }
    adamw = build_optimizer(models[0], **options)
    cpu_adam = build_optimizer(models[1], cpu_adam=True, **options)
    assert type(cpu_adam).__name__ == "DeepSpeedCPUAdam" and cpu_adam.adam_w_mode
    for a, b in zip(adamw.param_groups, cpu_adam.param_groups, strict=True):
        assert (a["lr"], a["weight_decay"], a["lr_mult"]) == (b["lr"], b["weight_decay"], b["lr_mult"])
        assert [p.shape for p in a["params"]] == [p.shape for p in b["params"]]
    for model in models:
        for param in model.parameters():
            param.grad = torch.full_like(param, 0.01)
    adamw.step()
    cpu_adam.step()
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-7), name
