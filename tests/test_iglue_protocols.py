"""IGLUE's protocols as the shipped configs express them: every few-shot split (language x shot count) and every
machine-translated test file IGLUE ships, few-shot selection on dev (default) or on test (the CCLM reference's,
labelled as such), a few-shot test file that holds training images refused on request, and the ``*_cclm.yaml``
configs carrying the reference's fine-tuning hyper-parameters."""

from __future__ import annotations

import json
import logging
import re
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cclm.config import ConfigError, FinetuneConfig, Protocol, SelectOn, load_config
from cclm.runtime.trainer import Selection
from cclm.tasks import few_shot, iglue_cli, protocols
from cclm.tasks.few_shot import FewShotRun, few_shot_files, few_shot_runs, shots_of

from .conftest import REPO

FINETUNE = REPO / "configs" / "finetune"
# The configs that run IGLUE's protocols, per task: zero-shot and translate-test (with the largest few-shot split)
# and few-shot over every split.
TASK_CONFIGS = {
    "xvnli": ["xvnli.yaml", "xvnli_few_shot.yaml"],
    "xgqa": ["xgqa.yaml", "xgqa_few_shot.yaml", "xgqa_testdev.yaml"],
    "marvl": ["marvl.yaml", "marvl_few_shot.yaml"],
    "xflickrco": ["xflickrco.yaml", "xflickrco_few_shot.yaml"],
    "wit": ["wit.yaml"],
}

# What IGLUE ships (github.com/e-bug/iglue, datasets/ at commit 43cbac9): few-shot splits per language and the
# machine-translated test files ("translate-test") per language.
_ALL = ["1", "5", "10", "20", "25", "48"]
_FLICKR = ["1", "5", "10", "25", "50", "100"]
IGLUE_FEW_SHOT = {
    "xvnli": {
        lang: _ALL for lang in ("en", "ar", "es", "fr", "ru")
    },  # XVNLI/annotations/<lang>/train_<N>.jsonl
    "xgqa": {
        lang: _ALL for lang in ("en", "bn", "de", "id", "ko", "pt", "ru", "zh")
    },  # few_shot/<lang>/train_<N>
    "marvl": {
        lang: ["1", "2", "4", "10", "10x2"] for lang in ("id", "tr", "zh")
    },  # marvl-<lang>_train<N>.jsonl
    "xflickrco": {
        **{lang: _FLICKR for lang in ("es", "id", "ru", "tr", "zh")},
        **{lang: [*_FLICKR, "200", "500", "1000", "1500", "100x5", "200x5"] for lang in ("de", "ja")},
    },
    "wit": {},
}
IGLUE_TRANSLATE_TEST = {
    "xvnli": ["ar", "es", "fr", "ru"],
    "xgqa": [
        "bn",
        "de",
        "id",
        "ko",
        "pt",
        "ru",
        "zh",
    ],  # few_shot/ (IGLUE's test split) and zero_shot/ (testdev)
    "marvl": ["id", "sw", "ta", "tr", "zh"],
    "xflickrco": ["de", "es", "id", "ja", "ru", "tr", "zh"],
    "wit": ["ar", "bg", "da", "el", "et", "id", "ja", "ko", "tr", "vi"],
}


def config(name: str, iglue_dir="data/iglue", *overrides: str):
    return load_config(FinetuneConfig, FINETUNE / name, [f"data.root={iglue_dir}", *overrides])


def configs_of(task: str, iglue_dir="data/iglue"):
    return [config(name, iglue_dir) for name in TASK_CONFIGS[task]]


# ------------------------------------------------------------------------------------------ what configs name
@pytest.mark.parametrize("task", sorted(TASK_CONFIGS))
def test_configs_run_every_few_shot_split_and_translate_test_language_iglue_ships(task):
    shots: dict[str, set[str]] = {}
    translated: set[str] = set()
    for cfg in configs_of(task):
        for run in few_shot_runs(cfg.data):
            shots.setdefault(run.language, set()).add(run.shots)
            assert run.language in cfg.data.test, (task, run)
        translated |= set(cfg.data.translate_test)
    assert shots == {language: set(counts) for language, counts in IGLUE_FEW_SHOT[task].items()}
    if task in ("xvnli", "xgqa", "marvl", "xflickrco"):  # one config runs them all, in IGLUE's order
        (every,) = [config(name) for name in TASK_CONFIGS[task] if name.endswith("_few_shot.yaml")]
        runs = {}
        for run in few_shot_runs(every.data):
            runs.setdefault(run.language, []).append(run.shots)
        assert runs == IGLUE_FEW_SHOT[task] and every.protocol == Protocol.few_shot
    assert sorted(translated) == sorted(IGLUE_TRANSLATE_TEST[task])


def _shipped(root: Path, *patterns: str, name: str | None = None) -> set[str]:
    files = {str(p) for pattern in patterns for p in root.glob(pattern)}
    return {f for f in files if name is None or re.fullmatch(name, Path(f).name)}


def test_configs_name_every_file_of_the_iglue_folder(iglue_dir):
    """Checked against the annotation folder: each few-shot, few-shot dev/test, translate-test and test file in it
    is named by the task's configs (resolved against that folder), and the files they name there read cleanly."""
    shipped = {
        "xvnli": {
            "few_shot": _shipped(iglue_dir, "XVNLI/annotations/*/train_*.jsonl"),
            "translate_test": _shipped(iglue_dir, "XVNLI/annotations_machine-translate/*/test.jsonl"),
            "test": _shipped(iglue_dir, "XVNLI/annotations/*/test.jsonl"),
        },
        "xgqa": {
            "few_shot": _shipped(iglue_dir, "xGQA/annotations/few_shot/*/train_*.json"),
            "few_shot_dev": _shipped(iglue_dir, "xGQA/annotations/few_shot/*/dev.json"),
            "translate_test": _shipped(iglue_dir, "xGQA/annotations_machine-translate/**/*.json"),
            "test": _shipped(
                iglue_dir, "xGQA/annotations/few_shot/*/test.json", "xGQA/annotations/zero_shot/*"
            ),
        },
        "marvl": {
            "few_shot": _shipped(iglue_dir, "marvl/few_shot/annotations/*.jsonl"),
            "translate_test": _shipped(iglue_dir, "marvl/zero_shot/annotations_machine-translate/*.jsonl"),
            "test": _shipped(iglue_dir, "marvl/zero_shot/annotations/*.jsonl"),
        },
        "xflickrco": {  # train_<N> only: train_ann.jsonl (de) and train.jsonl (ja) are translate-train sets
            "few_shot": _shipped(
                iglue_dir, "xFlickrCO/annotations/*/*.jsonl", name=r"train_\d+(x\d+)?\.jsonl"
            ),
            "translate_test": _shipped(iglue_dir, "xFlickrCO/annotations_machine-translate/*/*.jsonl"),
            "test": _shipped(iglue_dir, "xFlickrCO/annotations/*/test.jsonl"),
        },
        "wit": {
            "translate_test": _shipped(iglue_dir, "wit/annotations_machine-translate/*.jsonl"),
            "test": _shipped(iglue_dir, "wit/annotations/test_*.jsonl"),
        },
    }
    checked = 0
    for task, kinds in shipped.items():
        named: dict[str, set[str]] = {
            "few_shot": set(),
            "few_shot_dev": set(),
            "translate_test": set(),
            "test": set(),
        }
        for cfg in configs_of(task, iglue_dir):
            named["few_shot"] |= set(few_shot_files(cfg.data))
            named["few_shot_dev"] |= set(cfg.data.few_shot_dev.values())
            named["translate_test"] |= set(cfg.data.translate_test.values())
            named["test"] |= set(cfg.data.test.values())
            # every file a config names that the folder holds is read by the task (few-shot, dev, translate-test)
            runner = protocols.TaskSuite(task, cfg.data, env=SimpleNamespace(device="cpu"))
            for path in [
                *few_shot_files(cfg.data),
                *cfg.data.few_shot_dev.values(),
                *cfg.data.translate_test.values(),
            ]:
                if Path(path).is_file():
                    assert runner.read(path).records > 0, path
        for kind, files in kinds.items():
            missing = sorted(files - named[kind])
            assert not missing, f"{task} {kind}: not in the configs: {missing}"
            checked += len(files)
    if not checked:
        pytest.skip(f"no IGLUE files under {iglue_dir}")


def test_wit_selects_on_the_dev_file_iglue_ships():
    for name in ("wit.yaml", "wit_cclm.yaml"):
        (dev,) = config(name).data.dev
        assert dev == "data/iglue/wit/annotations/val_en.jsonl"  # IGLUE's name (not valid_en.jsonl)


def test_xgqa_tests_every_protocol_on_iglues_few_shot_split():
    """IGLUE's xGQA scripts (zero-shot, translate-test, few-shot) all read xGQA/.../few_shot/<lang>/test.json."""
    for name in ("xgqa.yaml", "xgqa_few_shot.yaml", "xgqa_cclm.yaml"):
        cfg = config(name)
        for language, path in cfg.data.test.items():
            assert path == f"data/iglue/xGQA/annotations/few_shot/{language}/test.json", name
        for language, path in cfg.data.translate_test.items():
            assert path == f"data/iglue/xGQA/annotations_machine-translate/few_shot/{language}/test.json", (
                name
            )


def test_few_shot_patterns_expand_to_one_run_per_shot_count(tmp_path):
    assert [
        shots_of(p) for p in ("a/train_48.jsonl", "marvl-id_train10x2.jsonl", "de/train_100x5.jsonl")
    ] == [
        "48",
        "10x2",
        "100x5",
    ]
    data = SimpleNamespace(
        few_shot_train={"ar": "/x/ar/train_{1,48}.jsonl", "id": "/m/marvl-id_train10x2.jsonl"}
    )
    assert few_shot_runs(data) == [
        FewShotRun("ar", "1", "/x/ar/train_1.jsonl"),
        FewShotRun("ar", "48", "/x/ar/train_48.jsonl"),
        FewShotRun("id", "10x2", "/m/marvl-id_train10x2.jsonl"),
    ]
    with pytest.raises(ValueError, match="both 5-shot files"):
        few_shot_runs(SimpleNamespace(few_shot_train={"ar": "/x/{a,b}/train_5.jsonl"}))
    # `cclm iglue check-images CONFIG` reads the expanded files
    files = iglue_cli._files_of_config(config("marvl_few_shot.yaml"))
    assert "data/iglue/marvl/few_shot/annotations/marvl-tr_train10x2.jsonl" in files
    assert not any("{" in f for f in files)


# ------------------------------------------------------------------------------------------------ few-shot runs
class FakeModel:
    """Stands in for a task model: what run_few_shot asks of one."""

    def __init__(self):
        self.weights = {"w": torch.tensor(0.0)}

    def state_dict(self):
        return dict(self.weights)

    def load_state_dict(self, state):
        self.weights = dict(state)

    def save(self, folder, tokenizer=None, extra=None):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "extra.json").write_text(json.dumps(extra))

    def record_results(self, folder, results):
        (Path(folder) / "results.json").write_text(json.dumps(results))


@pytest.fixture
def stub_training(monkeypatch):
    """Training, scoring and image checks replaced: ``calls`` records what each training run selected on."""
    calls = []

    def load_checkpoint(self, directory):
        return FakeModel(), None

    def train(self, model, tokenizer, train_datas, dev_datas, lr, output_dir, run_info=None, batch_size=None):
        calls.append(
            {
                "lr": lr,
                "train": train_datas[0].file,
                "select": [d.file for d in dev_datas],
                "select_examples": [len(d.examples) for d in dev_datas],
                "dir": output_dir,
                "batch_size": batch_size,
            }
        )
        model.weights = {"w": torch.tensor(lr)}
        score = {1e-5: 40.0, 5e-5: 70.0, 1e-4: 55.0}[lr]
        return model, Selection(best_score=score, best_step=3, steps=4)

    def score(self, model, tokenizer, data):
        return {"accuracy": 1e6 * float(model.weights["w"]), "examples": len(data.examples), "skipped": 0}

    monkeypatch.setattr(protocols.TaskRunner, "load_checkpoint", load_checkpoint)
    monkeypatch.setattr(protocols.TaskRunner, "train", train)
    monkeypatch.setattr(protocols.TaskRunner, "score", score)
    monkeypatch.setattr(protocols.TaskRunner, "check_images", lambda self, datas: None)
    return calls


def xvnli_few_shot(iglue_dir, tmp_path, *overrides, train="train_{1,5}.jsonl"):
    """xvnli.yaml few-shot on Arabic train_1 and train_5 (a brace pattern), English train_48 standing in as dev."""
    annotations = iglue_dir / "XVNLI" / "annotations"
    for name in ("ar/train_1.jsonl", "ar/train_5.jsonl", "ar/test.jsonl", "en/train_48.jsonl"):
        if not (annotations / name).is_file():
            pytest.skip(f"XVNLI {name} not under {iglue_dir}")
    cfg = config(
        "xvnli.yaml",
        iglue_dir,
        "protocol=few_shot",
        f"checkpoint={tmp_path / 'english'}",
        f"output_dir={tmp_path / 'out'}",
        "train.device=cpu",
        *overrides,
    )
    cfg.data.dev = [str(annotations / "en" / "train_48.jsonl")]
    cfg.data.few_shot_train = {"ar": str(annotations / "ar" / train)}
    return cfg


def test_few_shot_selects_on_dev_by_default_one_table_per_shot_count(iglue_dir, tmp_path, stub_training):
    cfg = xvnli_few_shot(iglue_dir, tmp_path)
    assert cfg.train.select_on == SelectOn.dev
    tables = few_shot.run_few_shot(cfg)
    assert sorted(tables) == ["few_shot_1", "few_shot_5"]
    assert {tuple(c["select"]) for c in stub_training} == {(cfg.data.dev[0],)}  # never the test file
    for shots, table in (("1", tables["few_shot_1"]), ("5", tables["few_shot_5"])):
        assert (table["protocol"], table["shots"], table["selected_on"]) == ("few_shot", shots, "dev")
        (row,) = table["rows"]
        assert (row["language"], row["shots"], row["selected_on"], row["lr"]) == ("ar", shots, "dev", 5e-5)
        assert row["dev"] == 70.0 and row["dev_by_lr"] == {"1e-05": 40.0, "5e-05": 70.0, "0.0001": 55.0}
        assert row["accuracy"] == pytest.approx(50.0)  # the selected run's weights were scored on test
        folder = tmp_path / "out" / "few_shot" / "ar" / shots
        assert json.loads((folder / "extra.json").read_text())["few_shot"]["selected_on"] == "dev"
        # the model folder records its test score (and its card shows it: TaskModel.record_results)
        recorded = json.loads((folder / "results.json").read_text())
        assert recorded == {f"few_shot_{shots}": {"ar": {"accuracy": pytest.approx(50.0)}}}
        results = tmp_path / "out" / "results" / "xvnli"
        assert json.loads((results / f"few_shot_{shots}.json").read_text())["rows"] == table["rows"]
        markdown = (results / f"few_shot_{shots}.md").read_text()
        assert "selected on dev" in markdown.splitlines()[0]
        assert "| 5e-05 |" in markdown and "| 0.00 |" not in markdown  # the learning rate, not rounded away


def test_few_shot_selected_on_test_is_labelled_everywhere(iglue_dir, tmp_path, stub_training, caplog):
    cfg = xvnli_few_shot(iglue_dir, tmp_path, "train.select_on=test")
    with caplog.at_level(logging.INFO, logger="cclm.tasks.few_shot"):
        tables = few_shot.run_few_shot(cfg)
    test_file = cfg.data.test["ar"]
    assert {tuple(c["select"]) for c in stub_training} == {(test_file,)}  # the reference's selection
    assert sorted(tables) == ["few_shot_1_selected_on_test", "few_shot_5_selected_on_test"]
    results = tmp_path / "out" / "results" / "xvnli"
    for name, table in tables.items():
        on_disk = json.loads((results / f"{name}.json").read_text())
        assert on_disk["selected_on"] == table["selected_on"] == "test"
        (row,) = on_disk["rows"]
        assert row["selected_on"] == "test" and row["test"] == 70.0 and "dev" not in row
        assert "SELECTED ON TEST" in (results / f"{name}.md").read_text().splitlines()[0]
        assert "selected_on" in (results / f"{name}.csv").read_text().splitlines()[0]
    assert not (results / "few_shot_1.json").exists()  # never under a dev-selected table's name
    for shots in ("1", "5"):
        extra = json.loads(
            (tmp_path / "out" / "few_shot_selected_on_test" / "ar" / shots / "extra.json").read_text()
        )
        assert extra["few_shot"]["selected_on"] == "test"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("select_on=test" in m and "TEST" in m for m in warnings)
    assert any("(SELECTED ON TEST)" in r.getMessage() for r in caplog.records)


def test_a_single_shot_count_keeps_the_few_shot_table_name(iglue_dir, tmp_path, stub_training):
    cfg = xvnli_few_shot(iglue_dir, tmp_path, train="train_5.jsonl")
    tables = few_shot.run_few_shot(cfg)
    assert list(tables) == ["few_shot"] and tables["few_shot"]["shots"] == "5"
    assert (tmp_path / "out" / "few_shot" / "ar" / "extra.json").is_file()


def test_zero_shot_refuses_selection_on_test(tmp_path):
    cfg = config("xvnli.yaml", "data/iglue", "train.select_on=test", f"output_dir={tmp_path / 'out'}")
    with pytest.raises(ValueError, match="few-shot selection"):
        protocols.run_zero_shot(cfg)


def test_a_test_file_holding_few_shot_training_images_is_refused_on_request(
    iglue_dir, tmp_path, stub_training
):
    """xGQA's few-shot images come from testdev: the full testdev file would test on them (the default notes
    them and goes on: test_iglue_fidelity.py)."""
    train = iglue_dir / "xGQA/annotations/few_shot/en/train_5.json"
    testdev = iglue_dir / "gqa/annotations/testdev_balanced_questions.json"
    if not (train.is_file() and testdev.is_file()):
        pytest.skip("xGQA few-shot / GQA testdev files not found")
    cfg = config(
        "xgqa.yaml",
        iglue_dir,
        "protocol=few_shot",
        f"checkpoint={tmp_path}",
        f"output_dir={tmp_path / 'out'}",
        "train.device=cpu",
        "data.shared_test_images=refuse",
    )
    cfg.data.few_shot_train, cfg.data.test = {"en": str(train)}, {"en": str(testdev)}
    with pytest.raises(
        ValueError, match=r"5 image\(s\) of .*train_5.json are also named by the test file .*xgqa.yaml"
    ):
        few_shot.run_few_shot(cfg)
    assert not stub_training  # refused before any training


# ------------------------------------------------------------------------------ the reference's hyper-parameters
# Transcribed from zengyan-97/CCLM: configs/cclm-base-ft/<file> (optimizer lr / lr_mult / weight_decay, schedular
# epochs / num_warmup_steps, batch_size[_train], max_tokens, image_res), optim.py (AdamW betas (0.9, 0.98)),
# configs/config_swinB_384.json (window_size 12), dataset/__init__.py (train_transform: RandomResizedCrop scale
# (0.5, 1.0), RandomHorizontalFlip, RandomAugment(2, 7); GQA: train_transform_wohflip) and the task scripts'
# models (VQA: answer decoder; NLVR: two-image fusion = head cclm).
REFERENCE = {
    "xvnli_cclm.yaml": ("XVNLI.yaml", dict(lr=3e-5, epochs=10, batch_size=12, max_length=80, hflip=True)),
    "xgqa_cclm.yaml": (
        "GQA.yaml",
        dict(
            lr=3e-5, epochs=5, batch_size=32, max_length=40, hflip=True, head="cclm", first_token_twice=True
        ),
    ),
    "marvl_cclm.yaml": (
        "NLVR.yaml",
        dict(lr=3e-5, epochs=10, batch_size=10, max_length=0, hflip=True, head="cclm"),
    ),
    "xflickrco_cclm.yaml": (
        "xFlickrCO.yaml",
        dict(lr=3e-5, epochs=10, batch_size=8, max_length=80, hflip=True),
    ),
    "wit_cclm.yaml": (
        "WIT.yaml",
        dict(lr=3e-5, epochs=5, batch_size=8, max_length=80, hflip=True, duplicate_images="merge"),
    ),
}
COMMON = dict(
    image_size=384,
    window_size=12,
    head_lr_mult=2.0,
    weight_decay=0.01,
    warmup_ratio=0.1,
    betas=[0.9, 0.98],
    grad_clip=0.0,  # the task scripts step without clipping (only pretraining and NLVR_pretrain.py clip)
)
# the reference's few-shot runs use the largest split ("we always use the maximum values", its README)
REFERENCE_SHOTS = {"xvnli_cclm.yaml": "48", "xgqa_cclm.yaml": "48", "marvl_cclm.yaml": "10x2"}
REFERENCE_SHOTS["xflickrco_cclm.yaml"] = "100"


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_cclm_configs_carry_the_reference_hyper_parameters(name):
    reference_file, values = REFERENCE[name]
    cfg = config(name)
    expect = {
        **COMMON,
        "head": "iglue",
        "k_test": 128,
        "duplicate_images": "iglue",
        "first_token_twice": False,
        **values,
    }
    got = {
        "image_size": cfg.image_size,
        "window_size": cfg.window_size,
        "head": str(cfg.head),
        "lr": cfg.train.lr,
        "epochs": cfg.train.epochs,
        "batch_size": cfg.train.batch_size,
        "head_lr_mult": cfg.train.head_lr_mult,
        "weight_decay": cfg.train.weight_decay,
        "warmup_ratio": cfg.train.warmup_ratio,
        "betas": list(cfg.train.betas),
        "grad_clip": cfg.train.grad_clip,
        "max_length": cfg.data.max_length,
        "hflip": cfg.data.hflip,
        "k_test": cfg.eval.k_test,
        "duplicate_images": str(cfg.data.duplicate_images),
        "first_token_twice": cfg.eval.first_token_twice,
    }
    assert got == expect, reference_file  # the YAML numbers are the reference's, exactly
    assert cfg.data.augment and cfg.data.randaugment and cfg.data.crop_scale_min == 0.5, reference_file
    assert (
        cfg.train.select_on == SelectOn.dev and cfg.protocol == Protocol.zero_shot
    )  # selection stays on dev
    # the same task and languages as IGLUE's config of the task
    base = config(name.replace("_cclm", ""))
    assert cfg.task == base.task and set(cfg.data.test) == set(base.data.test)
    assert set(cfg.data.translate_test) == set(base.data.translate_test)
    if name in REFERENCE_SHOTS:
        assert {run.shots for run in few_shot_runs(cfg.data)} == {REFERENCE_SHOTS[name]}


def test_start_model_resizes_the_pretrained_vision_tower_and_builds_the_configured_head(
    tiny_model_dir, monkeypatch
):
    calls = []
    fake = types.ModuleType("cclm.model.resize")
    fake.resize_vision = lambda backbone, size, window=None: calls.append(
        (type(backbone).__name__, size, window)
    )
    monkeypatch.setitem(sys.modules, "cclm.model.resize", fake)
    for overrides, expected in (
        (["image_size=64", "window_size=12", "head=cclm"], [("CrossViewModel", 64, 12)]),
        (["image_size=64"], [("CrossViewModel", 64, None)]),
        ([], []),
    ):
        calls.clear()
        cfg = config(
            "xvnli.yaml", "data/iglue", f"pretrained={tiny_model_dir}", "train.device=cpu", *overrides
        )
        model, _ = protocols.TaskRunner(cfg).start_model([])
        assert calls == expected
        assert model.head_style == str(cfg.head)


def test_the_task_data_settings_reach_training_batches_and_the_collator(tiny_model_dir, iglue_dir):
    """``data.augment`` (training images only) and ``data.max_length`` (the task's cap, below or above the
    model's: the reference fine-tunes at 80 tokens models pretrained at 40), refused past the position table."""
    path = iglue_dir / "XVNLI/annotations/ar/train_5.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    for overrides, augmented in ((["data.augment=true", "data.max_length=5"], True), ([], False)):
        cfg = config("xvnli.yaml", iglue_dir, f"pretrained={tiny_model_dir}", "train.device=cpu", *overrides)
        runner = protocols.TaskRunner(cfg)
        model, tokenizer = runner.start_model([])
        batches = runner.train_batches([runner.read(str(path))], model, tokenizer)
        assert (batches.dataset.augment is not None) == augmented
        model_length = int(model.backbone.cfg.text.max_length)
        assert runner.collator(model, tokenizer).max_length == (5 if augmented else model_length)
    longer = model_length + 16  # the tiny model: 32 tokens pretrained, a table of 66 positions (64 tokens)
    cfg = config("xvnli.yaml", iglue_dir, f"pretrained={tiny_model_dir}", f"data.max_length={longer}")
    runner = protocols.TaskRunner(cfg)
    model, tokenizer = runner.start_model([])
    collator = runner.collator(model, tokenizer)
    assert collator.max_length == longer
    assert collator.tokenize(["word " * 100])["text_ids"].shape[1] == longer
    cfg = config("xvnli.yaml", iglue_dir, f"pretrained={tiny_model_dir}", "data.max_length=80")
    runner = protocols.TaskRunner(cfg)
    model, tokenizer = runner.start_model([])
    with pytest.raises(
        ConfigError, match=r"data.max_length=80: the text encoder has 66 positions \(at most 64"
    ):
        runner.collator(model, tokenizer)


def test_languages_keeps_only_those_languages_files():
    cfg = config("xvnli_few_shot.yaml", "data/iglue", "languages=[ar,ru]")
    all_languages = config("xvnli_few_shot.yaml", "data/iglue")
    protocols.select_languages(cfg)
    assert set(cfg.data.test) == {"ar", "ru"} and set(cfg.data.few_shot_train) == {"ar", "ru"}
    assert set(cfg.data.translate_test) == {"ar", "ru"} & set(all_languages.data.translate_test)
    assert cfg.data.train == all_languages.data.train and cfg.data.dev == all_languages.data.dev
    assert cfg.data.test["ar"] == all_languages.data.test["ar"]
    with pytest.raises(
        ConfigError, match=r"languages: xx not named by this config's files \(it has: ar, en, es, fr, ru\)"
    ):
        protocols.TaskRunner(config("xvnli.yaml", "data/iglue", "languages=[xx]", "train.device=cpu"))
