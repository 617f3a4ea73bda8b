"""``model.compile``: the tower layers compiled in place give the training step's loss and gradients of the eager
model, without graph breaks, and the training engine applies the option (issue 16).

On 2 CPU cores inductor's C++ code generation takes minutes even for the tiny model, so the loss check traces
with TorchDynamo and AOTAutograd and runs the captured graphs eagerly (``backend="aot_eager"``): the part that
breaks when a layer cannot be captured. The GPU smoke test (tests/test_gpu_smoke.py) compiles with inductor."""

from __future__ import annotations

import pytest
import torch

from cclm.config import DeepSpeedConfig, OptimizerConfig, SchedulerConfig
from cclm.runtime.compile import compile_towers, repeated_layers

pytestmark = pytest.mark.usefixtures("one_thread")


def _image_batch(vocab: int, size: int = 4, length: int = 12) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (size, length), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    return {
        "text_ids": ids,
        "text_mask": torch.ones_like(ids),
        "mlm_ids": ids.clone(),
        "mlm_labels": labels,
        "group_ids": torch.arange(size),
        "images": torch.randint(0, 256, (size, 3, 32, 32), dtype=torch.uint8, generator=g),
    }


def _step(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and gradients of one image-view step (text, fusion and vision layers all run)."""
    device = batch["text_ids"].device
    model.sampling_generator = torch.Generator(device).manual_seed(1)  # the same hard negatives both times
    model.zero_grad(set_to_none=True)
    loss = model(batch, "image")["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_step_equals_eager(tiny_model_cfg):
    from cclm.model import CrossViewModel

    model = CrossViewModel(tiny_model_cfg, load_pretrained=False).train()
    batch = _image_batch(tiny_model_cfg.text.encoder["vocab_size"])
    names = list(model.state_dict())
    eager_loss, eager_grads = _step(model, batch)

    # fullgraph: a graph break inside a layer fails here instead of silently running that layer eagerly
    assert compile_towers(model, backend="aot_eager", fullgraph=True) == 6  # 2 vision + 2 text + 2 fusion
    compiled_loss, compiled_grads = _step(model, batch)

    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert list(model.state_dict()) == names  # compiled in place: checkpoints and export see the same names


def test_repeated_layers_are_the_tower_layers(tiny_model_cfg):
    from cclm.model import CrossViewModel

    model = CrossViewModel(tiny_model_cfg, load_pretrained=False)
    layers = list(repeated_layers(model))
    expected = [*model.vision.visual.transformer.resblocks, *model.text.layers, *model.fusion.layers]
    assert [id(layer) for layer in layers] == [id(layer) for layer in expected]


def _engine(model, zero_stage: int):
    from cclm.runtime.engine import build_engine
    from cclm.runtime.env import init_distributed

    return build_engine(
        model,
        env=init_distributed("cpu"),
        optimizer_cfg=OptimizerConfig(),
        scheduler_cfg=SchedulerConfig(),
        deepspeed_cfg=DeepSpeedConfig(zero_stage=zero_stage, precision="fp32"),
        micro_batch=4,
        max_steps=10,
    )


def test_engine_compiles_when_the_config_asks(tiny_model_cfg):
    from cclm.model import CrossViewModel

    plain = CrossViewModel(tiny_model_cfg, load_pretrained=False)
    _engine(plain, zero_stage=0)
    assert not any(layer._compiled_call_impl for layer in repeated_layers(plain))  # the default: eager

    tiny_model_cfg.compile = True
    compiled = CrossViewModel(tiny_model_cfg, load_pretrained=False)
    _engine(compiled, zero_stage=2)
    layers = list(repeated_layers(compiled))
    assert len(layers) == 6 and all(layer._compiled_call_impl is not None for layer in layers)


def test_compile_refused_under_zero3(tiny_model_cfg):
    from cclm.config import ConfigError
    from cclm.model import CrossViewModel

    tiny_model_cfg.compile = True
    with pytest.raises(ConfigError, match="model.compile: not with deepspeed.zero_stage=3"):
        _engine(CrossViewModel(tiny_model_cfg, load_pretrained=False), zero_stage=3)
