"""The fine-tuning differences from the CCLM reference, each one config key away (docs/iglue.md): the reference's
flips (``data.hflip_careful=false``), its name-substring weight-decay rule (``train.decay_rule=reference``) and
PyTorch's default init of new heads (``head_init=torch_default``); cclm's behaviour stays the default."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cclm.config import (
    ConfigError,
    DecayRule,
    FinetuneConfig,
    FinetuneDataConfig,
    FinetuneTrainConfig,
    HeadInit,
    ModelConfig,
    StreamConfig,
    TaskHeadStyle,
    load_config,
)
from cclm.model.cross_view import CrossViewModel
from cclm.runtime import engine
from cclm.runtime.env import init_distributed
from cclm.runtime.sources import EpochBatches
from cclm.tasks import domain_pretrain, finetune, get_task, protocols
from cclm.tasks.batching import ClassificationDataset
from cclm.tasks.images import ImageRef, TaskAugment
from cclm.tasks.nlvr_fusion import TextAssignment
from cclm.tasks.task_data import ClassificationExample
from cclm.tasks.task_model import TaskModel

from .conftest import REPO

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32
XVNLI_LABELS = ["contradiction", "neutral", "entailment"]


@pytest.fixture
def backbone(tiny_tokenizer) -> CrossViewModel:
    cfg = load_config(ModelConfig, REPO / "configs" / "model" / "tiny.yaml")
    cfg.text.encoder["vocab_size"] = len(tiny_tokenizer)
    torch.manual_seed(0)
    return CrossViewModel(cfg)


def finetune_config(*overrides: str):
    return load_config(FinetuneConfig, REPO / "configs" / "finetune" / "xgqa_cclm.yaml", list(overrides))


# --------------------------------------------------------------------------------------------------------- flips
def flipped(images, text, lang="en", label=0, **options) -> list[bool]:
    """For each image and four epochs: whether the augmentation mirrored it (compared with one that never flips,
    drawing the same crop)."""
    examples = [
        ClassificationExample(str(i), text, (ImageRef(None, str(p)),), label, lang)
        for i, p in enumerate(images)
    ]
    common = {"scale_min": 0.6, "randaugment": False}
    flipping = ClassificationDataset(examples, {}, SIZE, TaskAugment(SIZE, 5, **common, **options))
    never = ClassificationDataset(examples, {}, SIZE, TaskAugment(SIZE, 5, hflip=False, **common))
    flags = []
    for epoch in range(4):
        flipping.set_epoch(epoch)
        never.set_epoch(epoch)
        for i in range(len(examples)):
            a, b = flipping[i]["images"], never[i]["images"]
            assert torch.equal(a, b) or torch.equal(a, b.flip(-1))
            flags.append(not torch.equal(a, b))
    return flags


def test_reference_flips_ignore_the_text_and_the_label(images):
    reference = {"hflip_careful": False, "label_names": ["yes", "left"]}
    for text, lang, label in (
        ("the dog on the left is asleep", "en", 0),
        ("links steht ein Hund", "de", 0),
        ("un texte", "xx", 0),  # a language without a word list
        ("which side is the dog on?", "en", 1),  # the label names a side
    ):
        careful = flipped(images, text, lang, label, label_names=["yes", "left"])
        assert not any(careful), text  # the default: never flipped
        flags = flipped(images, text, lang, label, **reference)
        assert 0 < sum(flags) < len(flags), text  # the reference: each image with p 1/2
        assert flags == flipped(images, text, lang, label, **reference)  # seeded: the same flips again


def test_reference_gqa_rule_skips_questions_and_answers_holding_left_or_right(images):
    gqa = {"hflip_careful": False, "label_names": ["yes", "left"], "reference_side_words": ("left", "right")}
    assert get_task("xgqa").REFERENCE_SIDE_WORDS == ("left", "right")
    assert not any(flipped(images, "is the cup on the left?", **gqa))
    assert not any(flipped(images, "what is bright?", **gqa))  # a substring, as the reference's `in`
    assert not any(flipped(images, "which side is the dog on?", label=1, **gqa))  # the answer "left"
    assert any(flipped(images, "which side is the dog on?", label=0, **gqa))
    # the reference's English words, case-sensitive, whatever the language
    assert any(flipped(images, "Left or not?", **gqa))
    assert any(flipped(images, "Ist der Hund links?", lang="de", **gqa))
    # the words are the reference mode's only: the careful default keeps its own rule
    careful = TaskAugment(SIZE, 0, label_names=["yes", "left"], reference_side_words=("left", "right"))
    assert careful.side_words == () and careful.side_labels == {1}
    assert not any(flipped(images, "Ist der Hund links?", lang="de", reference_side_words=("left",)))


def test_hflip_careful_comes_from_the_data_config():
    assert FinetuneDataConfig().hflip_careful is True
    on = TaskAugment.from_config(FinetuneDataConfig(augment=True), SIZE, seed=1)
    assert on.transform.hflip_careful
    cfg = FinetuneDataConfig(augment=True, hflip_careful=False)
    reference = TaskAugment.from_config(cfg, SIZE, 1, ["no", "right"], reference_side_words=("right",))
    assert not reference.transform.hflip_careful and reference.side_labels == {1}
    assert finetune_config().data.hflip_careful is True
    assert finetune_config("data.hflip_careful=false").data.hflip_careful is False
    with pytest.raises(ConfigError, match="hflip_careful"):
        finetune_config("data.hflip_careful=sometimes")


def test_training_batches_take_the_tasks_reference_words(monkeypatch):
    seen = []
    monkeypatch.setattr(
        protocols, "training_dataset", lambda kind, datas, roots, size, augment: seen.append(augment)
    )
    monkeypatch.setattr(protocols, "TaskBatches", lambda *args, **kwargs: None)
    for task, words in (("xgqa", ("left", "right")), ("xvnli", ())):
        runner = protocols.TaskRunner(
            load_config(
                FinetuneConfig,
                overrides=[
                    f"task={task}",
                    "data.augment=true",
                    "data.hflip_careful=false",
                    "train.device=cpu",
                ],
            )
        )
        monkeypatch.setattr(runner, "image_size", lambda model: SIZE)
        monkeypatch.setattr(runner, "label_names", lambda: ["yes", "left"])
        monkeypatch.setattr(runner, "collator", lambda model, tokenizer: None)
        runner.train_batches([], None, None)
        assert seen[-1].side_words == words and not seen[-1].transform.hflip_careful


# ------------------------------------------------------------------------------------------------- weight decay
# The parameters of the tiny xvnli task model that decay under the reference's name rule and not by shape: the
# temperature, the ViT's embeddings and its LayerNorms (open_clip's ln_*), and the ITM and task heads' LayerNorm.
REFERENCE_ONLY_DECAY = {
    "backbone.temp",
    "backbone.vision.visual.class_embedding",
    "backbone.vision.visual.positional_embedding",
    "backbone.vision.visual.ln_pre.weight",
    "backbone.vision.visual.ln_post.weight",
    *(f"backbone.vision.visual.transformer.resblocks.{i}.ln_{j}.weight" for i in (0, 1) for j in (1, 2)),
    "backbone.itm_head.net.1.weight",
    "head.net.1.weight",
}


def optimizer_groups(model: TaskModel, train_cfg, tmp_path, monkeypatch) -> dict[str, tuple[float, float]]:
    """name -> (weight decay, lr) of the optimizer ``finetune`` builds for ``train_cfg`` (stopped once built)."""
    built = []

    class Stop(Exception):
        pass

    def recording(module, **kwargs):
        built.append(engine_build(module, **kwargs))
        raise Stop

    engine_build = engine.build_optimizer
    monkeypatch.setattr(engine, "build_optimizer", recording)
    settings = finetune.FinetuneSettings.from_train_config(train_cfg, 1e-4)
    with pytest.raises(Stop):
        finetune.finetune(
            model,
            EpochBatches([{}], 1, lambda items: items[0], seed=0),
            lambda m: 0.0,
            settings,
            env=init_distributed("cpu"),
            output_dir=tmp_path / "run",
        )
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["weight_decay"], g["lr"]) for g in built[0].param_groups for p in g["params"]}


def test_finetuning_decays_by_the_configured_rule(backbone, tmp_path, monkeypatch):
    model = TaskModel(backbone, "xvnli", "single", XVNLI_LABELS)
    assert FinetuneTrainConfig().decay_rule == DecayRule.shape
    shape = optimizer_groups(model, FinetuneTrainConfig(head_lr_mult=2.0), tmp_path / "a", monkeypatch)
    monkeypatch.undo()
    reference = optimizer_groups(
        model, FinetuneTrainConfig(head_lr_mult=2.0, decay_rule="reference"), tmp_path / "b", monkeypatch
    )
    assert set(shape) == set(reference) == {n for n, _ in model.named_parameters()}
    decayed = {
        rule: {n for n, (wd, _) in groups.items() if wd > 0}
        for rule, groups in (("shape", shape), ("reference", reference))
    }
    assert decayed["reference"] - decayed["shape"] == REFERENCE_ONLY_DECAY
    assert decayed["shape"] < decayed["reference"]
    assert all(wd in (0.0, 0.01) for wd, _ in [*shape.values(), *reference.values()])
    for groups in (shape, reference):  # biases never decay, matrices always; the head learns at 2x either way
        assert groups["head.net.0.bias"][0] == 0.0 and groups["head.net.3.bias"][0] == 0.0
        assert groups["head.net.0.weight"] == (0.01, 2e-4) and groups["backbone.temp"][1] == 1e-4
    assert shape["backbone.temp"][0] == 0.0 and reference["backbone.temp"][0] == 0.01
    assert shape["head.net.1.weight"] == (0.0, 2e-4) and reference["head.net.1.weight"] == (0.01, 2e-4)


def test_decay_rule_is_a_checked_fine_tuning_key():
    assert finetune_config().train.decay_rule == DecayRule.shape
    assert finetune_config("train.decay_rule=reference").train.decay_rule == DecayRule.reference
    with pytest.raises(ConfigError, match="decay_rule"):
        finetune_config("train.decay_rule=names")


def test_domain_pretraining_takes_the_decay_rule_and_head_init(backbone, tmp_path, monkeypatch):
    import cclm.data.pipeline

    seen = {}

    class Stop(Exception):
        pass

    def fake_trainer(objective, *args, **kwargs):
        seen.update(kwargs, objective=objective)
        raise Stop

    monkeypatch.setattr(cclm.data.pipeline, "PretrainData", lambda *args, **kwargs: None)
    monkeypatch.setattr(domain_pretrain, "Trainer", fake_trainer)
    cfg = load_config(
        FinetuneConfig,
        overrides=[
            "task=marvl",
            "head=cclm",
            f"output_dir={tmp_path}",
            "domain_pretrain.steps=2",
            "train.decay_rule=reference",
            "head_init=torch_default",
        ],
    )
    cfg.domain_pretrain.data.image_caption = StreamConfig(shards="unused", batch_size=2)
    model = TaskModel(backbone, "marvl", "pair", ["false", "true"], head=TaskHeadStyle.cclm)
    torch.manual_seed(3)
    with pytest.raises(Stop):
        domain_pretrain.domain_pretrain(model, None, cfg, init_distributed("cpu"))
    assert seen["optimizer_cfg"].decay_rule == DecayRule.reference
    assert seen["objective"].ta_head.bias.abs().min() > 0  # nn.Linear's own init: non-zero biases


# ---------------------------------------------------------------------------------------------- head init
def linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def assert_torch_default(layer: nn.Linear) -> None:
    """nn.Linear's init: weights and biases uniform in +-1/sqrt(fan_in) (kaiming-uniform with a = sqrt(5))."""
    bound = 1 / math.sqrt(layer.in_features)
    weight, bias = layer.weight.detach(), layer.bias.detach()
    assert weight.abs().max() <= bound and weight.abs().max() > 0.9 * bound
    assert bias.abs().max() <= bound and (bias != 0).all()
    if weight.numel() >= 4096:  # enough draws for the std of a uniform: bound / sqrt(3)
        assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)


def heads(backbone, head_init, seed: int) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    single = TaskModel(backbone, "xvnli", "single", XVNLI_LABELS, head_init=head_init)
    pair = TaskModel(backbone, "marvl", "pair", ["false", "true"], head="cclm", head_init=head_init)
    assignment = TextAssignment(pair, head_init=head_init)
    return {"classifier": single.head, "pair classifier": pair.head.classifier, "ta_head": assignment.ta_head}


def test_torch_default_head_init_keeps_nn_linears_init(backbone):
    std = backbone.encoder_config.initializer_range  # 0.1 in the tiny model
    for name, head in heads(backbone, "normal", 0).items():  # the default: normal(0, std), zero biases
        for layer in linears(head):
            assert (layer.bias == 0).all(), name
            if layer.weight.numel() >= 4096:
                assert layer.weight.std().item() == pytest.approx(std, rel=0.05), name
    for name, head in heads(backbone, "torch_default", 0).items():
        for layer in linears(head):
            assert_torch_default(layer)
        for norm in (m for m in head.modules() if isinstance(m, nn.LayerNorm)):
            assert (norm.weight == 1).all() and (norm.bias == 0).all(), name
    # seeded: the same seed gives the same heads, another seed others
    again, other = heads(backbone, "torch_default", 0), heads(backbone, "torch_default", 1)
    for name, head in heads(backbone, "torch_default", 0).items():
        for key, value in head.state_dict().items():
            assert torch.equal(value, again[name].state_dict()[key]), (name, key)
        assert not torch.equal(linears(head)[0].weight, linears(other[name])[0].weight), name
    assert TaskModel(backbone, "xvnli", "single", XVNLI_LABELS).head is not None  # the default is normal
    with pytest.raises(ValueError, match="kaiming"):
        TaskModel(backbone, "xvnli", "single", XVNLI_LABELS, head_init="kaiming")


def test_head_init_is_a_checked_key_that_reaches_the_task_model(tiny_model_dir):
    assert FinetuneConfig().head_init == "normal"
    with pytest.raises(ConfigError, match="head_init"):
        load_config(FinetuneConfig, overrides=["task=xvnli", "head_init=xavier"])
    torch.manual_seed(0)
    cfg = load_config(
        FinetuneConfig,
        REPO / "configs" / "finetune" / "xvnli.yaml",
        [f"pretrained={tiny_model_dir}", "train.device=cpu", "head_init=torch_default"],
    )
    model, _ = protocols.TaskRunner(cfg).start_model([])
    for layer in linears(model.head):
        assert_torch_default(layer)
    cfg.head_init = HeadInit.normal
    default, _ = protocols.TaskRunner(cfg).start_model([])
    assert all((layer.bias == 0).all() for layer in linears(default.head))
