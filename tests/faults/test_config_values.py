"""Config values that parse but that a run cannot use, through the real ``cclm`` entry point: a list or a value
where a mapping or a section belongs, a batch of 0, betas of one value, a negative weight decay, a temperature
range upside down. Each fails at start in one line naming the key (exit status 2, no traceback), before the
output folder is touched; a warm-up as long as the run is a warning. And a full disk while the run saves its
tokenizer stops it in one line naming the folder, leaving no truncated file."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest

from cclm.config import (
    ConfigError,
    FinetuneConfig,
    PretrainConfig,
    SchedulerConfig,
    check_pretrain_values,
    load_config,
)
from cclm.runtime.schedule import warn_if_warmup_covers_run

from ..conftest import build_test_world
from .test_config_errors import SHARDS, XVNLI, assert_one_line_error, pretrain_config, run_cclm

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "pretrain" / "demo.yaml"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A world of 16 images with its tokenizer (~1 s)."""
    folder = tmp_path_factory.mktemp("world")
    return build_test_world(folder, num_images=16, image_size=32, heldout_images=4, xvnli_images=4, seed=3)


def world_run(world: Path, output_dir: Path, *extra: str) -> list[str]:
    """``cclm pretrain`` of the demo config on ``world``: two steps, batches of 4, no loader workers."""
    settings = {
        "model.text.tokenizer": world / "tokenizer",
        "data.image_caption.shards": world / "image_caption" / "shard-000000.tar",
        "data.parallel_text.shards": world / "parallel" / "shard-{000000..000001}.tar",
        "data.image_caption.batch_size": 4,
        "data.parallel_text.batch_size": 4,
        "data.num_workers": 0,
        "train.max_steps": 2,
        "train.save_every": 2,
        "train.log_every": 1,
        "train.scheduler.warmup_steps": 1,
        "output_dir": output_dir,
    }
    given = {item.split("=", 1)[0] for item in extra}
    return ["pretrain", str(DEMO), *(f"{k}={v}" for k, v in settings.items() if k not in given), *extra]


# ------------------------------------------------------------------------------- checked before the output folder
@pytest.mark.parametrize(
    "override, key",
    [
        ("data.parallel_text.batch_size=0", "data.parallel_text.batch_size"),
        ("data.num_workers=-1", "data.num_workers"),
        ("train.stall_factor=0.5", "train.stall_factor"),
        ("deepspeed.zero_stage=5", "deepspeed.zero_stage"),
    ],
)
def test_a_value_the_loader_trainer_or_deepspeed_refuses_fails_before_the_output_folder_is_written(
    world, tmp_path, capsys, override, key
):
    """Before, each failed only after setup: the loader's when the first batch was drawn (config.json,
    metrics.jsonl, tensorboard/ and tokenizer/ were written by then, so the corrected rerun was refused: "already
    holds a run"), the stall factor and ZeRO stage after the process group and model (the former naming no
    key)."""
    out = tmp_path / "run"
    code, err = run_cclm(capsys, *world_run(world, out, override))
    assert_one_line_error(code, err, "pretrain", f"config key '{key}' must be")
    assert not out.exists()


@pytest.mark.parametrize(
    "override, key",
    [("train.stall_factor=1", "train.stall_factor"), ("deepspeed.zero_stage=4", "deepspeed.zero_stage")],
)
def test_a_fine_tuning_value_the_trainer_or_deepspeed_refuses_names_its_key(override, key):
    from cclm.config import check_finetune_values

    cfg = load_config(FinetuneConfig, XVNLI, [override])
    with pytest.raises(ConfigError, match=rf"config key '{key}' must be"):
        check_finetune_values(cfg)


# --------------------------------------------------------------------- a list or a value where a mapping belongs
@pytest.mark.parametrize(
    "override, needle",
    [
        ("eval.datasets=[a,b]", "config key 'eval.datasets' is a mapping, not a list"),
        ("model.text.encoder=[1]", "config key 'model.text.encoder' is a mapping, not a list"),
        ("train=5", "config key 'train' is a section, not a value"),
        ("train.max_steps=[1]", "config key 'train.max_steps' takes one value, not a list"),
    ],
)
def test_a_list_for_a_mapping_in_an_override_names_the_key(tmp_path, capsys, override, needle):
    code, err = run_cclm(capsys, "pretrain", pretrain_config(tmp_path, "tiny"), *SHARDS, override)
    assert_one_line_error(code, err, "pretrain", needle)


def test_a_list_for_a_mapping_in_a_finetune_override_names_the_key(tmp_path, capsys):
    code, err = run_cclm(capsys, "finetune", XVNLI, "data.test=[test]")
    assert_one_line_error(
        code, err, "finetune", "config key 'data.test' is a mapping, not a list", "data.test.NAME="
    )


@pytest.mark.parametrize(
    "text, needle",
    [
        # over the mapping that the default `model: tiny` gives (the layers were merged untyped: a TypeError)
        (
            "defaults:\n  model: tiny\nmodel:\n  text:\n    encoder: [64, 4]\n",
            "'model.text.encoder' is a mapping",
        ),
        ("defaults:\n  model: tiny\ntrain: 5\n", "config key 'train' is a section, not a value"),
        (
            "data:\n  image_caption:\n    shards: x\n    languages: de\n",
            "'data.image_caption.languages' must be a list",
        ),
    ],
)
def test_a_wrong_shape_in_a_yaml_file_names_the_file_and_the_key(tmp_path, capsys, text, needle):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    code, err = run_cclm(capsys, "pretrain", config, *SHARDS)
    assert_one_line_error(code, err, "pretrain", str(config), needle)


def test_the_comma_shortcut_for_lists_still_works():
    """docs/iglue.md and docs/evaluation.md: ``languages=de,ja`` and ``languages=de`` for a list."""
    assert list(load_config(FinetuneConfig, XVNLI, ["languages=de"]).languages) == ["de"]
    assert list(load_config(FinetuneConfig, XVNLI, ["languages=de,ja"]).languages) == ["de", "ja"]
    cfg = load_config(PretrainConfig, None, ["train.optimizer.betas=0.8,0.9", "data.image_caption.shards=x"])
    assert list(cfg.train.optimizer.betas) == [0.8, 0.9]


# ------------------------------------------------------------------------------ numbers a run cannot use
PRETRAIN_BAD = [
    ("data.image_caption.batch_size=0", "config key 'data.image_caption.batch_size' must be >= 1, got 0"),
    ("data.image_caption.batch_size=-2", "config key 'data.image_caption.batch_size' must be >= 1, got -2"),
    ("train.optimizer.betas=0.9", "config key 'train.optimizer.betas' must hold two values in [0, 1)"),
    ("train.optimizer.betas=[0.9,1.5]", "config key 'train.optimizer.betas' must hold two values in [0, 1)"),
    ("model.text.encoder.hidden_size=abc", "config key 'model.text.encoder.hidden_size': expected int"),
    ("train.scheduler.min_lr_ratio=-1", "config key 'train.scheduler.min_lr_ratio' must be in [0, 1]"),
    ("train.optimizer.weight_decay=-5", "config key 'train.optimizer.weight_decay' must be >= 0"),
    ("train.scheduler.warmup_steps=-3", "config key 'train.scheduler.warmup_steps' must be >= 0"),
    ("train.scheduler.warmup_ratio=-0.5", "config key 'train.scheduler.warmup_ratio' must be >= 0"),
    ("train.keep_last=-1", "config key 'train.keep_last' must be >= 0 (0: every checkpoint is kept)"),
    ("train.grad_clip=-1", "config key 'train.grad_clip' must be >= 0 (0: no clipping)"),
    ("train.epochs=-1", "config key 'train.epochs' must be >= 0"),
    (
        "model.objectives.temp_min=0.9",
        "'model.objectives.temp_min' (0.9) must be <= 'model.objectives.temp_max'",
    ),
    ("eval.batch_size=0", "config key 'eval.batch_size' must be >= 1"),
    ("eval.k_test=0", "config key 'eval.k_test' must be >= 1 when re-ranking, got 0"),
]


@pytest.mark.parametrize("override, needle", PRETRAIN_BAD, ids=[o for o, _ in PRETRAIN_BAD])
def test_a_number_a_pretraining_run_cannot_use_names_the_key(world, tmp_path, capsys, override, needle):
    config = pretrain_config(tmp_path, "tiny")
    code, err = run_cclm(
        capsys, "pretrain", config, *SHARDS, f"model.text.tokenizer={world / 'tokenizer'}", override
    )
    assert_one_line_error(code, err, "pretrain", needle)
    assert not (tmp_path / "out").exists()


def test_zero_keeps_its_documented_meaning():
    """grad_clip 0: no clipping; keep_last 0: every checkpoint; epochs 0: max_steps sets the length; k_test 0
    without re-ranking: ITC-only ranks (as ``cclm evaluate`` allows)."""
    cfg = load_config(
        PretrainConfig,
        DEMO,
        [
            "train.grad_clip=0",
            "train.keep_last=0",
            "train.epochs=0",
            "train.scheduler.warmup_steps=0",
            "eval.rerank=false",
            "eval.k_test=0",
        ],
    )
    check_pretrain_values(cfg)
    with pytest.raises(ConfigError, match="'eval.k_test' must be >= 0, got -1"):
        check_pretrain_values(load_config(PretrainConfig, DEMO, ["eval.rerank=false", "eval.k_test=-1"]))


FINETUNE_BAD = [
    ("train.batch_size=0", "config key 'train.batch_size' must be >= 1, got 0"),
    ("train.batch_size=-4", "config key 'train.batch_size' must be >= 1, got -4"),
    ("train.betas=0.9", "config key 'train.betas' must hold two values in [0, 1)"),
    ("train.weight_decay=-5", "config key 'train.weight_decay' must be >= 0"),
    ("train.warmup_ratio=-0.1", "config key 'train.warmup_ratio' must be >= 0"),
    ("train.grad_clip=-1", "config key 'train.grad_clip' must be >= 0"),
    ("train.keep_last=-1", "config key 'train.keep_last' must be >= 0"),
    ("train.epochs=-1", "config key 'train.epochs' must be >= 0"),
    ("train.epochs=0", "'train.epochs' and 'train.max_steps' are both 0"),
    ("train.lr_sweep=[1e-4,-1e-5]", "config key 'train.lr_sweep' must hold values >= 0"),
]


@pytest.mark.parametrize("override, needle", FINETUNE_BAD, ids=[o for o, _ in FINETUNE_BAD])
def test_a_number_a_finetuning_run_cannot_use_names_the_key(tmp_path, capsys, override, needle):
    out = tmp_path / "out"
    code, err = run_cclm(capsys, "finetune", XVNLI, f"output_dir={out}", f"data.root={tmp_path}", override)
    assert_one_line_error(code, err, "finetune", needle)
    assert not out.exists()


@pytest.mark.parametrize(
    "recipe, config, override, needle",
    [
        ("mla", "mla_demo.yaml", "train.grad_clip=-1", "config key 'train.grad_clip' must be >= 0"),
        ("mla", "mla_demo.yaml", "data.num_workers=-1", "config key 'data.num_workers' must be >= 0"),
        (
            "cvil",
            "cvil_demo.yaml",
            "train.scheduler.min_lr_ratio=-1",
            "'train.scheduler.min_lr_ratio' must be in",
        ),
    ],
)
def test_a_number_a_recipe_cannot_use_names_the_key_before_a_stage_starts(
    tmp_path, capsys, recipe, config, override, needle
):
    out = tmp_path / "out"
    config_path = Path(__file__).resolve().parents[2] / "configs" / "recipes" / config
    code, err = run_cclm(capsys, "recipe", recipe, config_path, f"output_dir={out}", override)
    assert_one_line_error(code, err, "recipe", needle)
    assert not out.exists()


# ------------------------------------------------------------------------------- a warm-up as long as the run
@pytest.mark.parametrize(
    "settings, warned",
    [
        ({"warmup_steps": 100}, "train.scheduler.warmup_steps=100"),
        ({"warmup_steps": 6}, "train.scheduler.warmup_steps=6"),
        ({"warmup_ratio": 2.0}, "train.scheduler.warmup_ratio=2.0"),
        ({"warmup_steps": 2}, None),
        ({"warmup_ratio": 0.5}, None),
        # counted in iterations of two updates: 4 iterations warm up, the 6 updates make 3
        ({"warmup_steps": 4, "counting": "iterations"}, "train.scheduler.warmup_steps=4"),
        ({"warmup_steps": 2, "counting": "iterations"}, None),
    ],
)
def test_a_warmup_as_long_as_the_run_is_a_warning_naming_the_key(caplog, settings, warned):
    with caplog.at_level(logging.WARNING, logger="cclm.runtime.schedule"):
        covers = warn_if_warmup_covers_run(SchedulerConfig(**settings), max_steps=6, per_iteration=2)
    assert covers == (warned is not None)
    if warned:
        assert warned in caplog.text and "never decays" in caplog.text
    else:
        assert not caplog.records


def test_a_finetuning_warmup_ratio_of_one_or_more_is_a_warning(tmp_path, capsys, caplog):
    with caplog.at_level(logging.WARNING, logger="cclm.finetune"):
        code, err = run_cclm(
            capsys, "finetune", XVNLI, f"output_dir={tmp_path / 'out'}", "train.warmup_ratio=2.0",
            f"data.root={tmp_path / 'missing'}",
        )  # fmt: skip
    assert_one_line_error(
        code, err, "finetune", str(tmp_path / "missing")
    )  # the run goes on to the next check
    assert "train.warmup_ratio=2.0: the warm-up is as long as the run or longer" in caplog.text


# ----------------------------------------------------------------------------- a full disk saving the tokenizer
@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
        Exception("No space left on device (os error 28)"),  # the tokenizers library's own, a plain Exception
    ],
    ids=["python", "tokenizers"],
)
def test_a_full_disk_while_saving_the_tokenizer_is_one_line_and_leaves_no_truncated_file(
    world, tmp_path, capsys, monkeypatch, error
):
    """tokenizer.json half written, then ENOSPC: before, a raw traceback and a truncated tokenizer.json in
    output_dir/tokenizer."""
    from cclm.data.tokenize import load_tokenizer

    def full_disk(self, folder, *args, **kwargs):
        (Path(folder) / "tokenizer.json").write_text('{"version": "1.0", "trunc')
        raise error

    monkeypatch.setattr(type(load_tokenizer(str(world / "tokenizer"))), "save_pretrained", full_disk)
    out = tmp_path / "run"
    code, err = run_cclm(capsys, *world_run(world, out))
    assert_one_line_error(
        code,
        err,
        "pretrain",
        f"tokenizer folder {out / 'tokenizer'} could not be written (No space left on device)",
        "resume=auto",
    )
    assert not (out / "tokenizer" / "tokenizer.json").exists()
    assert not list(out.glob(".tokenizer.partial-*"))
