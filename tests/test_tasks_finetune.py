"""Every task fine-tunes end to end for a few steps on its real IGLUE annotation file, paired with generated
placeholder images, and writes its results tables; a saved task model evaluates to the same table; few-shot
starts from the given checkpoint and selects its learning rate on dev; the shared loop keeps the best dev weights."""

from __future__ import annotations

import hashlib
import json
import types

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file

from cclm.cli import main as cclm_main
from cclm.config import DeepSpeedConfig, FinetuneConfig, ModelConfig, Protocol, TaskHeadStyle, load_config
from cclm.model.cross_view import CrossViewModel
from cclm.runtime import engine, optim
from cclm.runtime import trainer as trainer_module
from cclm.runtime.env import init_distributed
from cclm.runtime.schedule import lr_factor
from cclm.runtime.sources import EpochBatches
from cclm.tasks import few_shot, finetune, get_task, protocols
from cclm.tasks.cli import main as finetune_main
from cclm.tasks.metrics import average_non_english
from cclm.tasks.task_model import TaskModel
from cclm.train.launch import local_torchrun_command

from .conftest import REPO
from .pretrain_runs import quiet_env

IMAGE_ROOTS = ("flickr30k", "coco", "gqa", "marvl", "nlvr2", "wit")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny random cclm model folder (weights + tokenizer), standing in for a pretrained one."""
    cfg = load_config(ModelConfig, REPO / "configs" / "model" / "tiny.yaml")
    cfg.text.encoder["vocab_size"] = len(tiny_tokenizer)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("pretrained")
    CrossViewModel(cfg).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(str(folder))
    return folder


def task_files(cfg) -> list[str]:
    data = cfg.data
    return [
        *data.train,
        *data.dev,
        *data.test.values(),
        *data.translate_test.values(),
        *data.few_shot_train.values(),
        *data.few_shot_dev.values(),
    ]


def make_placeholder_images(cfg) -> int:
    """Write a 32 px image for every image the configured files will open (only those)."""
    task = get_task(cfg.task)
    labels = task.labels(cfg.data) if task.KIND != "retrieval" else None
    written = 0
    for path in task_files(cfg):
        for ref in task.read(path, labels, cfg.data.max_examples).used_image_refs:
            target = ref.resolve(cfg.data.image_roots)
            if target.exists() or ref.root is None:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            seed = int(hashlib.md5(ref.path.encode()).hexdigest()[:8], 16)
            pixels = torch.randint(0, 256, (32, 32, 3), generator=torch.Generator().manual_seed(seed))
            Image.fromarray(pixels.to(torch.uint8).numpy()).save(target, format="PNG")  # PIL reads by content
            written += 1
    return written


def iglue(iglue_dir, relative: str) -> str:
    return str(iglue_dir / relative)


def task_config(task: str, iglue_dir, tmp_path, pretrained_dir, **data):
    """configs/finetune/<task>.yaml with the files present in the annotation folder and a few-step schedule."""
    cfg = load_config(
        FinetuneConfig,
        REPO / "configs" / "finetune" / f"{task}.yaml",
        [
            f"data.root={iglue_dir}",
            f"pretrained={pretrained_dir}",
            f"output_dir={tmp_path / 'run'}",
            "data.max_examples=6",
            "train.max_steps=2",
            "train.batch_size=4",
            "eval.batch_size=8",
            "eval.k_test=4",
            "train.device=cpu",
            "train.time_limit_minutes=0",
        ],
    )
    for key in ("test", "translate_test", "few_shot_train", "few_shot_dev"):
        setattr(cfg.data, key, data.get(key, {}))
    cfg.data.train, cfg.data.dev = data["train"], data["dev"]
    cfg.data.image_roots = {name: str(tmp_path / "images" / name) for name in IMAGE_ROOTS}
    return cfg


def task_setups(d):
    """Per task: the real files used (English training sources where present, else the nearest real file)."""
    return {
        "xvnli": dict(
            train=[iglue(d, "XVNLI/annotations/en/train_48.jsonl")],
            dev=[iglue(d, "XVNLI/annotations/en/train_5.jsonl")],
            test={lang: iglue(d, f"XVNLI/annotations/{lang}/test.jsonl") for lang in ("en", "ar", "fr")},
            translate_test={"ar": iglue(d, "XVNLI/annotations_machine-translate/ar/test.jsonl")},
        ),
        # the shared folder holds no xGQA test split: the per-language dev files stand in as evaluation files
        "xgqa": dict(
            train=[iglue(d, "xGQA/annotations/few_shot/en/train_5.json")],
            dev=[iglue(d, "xGQA/annotations/few_shot/en/train_1.json")],
            test={
                "en": iglue(d, "gqa/annotations/testdev_balanced_questions.json"),
                "de": iglue(d, "xGQA/annotations/few_shot/de/dev.json"),
                "zh": iglue(d, "xGQA/annotations/few_shot/zh/dev.json"),
            },
        ),
        "marvl": dict(
            train=[iglue(d, "nlvr2/annotations/test.jsonl")],
            dev=[iglue(d, "marvl/few_shot/annotations/marvl-id_train1.jsonl")],
            test={
                "en": iglue(d, "nlvr2/annotations/test.jsonl"),
                "id": iglue(d, "marvl/zero_shot/annotations/marvl-id.jsonl"),
                "zh": iglue(d, "marvl/zero_shot/annotations/marvl-zh.jsonl"),
            },
            translate_test={
                "zh": iglue(d, "marvl/zero_shot/annotations_machine-translate/marvl-zh_gmt.jsonl")
            },
        ),
        "xflickrco": dict(
            train=[iglue(d, "flickr30k/annotations/valid_ann.jsonl")],
            dev=[iglue(d, "flickr30k/annotations/test_ann.jsonl")],
            test={lang: iglue(d, f"xFlickrCO/annotations/{lang}/test.jsonl") for lang in ("en", "de", "ja")},
            translate_test={"ja": iglue(d, "xFlickrCO/annotations_machine-translate/ja/test_gmt.jsonl")},
        ),
        "wit": dict(
            train=[iglue(d, "wit/annotations/test_en.jsonl")],
            dev=[iglue(d, "wit/annotations/test_da.jsonl")],
            test={lang: iglue(d, f"wit/annotations/test_{lang}.jsonl") for lang in ("en", "ar", "ja")},
            translate_test={"ar": iglue(d, "wit/annotations_machine-translate/test_ar_gmt.jsonl")},
        ),
    }


def check_table(table: dict, languages: list[str], runner) -> None:
    assert [row["language"] for row in table["rows"]] == languages
    columns, _ = runner.columns()
    for row in table["rows"]:
        for column in columns:
            assert 0.0 <= row[column] <= 100.0
    expected = {
        c: sum(r[c] for r in table["rows"] if r["language"] != "en")
        / sum(r["language"] != "en" for r in table["rows"])
        for c in columns
    }
    assert table["average_non_english"] == pytest.approx(expected)
    assert table["average_non_english"] == pytest.approx(average_non_english(table["rows"], columns))


@pytest.mark.parametrize("task", ["xvnli", "xgqa", "marvl", "xflickrco", "wit"])
def test_task_finetunes_and_writes_results(task, iglue_dir, tmp_path, pretrained_dir):
    cfg = task_config(task, iglue_dir, tmp_path, pretrained_dir, **task_setups(iglue_dir)[task])
    assert make_placeholder_images(cfg) > 0
    tables = protocols.run_zero_shot(cfg)
    runner = protocols.TaskRunner(cfg)
    results = tmp_path / "run" / "results" / task
    for protocol, files in (("zero_shot", cfg.data.test), ("translate_test", cfg.data.translate_test)):
        if not files:
            assert protocol not in tables
            continue
        for suffix in ("json", "csv", "md"):
            assert (results / f"{protocol}.{suffix}").is_file()
        on_disk = json.loads((results / f"{protocol}.json").read_text())
        assert on_disk["rows"] == tables[protocol]["rows"]
        check_table(on_disk, list(files), runner)
    history = json.loads((tmp_path / "run" / "train_history.json").read_text())
    assert history and history[-1]["step"] == 2
    # the task model's folder records its test scores, and its card shows them
    recorded = json.loads((tmp_path / "run" / "model" / "eval_results.json").read_text())
    first = tables["zero_shot"]["rows"][0]
    metric = runner.columns()[0][0]
    assert recorded["zero_shot"][first["language"]][metric] == pytest.approx(first[metric])
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert "No evaluation results" not in card and f"| zero_shot / {first['language']} |" in card

    # the saved task model, evaluated through `cclm evaluate`, reproduces the zero-shot table
    checkpoint = tmp_path / "run" / "model"
    config_file = tmp_path / "task.yaml"
    OmegaConf.save(cfg, config_file)
    # through the top-level CLI: `cclm evaluate` delegates fine-tuning configs to cclm.tasks.cli.evaluate_main
    code = cclm_main(
        ["evaluate", str(config_file), f"checkpoint={checkpoint}", f"output_dir={tmp_path / 'eval'}"]
    )
    assert code == 0
    again = json.loads((tmp_path / "eval" / "results" / task / "zero_shot.json").read_text())
    columns, _ = runner.columns()
    for row, before in zip(again["rows"], tables["zero_shot"]["rows"]):
        for column in columns:
            assert row[column] == pytest.approx(before[column], abs=1e-6)


def test_easy_vqa_finetunes_on_real_images(tmp_path, pretrained_dir):
    pytest.importorskip("easy_vqa")
    config_file = tmp_path / "easy.yaml"
    config_file.write_text((REPO / "configs/finetune/easy_vqa.yaml").read_text())
    code = finetune_main(
        [
            "finetune",
            str(config_file),
            f"pretrained={pretrained_dir}",
            f"output_dir={tmp_path}",
            "data.max_examples=8",
            "train.max_steps=2",
            "train.batch_size=4",
            "train.device=cpu",
        ]
    )
    assert code == 0
    table = json.loads((tmp_path / "results" / "easy_vqa" / "zero_shot.json").read_text())
    assert [r["language"] for r in table["rows"]] == ["en"] and table["rows"][0]["examples"] == 8
    assert table["average_non_english"] is None  # English only: no IGLUE average


def test_few_shot_starts_from_checkpoint_and_selects_lr_on_dev(
    iglue_dir, tmp_path, pretrained_dir, monkeypatch
):
    setup = task_setups(iglue_dir)["xvnli"]
    cfg = task_config("xvnli", iglue_dir, tmp_path, pretrained_dir, **setup)
    cfg.data.translate_test = {}
    make_placeholder_images(cfg)
    protocols.run_zero_shot(cfg)
    checkpoint = tmp_path / "run" / "model"

    few = task_config(
        "xvnli",
        iglue_dir,
        tmp_path,
        pretrained_dir,
        train=setup["train"],
        dev=setup["dev"],
        test=setup["test"],
        few_shot_train={"ar": iglue(iglue_dir, "XVNLI/annotations/ar/train_5.jsonl")},
        few_shot_dev={"ar": iglue(iglue_dir, "XVNLI/annotations/ar/train_48.jsonl")},
    )
    few.protocol, few.checkpoint, few.output_dir = Protocol.few_shot, str(checkpoint), str(tmp_path / "few")
    few.train.lr_sweep = [1e-5, 3e-3]
    make_placeholder_images(few)

    first_step_weights = []
    real_build = optim.build_optimizer

    def spy(model, *args, **kwargs):
        optimizer = real_build(model, *args, **kwargs)
        real_step = optimizer.step

        def step(self, *step_args, **step_kwargs):
            if not getattr(self, "_seen", False):
                self._seen = True
                first_step_weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
            return real_step(*step_args, **step_kwargs)

        optimizer.step = types.MethodType(step, optimizer)  # a bound method, as the LR scheduler expects
        return optimizer

    monkeypatch.setattr(engine, "build_optimizer", spy)
    table = few_shot.run_few_shot(few)["few_shot"]

    # every learning rate of the sweep started from the checkpoint's weights (not from the previous run's)
    saved = {f"backbone.{k}": v for k, v in load_file(str(checkpoint / "model.safetensors")).items()}
    saved.update({f"head.{k}": v for k, v in load_file(str(checkpoint / "task_head.safetensors")).items()})
    assert len(first_step_weights) == 2
    for weights in first_step_weights:
        assert len(set(weights) & set(saved)) > 0.9 * len(weights)  # tied weights are stored once
        for name in set(weights) & set(saved):
            assert torch.equal(weights[name], saved[name]), name

    (row,) = table["rows"]
    assert row["language"] == "ar"
    assert row["lr"] == float(max(row["dev_by_lr"], key=row["dev_by_lr"].get))
    assert row["dev"] == max(row["dev_by_lr"].values())
    # the kept model is the dev-selected one: re-scoring it gives the recorded dev and test numbers
    runner = protocols.TaskRunner(few)
    model, tokenizer = runner.load_checkpoint(str(tmp_path / "few" / "few_shot" / "ar"))
    assert runner.score(model, tokenizer, runner.read(few.data.few_shot_dev["ar"], scored=True))[
        "accuracy"
    ] == pytest.approx(row["dev"])
    assert runner.score(model, tokenizer, runner.read(few.data.test["ar"], scored=True))[
        "accuracy"
    ] == pytest.approx(row["accuracy"])
    assert (tmp_path / "few" / "results" / "xvnli" / "few_shot.md").is_file()
    recorded = json.loads((tmp_path / "few" / "few_shot" / "ar" / "eval_results.json").read_text())
    assert recorded == {f"few_shot_{row['shots']}": {"ar": {"accuracy": row["accuracy"]}}}


def test_loop_keeps_the_best_dev_weights(pretrained_dir, tmp_path):
    backbone = CrossViewModel.from_pretrained(pretrained_dir)
    model = TaskModel(backbone, "xvnli", "single", ["contradiction", "neutral", "entailment"])
    batch = xvnli_batch()
    scripted, snapshots = iter([50.0, 80.0, 60.0]), []

    def dev_score(m):
        snapshots.append({k: v.clone() for k, v in m.state_dict().items()})
        return next(scripted)

    source = EpochBatches([batch], 1, lambda items: items[0], seed=0)
    model, selection = finetune.finetune(
        model,
        source,
        dev_score,
        finetune.FinetuneSettings(lr=1e-3, epochs=3),
        env=init_distributed("cpu"),
        output_dir=tmp_path / "run",
    )
    assert (selection.best_score, selection.best_step, selection.steps) == (80.0, 2, 3)
    assert not torch.equal(snapshots[1]["head.net.3.weight"], snapshots[2]["head.net.3.weight"])
    for key, value in model.state_dict().items():
        assert torch.equal(value, snapshots[1][key]), key


def xvnli_batch() -> dict[str, torch.Tensor]:
    """Four random image + hypothesis examples with XVNLI labels."""
    return {
        "images": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8),
        "text_ids": torch.randint(5, 50, (4, 6)),
        "text_mask": torch.ones(4, 6, dtype=torch.long),
        "labels": torch.tensor([0, 1, 2, 1]),
    }


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_sharded_fine_tuning_keeps_the_best_dev_weights(pretrained_dir, tmp_path, stage):
    """Under ZeRO-2 and ZeRO-3 (weights partitioned across ranks: the dev evaluation sees them gathered, and the
    selected weights come back into a rebuilt module) the run keeps the weights of its best dev evaluation."""
    backbone = CrossViewModel.from_pretrained(pretrained_dir)
    model = TaskModel(backbone, "xvnli", "single", ["contradiction", "neutral", "entailment"])
    batch = xvnli_batch()
    scripted, snapshots = iter([50.0, 80.0, 60.0]), []

    def dev_score(m):
        assert all(p.numel() > 0 for p in m.parameters())  # whole weights, also under ZeRO-3
        snapshots.append({k: v.detach().clone().float() for k, v in m.state_dict().items()})
        return next(scripted)

    trained, selection = finetune.finetune(
        model,
        EpochBatches([batch], 1, lambda items: items[0], seed=0),
        dev_score,
        finetune.FinetuneSettings(lr=1e-3, epochs=3),
        env=init_distributed("cpu"),
        output_dir=tmp_path / "run",
        deepspeed_cfg=DeepSpeedConfig(zero_stage=stage),
    )
    assert (selection.best_score, selection.best_step) == (80.0, 2)
    assert trained is not model if stage == 3 else trained is model  # ZeRO-3: a rebuilt, whole module
    assert not torch.equal(snapshots[1]["head.net.3.weight"], snapshots[2]["head.net.3.weight"])
    for key, value in trained.state_dict().items():
        assert torch.equal(value, snapshots[1][key]), key


def test_classifier_learns_real_easy_vqa_examples(pretrained_dir, tmp_path):
    pytest.importorskip("easy_vqa")
    cfg = load_config(
        FinetuneConfig,
        REPO / "configs/finetune/easy_vqa.yaml",
        [f"pretrained={pretrained_dir}", "data.max_examples=8", "train.device=cpu"],
    )
    runner = protocols.TaskRunner(cfg)
    data = runner.read("train")
    model, tokenizer = runner.start_model([data])
    before = runner.score(model, tokenizer, data)["accuracy"]
    _, selection = finetune.finetune(
        model,
        runner.train_batches([data], model, tokenizer),
        lambda m: runner.score(m, tokenizer, data)["accuracy"],
        finetune.FinetuneSettings(lr=2e-3, epochs=60, head_lr_mult=1.0, warmup_ratio=0.0, eval_every=10),
        env=runner.env,
        output_dir=tmp_path / "run",
    )
    assert selection.best_score == 100.0 > before


def test_random_init_trains_its_own_tokenizer_and_saves_a_complete_task_folder(tmp_path):
    pytest.importorskip("easy_vqa")
    cfg = load_config(
        FinetuneConfig,
        REPO / "configs/finetune/easy_vqa.yaml",
        [
            f"output_dir={tmp_path}",
            "data.max_examples=8",
            "train.max_steps=1",
            "train.batch_size=4",
            "train.device=cpu",
            "model_overrides=[vision.image_size=48,vision.tower.image_size=48]",
        ],
    )
    assert cfg.pretrained is None
    table = protocols.run_zero_shot(cfg)["zero_shot"]
    assert table["rows"][0]["examples"] == 8
    folder = tmp_path / "model"
    for name in ("config.json", "model.safetensors", "task_head.safetensors", "task.json", "tokenizer.json"):
        assert (folder / name).is_file(), name
    model = TaskModel.load(folder)
    assert model.backbone.cfg.vision.image_size == 48
    assert model.label_names == sorted(get_task("easy_vqa").labels())


def test_schedule_warms_up_then_decays_to_zero_at_the_end():
    def factor(step, warmup=10):  # fine-tuning's schedule: linear warm-up over 10% of 100 steps, linear decay
        return lr_factor(step, 100, warmup, "linear")

    assert [round(factor(s), 6) for s in (4, 10, 55, 100)] == [0.5, 1.0, 0.5, 0.0]
    assert factor(0, warmup=0) == 1.0


class TrainedSteps(list):
    """(output folder name, step) of every step a run trained; ``result``: what the run returned."""

    result: object = None


def crash_then_resume(monkeypatch, run, crashing_cfg, resumed_cfg, crash_before) -> TrainedSteps:
    """``run(crashing_cfg)`` dies with an injected error before the first step where ``crash_before(trainer)``;
    then ``run(resumed_cfg)`` with ``resume=auto``, recording every step it trains."""
    real_step, trained = trainer_module.Trainer.train_step, TrainedSteps()

    def crashing_step(self, stats):
        if crash_before(self):
            raise RuntimeError(f"injected crash at step {self.step + 1} of {self.output_dir.name}")
        return real_step(self, stats)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", crashing_step)
    with pytest.raises(RuntimeError, match="injected crash"):
        run(crashing_cfg)

    def counting_step(self, stats):
        trained.append((self.output_dir.name, self.step + 1))
        return real_step(self, stats)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", counting_step)
    resumed_cfg.resume = "auto"
    trained.result = run(resumed_cfg)
    return trained


def test_finetuning_resumes_exactly_after_a_crash(iglue_dir, tmp_path, pretrained_dir, monkeypatch):
    """A fine-tuning run that dies after its step-3 checkpoint and is resumed (``resume=auto``) trains steps 4-8
    again and ends exactly where the uninterrupted run ends: same losses, same dev selection, same weights.
    With a DataLoader worker, so the data order must not depend on the global RNG."""
    setup = task_setups(iglue_dir)["xvnli"]

    def config(out):
        cfg = task_config(
            "xvnli", iglue_dir, tmp_path, pretrained_dir, train=setup["train"], dev=setup["dev"]
        )
        cfg.output_dir = str(tmp_path / out)
        cfg.data.max_examples = 12
        cfg.train.max_steps, cfg.train.save_every, cfg.train.eval_every = 8, 3, 2
        cfg.train.log_every, cfg.train.num_workers, cfg.train.lr = 1, 1, 1e-3
        return cfg

    straight = config("straight")
    make_placeholder_images(straight)
    protocols.run_zero_shot(straight)

    trained = crash_then_resume(
        monkeypatch, protocols.run_zero_shot, config("resumed"), config("resumed"), lambda t: t.step == 5
    )
    assert [step for _, step in trained] == [4, 5, 6, 7, 8]  # really resumed from the step-3 checkpoint
    expected = [
        json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    ]
    got = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got] == [r["step"] for r in expected] == list(range(1, 9))
    for want, have in zip(expected, got):
        for key in ("loss", "task/ce", "dev"):
            if key in want:
                assert have[key] == pytest.approx(want[key], abs=1e-6), (want["step"], key)
    history = [
        json.loads((tmp_path / run / "train_history.json").read_text()) for run in ("straight", "resumed")
    ]
    assert [(h["step"], h["dev"]) for h in history[0]] == [(h["step"], h["dev"]) for h in history[1]]
    a = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model" / "model.safetensors"))
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name


def test_a_few_shot_sweep_resumes_where_it_stopped(iglue_dir, tmp_path, pretrained_dir, monkeypatch):
    """A few-shot learning-rate sweep that crashes in its second run is continued with ``resume=auto``: the finished
    run loads its last checkpoint and takes no step, the crashed one trains only its remaining steps, and the
    table (selected lr, dev by lr, test score) equals the uninterrupted sweep's."""
    setup = task_setups(iglue_dir)["xvnli"]
    english = task_config(
        "xvnli", iglue_dir, tmp_path, pretrained_dir, train=setup["train"], dev=setup["dev"]
    )
    make_placeholder_images(english)
    protocols.run_zero_shot(english)

    def config(out: str):
        few = task_config(
            "xvnli",
            iglue_dir,
            tmp_path,
            pretrained_dir,
            train=setup["train"],
            dev=setup["dev"],
            test={"ar": setup["test"]["ar"]},
            few_shot_train={"ar": iglue(iglue_dir, "XVNLI/annotations/ar/train_5.jsonl")},
            few_shot_dev={"ar": iglue(iglue_dir, "XVNLI/annotations/ar/train_48.jsonl")},
        )
        few.protocol, few.checkpoint = Protocol.few_shot, str(tmp_path / "run" / "model")
        few.output_dir = str(tmp_path / out)
        few.train.lr_sweep = [1e-4, 3e-3]
        few.train.max_steps, few.train.save_every, few.train.eval_every, few.train.log_every = 4, 2, 2, 1
        return few

    straight = config("straight")
    make_placeholder_images(straight)
    expected = few_shot.run_few_shot(straight)["few_shot"]

    trained = crash_then_resume(  # in step 4 of the second learning rate
        monkeypatch,
        few_shot.run_few_shot,
        config("resumed"),
        config("resumed"),
        lambda t: t.output_dir.name == "lr_0.003" and t.step == 3,
    )
    got = trained.result["few_shot"]
    assert list(trained) == [
        ("lr_0.003", 3),
        ("lr_0.003", 4),
    ]  # lr 1e-4 had finished; 3e-3 resumed at its step 2
    assert got["rows"][0]["dev_by_lr"] == pytest.approx(expected["rows"][0]["dev_by_lr"], abs=1e-6)
    for key in ("lr", "dev", "accuracy"):
        assert got["rows"][0][key] == pytest.approx(expected["rows"][0][key], abs=1e-6), key


def test_two_ranks_fine_tune_like_one_rank_with_the_whole_batch(iglue_dir, tmp_path, pretrained_dir):
    """``torchrun`` with 2 gloo ranks x batch 2 takes the same optimizer steps as 1 rank x batch 4 (each rank takes
    its share of every epoch's order; gradients are averaged): same losses, gradient norms and dev scores; only rank
    0 writes."""
    import subprocess

    setup = task_setups(iglue_dir)["xvnli"]
    images = {name: str(tmp_path / "images" / name) for name in IMAGE_ROOTS}

    def overrides(out, batch_size):
        return [
            f"data.root={iglue_dir}",
            f"pretrained={pretrained_dir}",
            f"output_dir={tmp_path / out}",
            f"data.train={json.dumps(setup['train'])}",
            f"data.dev={json.dumps(setup['dev'])}",
            f"data.test={json.dumps({'ar': setup['test']['ar']})}",
            "data.translate_test={}",
            f"data.image_roots={json.dumps(images)}",
            "data.max_examples=16",
            "train.max_steps=2",
            "train.eval_every=1",
            "train.log_every=1",
            f"train.batch_size={batch_size}",
            "train.lr=1e-3",
            "train.device=cpu",
            "eval.batch_size=8",
        ]

    yaml = REPO / "configs" / "finetune" / "xvnli.yaml"
    one = load_config(FinetuneConfig, yaml, overrides("one", 4))
    make_placeholder_images(one)
    assert len(runner_examples(one)) >= 8  # both steps inside the first epoch: no padding, same examples
    protocols.run_zero_shot(one)
    command = local_torchrun_command(2, "-m", "cclm.cli", "finetune", str(yaml), *overrides("two", 2))
    proc = subprocess.run(command, cwd=REPO, env=quiet_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    def records(out):
        return [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]

    single, double = records("one"), records("two")
    assert [r["step"] for r in double] == [r["step"] for r in single] == [1, 2]
    for a, b in zip(single, double):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4) and b["dev"] == pytest.approx(
            a["dev"], abs=1e-6
        )
        # ZeRO-0 keeps no norm of its own: the trainer's is of the gradients averaged over both ranks (rank 0's
        # own half-batch gradients would give another norm)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    table = json.loads((tmp_path / "two" / "results" / "xvnli" / "zero_shot.json").read_text())
    expected = json.loads((tmp_path / "one" / "results" / "xvnli" / "zero_shot.json").read_text())
    assert table["rows"][0]["accuracy"] == pytest.approx(expected["rows"][0]["accuracy"])
    assert (tmp_path / "two" / "model" / "task_head.safetensors").is_file()


def runner_examples(cfg) -> list:
    task = get_task(cfg.task)
    return [
        e
        for path in cfg.data.train
        for e in task.read(path, task.labels(cfg.data), cfg.data.max_examples).examples
    ]


@pytest.mark.parametrize("task", ["xgqa", "marvl"])
def test_cclm_heads_finetune_save_and_evaluate_through_the_protocol(
    task, iglue_dir, tmp_path, pretrained_dir
):
    """``head: cclm``: xGQA trains the answer decoder (its answer list tokenised from the label vocabulary by the
    run's collator), MaRVL the doubled fusion stack; the saved folder keeps the head, and evaluating it reproduces
    the zero-shot table."""
    setup = dict(task_setups(iglue_dir)[task], translate_test={})
    cfg = task_config(task, iglue_dir, tmp_path, pretrained_dir, **setup)
    cfg.head = TaskHeadStyle.cclm
    make_placeholder_images(cfg)
    tables = protocols.run_zero_shot(cfg)
    checkpoint = tmp_path / "run" / "model"
    model = TaskModel.load(checkpoint)
    assert (json.loads((checkpoint / "task.json").read_text())["head"], model.head_style) == ("cclm", "cclm")
    if task == "xgqa":
        assert model.decodes_answers and model.head.answer_ids.shape[0] == len(model.label_names) == 1842
    else:
        assert model.pair_fusion is not None
    config_file = tmp_path / "task.yaml"
    OmegaConf.save(cfg, config_file)
    code = cclm_main(
        ["evaluate", str(config_file), f"checkpoint={checkpoint}", f"output_dir={tmp_path / 'eval'}"]
    )
    assert code == 0
    again = json.loads((tmp_path / "eval" / "results" / task / "zero_shot.json").read_text())
    for row, before in zip(again["rows"], tables["zero_shot"]["rows"], strict=True):
        assert row["accuracy"] == pytest.approx(before["accuracy"], abs=1e-6)
