"""The reference's optimiser and schedule (CCLM ``optim.py``, ``scheduler.py``, ``Pretrain.py``), selectable
by config: the LambdaLR stepped once per iteration of two updates (``scheduler.counting: iterations``), the
name-substring weight-decay rule (``optimizer.decay_rule: reference``) and the run length in epochs."""

from __future__ import annotations

import json

import pytest
import torch
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from cclm.config import (
    ConfigError,
    DataConfig,
    DecayRule,
    DeepSpeedConfig,
    OptimizerConfig,
    ScheduleCounting,
    ScheduleName,
    SchedulerConfig,
    TrainConfig,
    ViewSchedule,
    from_dict,
)
from cclm.data.shards import VIEW_IMAGE_CAPTION, ShardSink
from cclm.model import CrossViewModel
from cclm.runtime.env import init_distributed, seed_everything
from cclm.runtime.optim import build_optimizer, decays, multipliers, param_groups
from cclm.runtime.schedule import build_scheduler, lr_factor, views_per_iteration
from cclm.runtime.trainer import LoopSettings, Trainer
from cclm.train.run_length import image_caption_size, max_steps_from_epochs, train_max_steps

LR, MULT, WARMUP = 1e-4, 2.0, 2500
# Pretrain_3m.yaml: 30 epochs of 2,838,361 image-caption samples at 128 per GPU on 8 GPUs.
EPOCHS, SAMPLES, BATCH, WORLD = 30, 2_838_361, 128, 8
ITERATIONS = 30 * 2772  # ceil(2838361 / 1024) = 2772 iterations per epoch


def reference_lr_lambda(current_step: int, num_warmup_steps: int, num_training_steps: int) -> float:
    """The reference's ``create_scheduler`` ``lr_lambda`` (sched: linear), transcribed."""
    if current_step < num_warmup_steps:
        return float(current_step) / float(max(1, num_warmup_steps))
    return max(
        0.0,
        float(num_training_steps - current_step) / float(max(1, num_training_steps - num_warmup_steps)),
    )


def reference_group_lrs(iteration: int, iterations: int) -> tuple[float, float]:
    """(lr, lr_large) of the reference's groups at ``iteration``: both updates of the iteration use them."""
    factor = reference_lr_lambda(iteration, WARMUP, iterations)
    return LR * factor, LR * MULT * factor


def two_group_optimizer() -> torch.optim.Optimizer:
    model = nn.Linear(3, 2)
    return build_optimizer(model, lr=LR, weight_decay=0.01, lr_mults={"weight": MULT})


def iteration_schedule(**changes) -> SchedulerConfig:
    return SchedulerConfig(
        name=ScheduleName.linear, warmup_steps=WARMUP, counting=ScheduleCounting.iterations, **changes
    )


def group_lrs(optimizer) -> dict[float, float]:
    return {group["lr_mult"]: group["lr"] for group in optimizer.param_groups}


# ------------------------------------------------------------------------------------------------ schedule
def test_iteration_counting_gives_the_reference_lr_of_both_updates_of_every_iteration():
    """Stepped once per optimizer update over a short run, each group's lr at updates 2i and 2i+1 is the
    reference's lr at iteration i (its LambdaLR stepped once per iteration)."""
    iterations = 3000
    optimizer = two_group_optimizer()
    scheduler = build_scheduler(optimizer, iteration_schedule(), 2 * iterations, views_per_iteration=2)
    checked = {0, 1, 1250, 2500, 2501, iterations - 1}
    for update in range(2 * iterations):
        iteration = update // 2
        if iteration in checked:
            lr, lr_large = reference_group_lrs(iteration, iterations)
            assert group_lrs(optimizer) == {1.0: pytest.approx(lr, abs=1e-15), MULT: pytest.approx(lr_large)}
        optimizer.step()
        scheduler.step()
    assert group_lrs(optimizer)[1.0] == 0.0  # the reference's factor at N


def test_iteration_counting_over_the_3m_run_at_the_named_iterations():
    """The whole 3M run (83,160 iterations of two updates), read off the schedule's factor at some updates."""
    optimizer = two_group_optimizer()
    max_steps = max_steps_from_epochs(EPOCHS, SAMPLES, BATCH, WORLD, views_per_iteration=2)
    scheduler = build_scheduler(optimizer, iteration_schedule(), max_steps, views_per_iteration=2)
    (factor,) = {id(f): f for f in scheduler.lr_lambdas}.values()  # one function for both groups
    for iteration in (0, 1, 1250, 2500, 2501, ITERATIONS - 1):
        lr, lr_large = reference_group_lrs(iteration, ITERATIONS)
        for update in (2 * iteration, 2 * iteration + 1):
            assert LR * factor(update) == pytest.approx(lr, abs=1e-15), update
            assert LR * MULT * factor(update) == pytest.approx(lr_large, abs=1e-15), update
    assert factor(0) == factor(1) == 0.0
    assert factor(2) == factor(3) == pytest.approx(1 / WARMUP)


def test_iteration_counting_maps_a_time_limited_update_to_its_iteration():
    optimizer = two_group_optimizer()
    scheduler = build_scheduler(
        optimizer, iteration_schedule(), 2 * 4000, effective_step=lambda u: u + 1001.5, views_per_iteration=2
    )
    factor = scheduler.lr_lambdas[0]
    assert factor(0) == pytest.approx(reference_lr_lambda(500, WARMUP, 4000))  # floor(1001.5 / 2)
    assert factor(3000) == pytest.approx(reference_lr_lambda(2000, WARMUP, 4000))


def test_iteration_counting_warmup_ratio_and_odd_max_steps_count_iterations():
    optimizer = two_group_optimizer()
    cfg = SchedulerConfig(name=ScheduleName.linear, warmup_ratio=0.1, counting=ScheduleCounting.iterations)
    factor = build_scheduler(optimizer, cfg, 201, views_per_iteration=2).lr_lambdas[0]  # 101 iterations
    assert factor(20) == pytest.approx(10 / 10)  # warm-up: round(0.1 x 101) = 10 iterations
    assert factor(19) == pytest.approx(9 / 10)
    assert factor(200) == pytest.approx(reference_lr_lambda(100, 10, 101))


def test_update_counting_is_unchanged_and_ignores_the_views():
    cfg = SchedulerConfig(name=ScheduleName.linear, warmup_steps=10)
    assert ScheduleCounting(cfg.counting) == ScheduleCounting.updates  # the default
    for per_iteration in (1, 2):
        factor = build_scheduler(
            two_group_optimizer(), cfg, 100, views_per_iteration=per_iteration
        ).lr_lambdas[0]
        assert [factor(u) for u in (0, 9, 10, 55, 100)] == pytest.approx([0.1, 1.0, 1.0, 0.5, 0.0])
        assert [factor(u) for u in range(120)] == [lr_factor(u, 100, 10, "linear") for u in range(120)]


def test_views_per_iteration():
    assert views_per_iteration(ViewSchedule.alternate, ("image", "text")) == 2
    assert views_per_iteration(ViewSchedule.interleave, ("image", "text")) == 2
    assert views_per_iteration(ViewSchedule.sum, ("image", "text")) == 1
    assert views_per_iteration(ViewSchedule.interleave, ("image",)) == 1
    assert views_per_iteration("alternate", 2) == 2


# --------------------------------------------------------------------------------------------- decay rules
def test_reference_decay_rule_on_the_cross_view_model(tiny_model_cfg):
    model = CrossViewModel(tiny_model_cfg)
    new = set(model.new_parameter_names())
    groups = param_groups(
        model, lr=LR, weight_decay=0.01, lr_mults=multipliers(new, MULT), decay_rule=DecayRule.reference
    )
    assert sorted((g["weight_decay"], g["lr_mult"]) for g in groups) == [
        (0.0, 1.0),
        (0.0, MULT),
        (0.01, 1.0),
        (0.01, MULT),
    ]  # the reference's four groups
    name_of = {id(p): n for n, p in model.named_parameters()}
    placed = {name_of[id(p)]: g for g in groups for p in g["params"]}
    assert set(placed) == set(name_of.values())
    assert placed["temp"]["weight_decay"] == 0.01 and placed["temp"]["lr"] == pytest.approx(LR * MULT)
    for name, group in placed.items():
        reference_no_decay = any(
            part in name
            for part in ("bias", "LayerNorm.bias", "LayerNorm.weight", "norm.bias", "norm.weight")
            + ("norm1.bias", "norm1.weight", "norm2.bias", "norm2.weight")
        )
        assert group["weight_decay"] == (0.0 if reference_no_decay else 0.01), name
        assert group["lr"] == pytest.approx(LR * (MULT if name in new else 1.0)), name
    layer_norms = [n for n in placed if "LayerNorm" in n]
    assert layer_norms and all(placed[n]["weight_decay"] == 0.0 for n in layer_norms)
    biases = [n for n in placed if n.endswith(".bias")]
    assert biases and all(placed[n]["weight_decay"] == 0.0 for n in biases)
    # positional tables and the class token decay under the reference's rule (not under ours)
    assert placed["vision.visual.positional_embedding"]["weight_decay"] == 0.01
    shape = param_groups(model, lr=LR, weight_decay=0.01, lr_mults=multipliers(new, MULT))
    shape_placed = {name_of[id(p)]: g for g in shape for p in g["params"]}
    assert shape_placed["temp"]["weight_decay"] == 0.0
    assert shape_placed["vision.visual.positional_embedding"]["weight_decay"] == 0.0


def test_swin_relative_position_bias_table_does_not_decay_under_either_rule():
    swin = SwinTransformer(
        img_size=32, patch_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4, num_classes=0
    )
    tables = [(n, p) for n, p in swin.named_parameters() if n.endswith("relative_position_bias_table")]
    assert tables and all(p.ndim == 2 for _, p in tables)
    for rule in (DecayRule.shape, DecayRule.reference):
        placed = {
            n: g["weight_decay"]
            for g in param_groups(swin, lr=LR, weight_decay=0.05, decay_rule=rule)
            for n, p in swin.named_parameters()
            if any(p is q for q in g["params"])
        }
        assert all(placed[n] == 0.0 for n, _ in tables), rule
        for name in ("layers.0.blocks.0.norm1.weight", "layers.1.downsample.norm.weight", "norm.weight"):
            assert placed[name] == 0.0, (rule, name)
        assert placed["layers.0.blocks.0.attn.qkv.weight"] == 0.05
        assert placed["layers.1.downsample.reduction.weight"] == 0.05
    assert decays("visual.ln_1.weight", nn.Parameter(torch.ones(4)), "reference")  # a norm named otherwise
    assert not decays("visual.ln_1.weight", nn.Parameter(torch.ones(4)), "shape")


def test_build_optimizer_takes_the_decay_rule():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    model.temp = nn.Parameter(torch.ones(1))
    shape = build_optimizer(model, lr=LR, weight_decay=0.01)
    reference = build_optimizer(model, lr=LR, weight_decay=0.01, decay_rule="reference")

    def decayed(opt):
        return sum(len(g["params"]) for g in opt.param_groups if g["weight_decay"] > 0)

    assert decayed(shape) == 1  # the linear weight
    assert decayed(reference) == 3  # ... and the LayerNorm weight ("1.weight") and temp


# ---------------------------------------------------------------------------------------------- run length
def test_max_steps_from_epochs():
    assert max_steps_from_epochs(EPOCHS, SAMPLES, BATCH, WORLD, 2) == 166_320 == 2 * ITERATIONS
    assert max_steps_from_epochs(EPOCHS, SAMPLES, BATCH, WORLD, 1) == ITERATIONS
    assert max_steps_from_epochs(0.5, SAMPLES, BATCH, WORLD, 2) == 2 * 1386
    assert max_steps_from_epochs(1, 1025, 128, 8, 2) == 2 * 2  # a partial last batch is an iteration
    assert max_steps_from_epochs(1.01, 1000, 10, 1, 1) == 101  # ceil(1.01 x 100)
    assert (
        max_steps_from_epochs(1.1, 100 * 1024, 128, 8, 2) == 2 * 110
    )  # 1.1 x 100 is 110, not 110.00000000000001
    # each update reads grad_accum batches: the reference's 1024-sample iteration from 4 ranks x 2 micro-batches
    assert max_steps_from_epochs(EPOCHS, SAMPLES, BATCH, 4, 2, grad_accum=2) == 2 * ITERATIONS
    assert max_steps_from_epochs(1, 1000, 10, 1, 1, grad_accum=4) == 25
    with pytest.raises(ConfigError, match="positive"):
        max_steps_from_epochs(1, 0, 128, 8, 2)


def write_shards(folder, count: int, per_shard: int) -> None:
    with ShardSink(folder, VIEW_IMAGE_CAPTION, max_samples=per_shard, command="test") as sink:
        for i in range(count):
            meta = {"captions": {"en": f"caption {i}"}}
            sink.write(f"img{i:04d}", {"jpg": b"not decoded", "json": json.dumps(meta).encode()}, ["en"])
        sink.close()


def image_data(shards) -> DataConfig:
    return from_dict(DataConfig, {"image_caption": {"shards": str(shards), "batch_size": 2}})


def test_dataset_size_from_the_shard_manifests(tmp_path):
    write_shards(tmp_path / "ic", count=7, per_shard=3)
    data = image_data(tmp_path / "ic")
    assert image_caption_size(data) == 7
    train = TrainConfig(epochs=2, max_steps=999)
    views = ("text", "image")
    assert train_max_steps(train, data, world_size=2, views=["image"]) == 2 * 2  # ceil(7/4)=2 per epoch
    train.dataset_size = 100  # set: the manifests are not read
    assert train_max_steps(train, data, world_size=2, views=["image"]) == 2 * 25
    assert train_max_steps(TrainConfig(max_steps=999), data, 2, views) == 999  # epochs 0: max_steps

    both = from_dict(
        DataConfig,
        {
            "image_caption": {"shards": str(tmp_path / "ic"), "batch_size": 2},
            "parallel_text": {"shards": "x"},
        },
    )
    assert (
        train_max_steps(train, both, 2, views) == 2 * 25 * 2
    )  # alternate, equal weights: one update per view
    train.view_schedule = ViewSchedule.sum
    assert train_max_steps(train, both, 2, views) == 2 * 25  # one update reads both views
    train.view_schedule, train.grad_accum = ViewSchedule.interleave, 5
    assert train_max_steps(train, both, 2, views) == 2 * 5 * 2  # each update reads five batches
    train.view_schedule, train.grad_accum = ViewSchedule.alternate, 1
    both.image_caption.weight = 2.0  # two image updates in three: 50 image updates take 75 updates
    assert train_max_steps(train, both, 2, views) == 75
    both.image_caption.weight = 0.0
    for stream_views in (views, ["text"]):  # the pipeline leaves a stream of weight 0 out of its views
        with pytest.raises(ConfigError, match="weight is 0"):
            train_max_steps(train, both, 2, stream_views)

    sizes = tmp_path / "ic" / "sizes.json"
    known = json.loads(sizes.read_text())
    sizes.write_text(json.dumps(dict(list(known.items())[1:])))
    with pytest.raises(ConfigError, match="train.dataset_size or train.max_steps"):
        image_caption_size(data)
    with pytest.raises(ConfigError, match="data.image_caption.shards"):
        image_caption_size(image_data(tmp_path / "missing-{0..3}.tar"))
    with pytest.raises(ConfigError, match="data.image_caption"):
        train_max_steps(TrainConfig(epochs=1), DataConfig(), 1, ["text"])


# ------------------------------------------------------------------------------------------------- trainer
class LrRecorder(nn.Module):
    """A regression whose forward records each group's lr as the coming optimizer update will use it."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)
        self.optimizer = None
        self.seen: list[dict[float, float]] = []

    def forward(self, batch, view):
        if self.optimizer is not None:
            self.seen.append({g["lr_mult"]: float(g["lr"]) for g in self.optimizer.param_groups})
        loss = nn.functional.mse_loss(self.linear(batch["x"]).squeeze(1), batch["y"])
        return {"loss": loss}


class TwoViews:
    views = ("text", "image")

    def view_for_step(self, step: int) -> str:
        return self.views[step % 2]

    def next_batch(self, view: str) -> dict:
        x = torch.randn(4, 4)
        return {"x": x, "y": x.sum(1)}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def close(self):
        pass


@pytest.mark.parametrize("counting", ["iterations", "updates"])
def test_trainer_updates_of_one_iteration_share_the_lr(tmp_path, counting):
    env = init_distributed("cpu")
    seed_everything(0)
    model = LrRecorder()
    warmup, updates = 3, 12
    trainer = Trainer(
        model,
        TwoViews(),
        LoopSettings(
            max_steps=updates, log_every=1, view_schedule=ViewSchedule.interleave, progress_bar=False
        ),
        env=env,
        optimizer_cfg=OptimizerConfig(lr=LR, decay_rule=DecayRule.reference),
        scheduler_cfg=SchedulerConfig(name=ScheduleName.linear, warmup_steps=warmup, counting=counting),
        deepspeed_cfg=DeepSpeedConfig(zero_stage=0),
        micro_batch=4,
        output_dir=tmp_path / "run",
        lr_mults={"linear.weight": MULT},
    )
    model.optimizer = trainer.optimizer
    trainer.run()
    trainer.close()
    assert len(model.seen) == updates
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, updates + 1))
    # the logged lr of step s is the lr its update (s - 1) used, the group without a multiplier's
    assert [r["lr"] for r in logged] == [seen[1.0] for seen in model.seen]
    if counting == "iterations":
        for update, seen in enumerate(model.seen):
            factor = reference_lr_lambda(update // 2, warmup, updates // 2)
            assert seen == {
                1.0: pytest.approx(LR * factor, abs=1e-15),
                MULT: pytest.approx(LR * MULT * factor),
            }
        for i in range(updates // 2):
            assert model.seen[2 * i] == model.seen[2 * i + 1]
        assert model.seen[0][1.0] == 0.0
    else:
        expected = [LR * lr_factor(u, updates, warmup, "linear") for u in range(updates)]
        assert [seen[1.0] for seen in model.seen] == pytest.approx(expected)
        assert model.seen[0][1.0] == pytest.approx(LR / warmup)
