"""Exact resume of the multi-stage recipes (docs/reliability.md): SIGUSR1 (SLURM's warning before the time limit)
stops a recipe in one of its stages with a checkpoint; ``resume=auto`` then restores the stages that had finished
from their last checkpoints without a step, continues the interrupted one and runs the rest, and the results and
weights equal those of the run that was never stopped. Tiny models, a few steps per stage, CPU, one thread."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cclm.config import ConfigError, CViLVQARecipeConfig, MLARecipeConfig, load_config
from cclm.errors import RunInterrupted, UserError
from cclm.recipes import mla_run, runner
from cclm.recipes.mla import MLAModel
from cclm.recipes.mla_run import ACQUIRED_WEIGHTS, FINETUNED_CLIP, run_mla
from cclm.runtime.logging import METRICS_FILE
from cclm.tasks.task_model import HEAD_WEIGHTS

from ..conftest import build_mla_world

REPO = Path(__file__).resolve().parents[2]
MLA_YAML = REPO / "configs" / "recipes" / "mla_demo.yaml"
VQA_YAML = REPO / "configs" / "recipes" / "cvil_easy_vqa.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    world = tmp_path_factory.mktemp("resume_world") / "world"
    return build_mla_world(world, 120, seed=0, heldout_images=16, heldout_langs=("en", "ja"))


@pytest.fixture
def stages_run(monkeypatch) -> dict:
    """Counts the steps each stage trains in this process (``steps``); ``stop_at = (stage, step)`` sends this
    process SIGUSR1 after that step of that stage, as SLURM would."""
    record: dict = {"steps": {}, "stop_at": None}

    class Recording(runner.Trainer):
        def train_step(self, stats):
            super().train_step(stats)
            stage = self.output_dir.name
            record["steps"][stage] = record["steps"].get(stage, 0) + 1
            if record["stop_at"] == (stage, self.step):
                os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(runner, "Trainer", Recording)
    return record


def mla_cfg(
    world: Path, out: Path, *overrides: str, finetune: bool = True, save_every: int = 2
) -> MLARecipeConfig:
    tuning = [
        f"finetune.data={{shards: {world}/image_caption, batch_size: 8}}",
        "finetune.en.steps=3",
        "finetune.all.steps=2",
    ]
    base = [
        f"world={world}",
        f"output_dir={out}",
        "languages=[ja]",
        "clip.pretrained=null",
        "threads=1",
        "nlt.steps=2",
        "le.steps=3",
        *(tuning if finetune else []),
        "data.parallel_text.batch_size=8",
        "data.image_caption.batch_size=8",
        "train.log_every=1",
        f"train.save_every={save_every}",
        "train.scheduler.warmup_steps=0",
    ]
    return load_config(MLARecipeConfig, MLA_YAML, [*base, *overrides])


def losses(stage_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (stage_dir / METRICS_FILE).read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("signalled", ["in a stage", "between stages"])
def test_mla_stopped_in_a_stage_resumes_to_the_uninterrupted_results(
    world, tmp_path, stages_run, monkeypatch, signalled
):
    """SIGUSR1 after step 1 of English fine-tuning, or during the evaluation before it (between two trainers:
    the signal must neither end the process nor be lost, so the next stage saves and stops after its first step);
    either way NLT and LE have finished and the CLIP has trained one step."""
    torch.manual_seed(0)
    whole = run_mla(mla_cfg(world, tmp_path / "whole"))
    assert stages_run["steps"] == {"nlt": 2, "le": 3, "finetune_en": 3, "finetune_all": 2}

    stages_run["steps"].clear()
    real_scores, calls = mla_run.retrieval_by_language, []
    if signalled == "in a stage":
        stages_run["stop_at"] = ("finetune_en", 1)
    else:

        def scores_then_signal(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:  # "acquired": after LE, before English fine-tuning
                os.kill(os.getpid(), signal.SIGUSR1)
            return real_scores(*args, **kwargs)

        monkeypatch.setattr(mla_run, "retrieval_by_language", scores_then_signal)
    out = tmp_path / "stopped"
    torch.manual_seed(0)
    with pytest.raises(RunInterrupted):
        run_mla(mla_cfg(world, out))
    monkeypatch.setattr(mla_run, "retrieval_by_language", real_scores)
    assert json.loads((out / "finetune_en" / "interrupted.json").read_text())["step"] == 1
    assert not (out / ACQUIRED_WEIGHTS).exists() and not (out / "finetune_all").exists()

    stages_run["steps"].clear()
    stages_run["stop_at"] = None
    torch.manual_seed(0)
    resumed = run_mla(mla_cfg(world, out, "resume=auto"))
    # The finished stages take no step; the stopped one trains what it had left; the last one all of its steps.
    assert stages_run["steps"] == {"finetune_en": 2, "finetune_all": 2}

    assert not list(out.rglob("config_changes.jsonl"))  # resume=auto is not a change of what is trained
    assert resumed["phases"] == whole["phases"]  # every phase's retrieval scores, "before" included
    assert resumed["languages"] == whole["languages"]
    for stage in ("nlt", "le", "finetune_en", "finetune_all"):  # the finished stages report their last losses
        assert resumed["training"][f"{stage}/loss"] == whole["training"][f"{stage}/loss"], stage
        assert losses(out / stage) == losses(tmp_path / "whole" / stage), stage
    for name in (ACQUIRED_WEIGHTS, FINETUNED_CLIP):
        assert_same_tensors(load_file(out / name), load_file(tmp_path / "whole" / name))


def test_a_recipe_cannot_resume_from_a_named_checkpoint(world, tmp_path):
    """A checkpoint folder belongs to one stage: only resume=auto, refused before anything is written."""
    cfg = mla_cfg(world, tmp_path / "mla", f"resume={tmp_path}/mla/nlt/checkpoints/step_00000002")
    with pytest.raises(ConfigError, match="resume=auto"):
        run_mla(cfg)
    assert not (tmp_path / "mla").exists()


def test_resume_auto_without_checkpoints_warns_and_reruns_every_stage(world, tmp_path, stages_run, caplog):
    out = tmp_path / "mla"
    first = run_mla(mla_cfg(world, out, finetune=False, save_every=0))
    stages_run["steps"].clear()
    again = run_mla(mla_cfg(world, out, "resume=auto", finetune=False, save_every=0))
    assert "save_every=0" in caplog.text and "run again from their start" in caplog.text
    assert stages_run["steps"] == {"nlt": 2, "le": 3}
    assert again["training"]["le/trained_params"] == first["training"]["le/trained_params"]
    assert len(losses(out / "le")) == 3  # the rerun replaced the first run's records, it did not add to them


# ---------------------------------------------------------------------------------------------- cViL VQA
@pytest.mark.parametrize("stop_in", ["teacher", "distill"])
def test_cvil_vqa_stopped_in_a_stage_resumes_to_the_uninterrupted_results(
    tmp_path, stages_run, monkeypatch, stop_in
):
    """The recipe's own English teacher (a fine-tuning run with dev selection), then distillation and the
    target-language step; stopped in the teacher's run or in distillation."""
    pytest.importorskip("easy_vqa")
    import cclm.tasks.finetune as finetune_module
    from cclm.recipes.cvil_vqa import run_cvil_vqa

    # The teacher trains through the fine-tuning module's trainer: record and stop it the same way.
    monkeypatch.setattr(finetune_module, "Trainer", runner.Trainer)

    def cfg(out: Path, *extra: str) -> CViLVQARecipeConfig:
        return load_config(
            CViLVQARecipeConfig,
            VQA_YAML,
            [
                f"output_dir={out}",
                "teacher_finetune.model_overrides=[]",
                "teacher_finetune.batch_size=16",
                "teacher_finetune.steps=4",
                "teacher_finetune.eval_every=2",
                "data.train_examples=64",
                "data.test_examples=16",
                "distill.batch_size=16",
                "distill.steps=4",
                "target_finetune.enabled=true",
                "data.target_train={ja: 'train:ja'}",
                "target_finetune.steps=2",
                "train.log_every=1",
                "train.save_every=2",
                *extra,
            ],
        )

    torch.manual_seed(0)
    whole = run_cvil_vqa(cfg(tmp_path / "whole"))
    out = tmp_path / "stopped"
    stages_run["steps"].clear()
    stages_run["stop_at"] = ("run" if stop_in == "teacher" else "distill", 3)
    torch.manual_seed(0)
    with pytest.raises(RunInterrupted):
        run_cvil_vqa(cfg(out))
    stages_run["steps"].clear()
    stages_run["stop_at"] = None
    torch.manual_seed(0)
    resumed = run_cvil_vqa(cfg(out, "resume=auto"))

    left = {"run": 1, "distill": 4, "target": 2} if stop_in == "teacher" else {"distill": 1, "target": 2}
    assert stages_run["steps"] == left
    assert resumed["languages"] == whole["languages"]
    assert resumed["stages"]["distill"]["distill/loss"] == whole["stages"]["distill"]["distill/loss"]
    for stage in ("teacher/run", "distill", "target"):  # every logged loss (and the teacher's dev scores)
        assert losses(out / stage) == losses(tmp_path / "whole" / stage), stage
    dev = [
        json.loads(line).get("dev")
        for line in (out / "teacher" / "run" / METRICS_FILE).read_text().splitlines()
    ]
    assert dev == [
        json.loads(line).get("dev")
        for line in (tmp_path / "whole" / "teacher" / "run" / METRICS_FILE).read_text().splitlines()
    ]
    for folder in ("student", "teacher"):
        for name in ("model.safetensors", HEAD_WEIGHTS):
            assert_same_tensors(load_file(out / folder / name), load_file(tmp_path / "whole" / folder / name))


def test_a_fresh_recipe_into_a_finished_one_is_refused_before_anything_is_built(world, tmp_path, monkeypatch):
    """A second run without resume or overwrite names the stage folder and both ways on, before the model is
    built or anything is evaluated or written."""
    out = tmp_path / "mla"
    run_mla(mla_cfg(world, out, finetune=False, save_every=0))
    config_before = (out / "config.json").read_bytes()

    def never(*args, **kwargs):
        raise AssertionError("the model was built before the output folders were checked")

    monkeypatch.setattr(MLAModel, "build", never)
    with pytest.raises(
        UserError, match=r"stage nlt: output_dir/nlt=.*already holds a run.*resume=auto.*overwrite"
    ):
        run_mla(mla_cfg(world, out, finetune=False, save_every=0))
    assert (out / "config.json").read_bytes() == config_before
