"""Faults of whole MLA / cViL recipe runs (docs/recipes.md): what ``overwrite=true`` leaves of an old run, resumes
whose earlier stage trains anew (a later stage's old checkpoint was trained on other upstream weights), parallel
shards with pairs that have no source-language side, ``trained_params`` over every stage, empty translations in
cViL, and a configured language that gets no sample from shards without a manifest. Tiny models, a few steps per
stage, CPU, one thread."""

from __future__ import annotations

import json
import logging
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cclm.config import ConfigError, CViLRecipeConfig, CViLVQARecipeConfig, MLARecipeConfig, load_config
from cclm.errors import UserError
from cclm.recipes import runner
from cclm.recipes.mla_run import ACQUIRED_WEIGHTS, FINETUNED_CLIP, run_mla
from cclm.runtime.logging import METRICS_FILE

from ..conftest import build_mla_world
from ..test_mla_pipeline import mla_base, with_finetuning

REPO = Path(__file__).resolve().parents[2]
MLA_YAML = REPO / "configs" / "recipes" / "mla_demo.yaml"
CVIL_YAML = REPO / "configs" / "recipes" / "cvil_demo.yaml"
VQA_YAML = REPO / "configs" / "recipes" / "cvil_easy_vqa.yaml"
XVNLI_LABELS = ["contradiction", "neutral", "entailment"]
EMBEDDING = "embedding.table.weight"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """en + de + ja captions, en-de and en-ja parallel pairs, an XVNLI-style set in en and de."""
    world = tmp_path_factory.mktemp("run_faults_world") / "world"
    return build_mla_world(
        world,
        120,
        seed=0,
        caption_langs=("en", "de", "ja"),
        parallel_langs=("de", "ja"),
        heldout_images=16,
        heldout_langs=("en", "de", "ja"),
        xvnli_images=10,
    )


@pytest.fixture
def stages_run(monkeypatch) -> dict[str, int]:
    """Stage folder name -> the steps it trains in this process."""
    steps: dict[str, int] = {}

    class Recording(runner.Trainer):
        def train_step(self, stats):
            super().train_step(stats)
            steps[self.output_dir.name] = steps.get(self.output_dir.name, 0) + 1

    monkeypatch.setattr(runner, "Trainer", Recording)
    return steps


def mla_cfg(world: Path, out: Path, *overrides: str, finetune: bool = True) -> MLARecipeConfig:
    base = [*mla_base(world, out), *(with_finetuning(world) if finetune else []), "train.save_every=2"]
    return load_config(MLARecipeConfig, MLA_YAML, merged(base, overrides))


def merged(base: list[str], overrides: tuple[str, ...]) -> list[str]:
    """``base`` key=value items, those ``overrides`` name replaced by them."""
    given = {item.split("=", 1)[0] for item in overrides}
    return [*(item for item in base if item.split("=", 1)[0] not in given), *overrides]


@pytest.fixture(scope="module")
def finished(world, tmp_path_factory) -> tuple[Path, dict]:
    """A finished MLA run with all four stages (nlt 2, le 2, finetune_en 2, finetune_all 2 steps)."""
    out = tmp_path_factory.mktemp("finished") / "mla"
    torch.manual_seed(0)
    return out, run_mla(mla_cfg(world, out))


def copy_of(finished: tuple[Path, dict], where: Path) -> Path:
    out = where / "mla"
    shutil.copytree(finished[0], out)
    return out


def old_runs(out: Path) -> list[Path]:
    return sorted(out.glob("run.old-*"))


def metric_steps(stage_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (stage_dir / METRICS_FILE).read_text().splitlines()]


# ----------------------------------------------------------------------------------- 1. overwrite=true
def test_overwrite_moves_every_stage_and_output_of_the_old_run_aside(world, finished, tmp_path, stages_run):
    """The old run had all four stages; the new one (overwrite=true) only NLT and LE: nothing of the old run is
    left next to the new one, so adding the downstream stages with resume=auto trains them on the new NLT/LE."""
    out = copy_of(finished, tmp_path)
    old_acquired = load_file(out / ACQUIRED_WEIGHTS)
    run_mla(mla_cfg(world, out, "overwrite=true", "nlt.steps=3", finetune=False))
    assert stages_run == {"nlt": 3, "le": 2}
    for name in ("finetune_en", "finetune_all", FINETUNED_CLIP):
        assert not (out / name).exists(), name
    for stage in ("nlt", "le", "finetune_en", "finetune_all"):  # every stage folder, planned or not
        (aside,) = out.glob(f"{stage}.old-*")
        assert metric_steps(aside) == [1, 2], stage
    (aside,) = old_runs(out)  # the old run's top-level outputs
    for name in (
        FINETUNED_CLIP,
        ACQUIRED_WEIGHTS,
        "results.json",
        "languages.json",
        "tokenizer",
        "config.json",
    ):
        assert (aside / name).exists(), name
    assert json.loads((out / "results.json").read_text())["training"].keys() >= {"nlt/loss", "le/loss"}
    assert "finetune_en/loss" not in json.loads((out / "results.json").read_text())["training"]

    new_acquired = load_file(out / ACQUIRED_WEIGHTS)
    stages_run.clear()
    run_mla(mla_cfg(world, out, "resume=auto", "nlt.steps=3"))
    # NLT and LE are the new run's, finished; the downstream stages train on them (not the old run's, restored)
    assert stages_run == {"finetune_en": 2, "finetune_all": 2}
    resumed = load_file(out / ACQUIRED_WEIGHTS)
    assert torch.equal(resumed[EMBEDDING], new_acquired[EMBEDDING])  # only NLT trains the embedding
    assert not torch.equal(resumed[EMBEDDING], old_acquired[EMBEDDING])


@pytest.mark.parametrize("downstream", ["none", "all-language only"])
def test_a_resume_without_english_finetuning_keeps_nothing_of_it(
    world, finished, tmp_path, stages_run, downstream
):
    """resume=auto without stage 3: the old run's fine-tuned CLIP is moved aside (it does not go with these
    acquirers); a stage 4 the old run trained over that CLIP starts again from step 0."""
    out = copy_of(finished, tmp_path)
    steps = "finetune.all.steps=0" if downstream == "none" else "finetune.all.steps=2"
    results = run_mla(mla_cfg(world, out, "resume=auto", "finetune.en.steps=0", steps))
    assert not (out / FINETUNED_CLIP).exists()
    (aside,) = old_runs(out)
    assert (aside / FINETUNED_CLIP).exists()
    if downstream == "none":
        assert stages_run == {}
        assert "finetune_all" not in results["phases"]
    else:
        assert stages_run == {"finetune_all": 2}  # not restored from the old run's checkpoint
        assert not (out / "finetune_en").exists() and list(out.glob("finetune_en.old-*"))
        assert list(out.glob("finetune_all.old-*"))
        before = load_file(finished[0] / ACQUIRED_WEIGHTS)
        after = load_file(out / ACQUIRED_WEIGHTS)
        assert not all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------------- 2. a longer earlier stage
def test_a_longer_nlt_on_resume_restarts_every_later_stage(world, finished, tmp_path, stages_run, caplog):
    """nlt.steps 2 -> 4 with resume=auto: NLT trains its 2 new steps, and LE and the downstream stages, whose
    checkpoints were trained after the 2-step NLT, start again from step 0 on the 4-step NLT's weights."""
    out = copy_of(finished, tmp_path)
    before = load_file(out / ACQUIRED_WEIGHTS)
    with caplog.at_level(logging.WARNING, logger="cclm.recipes"):
        results = run_mla(mla_cfg(world, out, "resume=auto", "nlt.steps=4"))
    assert stages_run == {"nlt": 2, "le": 2, "finetune_en": 2, "finetune_all": 2}
    assert "stage le: its checkpoints were trained on other weights of the stages before it" in caplog.text
    for stage in ("le", "finetune_en", "finetune_all"):
        assert list(out.glob(f"{stage}.old-*")), stage  # the old run is kept, not deleted
        assert metric_steps(out / stage) == [1, 2], stage
        assert not (out / stage / "config_changes.jsonl").exists(), stage  # not resumed "with new values"
    after = load_file(out / ACQUIRED_WEIGHTS)
    # The embedding trains in NLT only: the final one is the 4-step NLT's, not the 2-step one LE had saved.
    assert not torch.equal(after[EMBEDDING], before[EMBEDDING])
    assert results["training"]["nlt/loss"] != finished[1]["training"]["nlt/loss"]


def test_a_longer_teacher_on_resume_restarts_the_distillation(tmp_path, stages_run, monkeypatch):
    """cViL VQA: teacher_finetune.steps 2 -> 4 with resume=auto retrains the teacher, so the distillation
    checkpoint (distilled from the 2-step teacher) is not restored: distillation runs again."""
    pytest.importorskip("easy_vqa")
    import cclm.tasks.finetune as finetune_module
    from cclm.recipes.cvil_vqa import run_cvil_vqa

    monkeypatch.setattr(finetune_module, "Trainer", runner.Trainer)

    def cfg(*extra: str) -> CViLVQARecipeConfig:
        return load_config(
            CViLVQARecipeConfig,
            VQA_YAML,
            merged(
                [
                    f"output_dir={tmp_path / 'vqa'}",
                    "teacher_finetune.model_overrides=[]",
                    "teacher_finetune.batch_size=16",
                    "teacher_finetune.steps=2",
                    "teacher_finetune.eval_every=2",
                    "data.train_examples=32",
                    "data.test_examples=16",
                    "distill.batch_size=16",
                    "distill.steps=2",
                    "train.log_every=1",
                    "train.save_every=2",
                ],
                extra,
            ),
        )

    torch.manual_seed(0)
    run_cvil_vqa(cfg())
    stages_run.clear()
    torch.manual_seed(0)
    results = run_cvil_vqa(cfg("resume=auto", "teacher_finetune.steps=4"))
    assert stages_run == {"run": 2, "distill": 2}  # the old distillation was not restored as finished
    (aside,) = (tmp_path / "vqa").glob("distill.old-*")
    assert metric_steps(aside) == [1, 2] and metric_steps(tmp_path / "vqa" / "distill") == [1, 2]
    assert not (tmp_path / "vqa" / "distill" / "config_changes.jsonl").exists()
    assert results["stages"]["teacher"]["steps"] == 4


# ------------------------------------------------------------------ 3. pairs without a source side
def parallel_pairs(world: Path) -> list[dict]:
    pairs = []
    for shard in sorted((world / "parallel").glob("*.tar")):
        with tarfile.open(shard) as tar:
            pairs += [
                json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")
            ]
    return pairs


def write_shard(folder: Path, pairs: list[dict]) -> Path:
    """One WebDataset shard of parallel pairs, without manifest.json."""
    import io

    folder.mkdir(parents=True)
    with tarfile.open(folder / "shard-000000.tar", "w") as tar:
        for i, pair in enumerate(pairs):
            data = json.dumps(pair, ensure_ascii=False).encode()
            info = tarfile.TarInfo(f"p{i:07d}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return folder


def multiway(pairs: list[dict]) -> list[dict]:
    """The en-de and en-ja pairs, each English sentence's de-ja pair after them (a multi-way corpus)."""
    by_english: dict[str, dict[str, str]] = {}
    for pair in pairs:
        by_english.setdefault(pair["src"], {})[pair["tgt_lang"]] = pair["tgt"]
    out = []
    for english, sides in by_english.items():
        out += [{"src": english, "tgt": t, "src_lang": "en", "tgt_lang": lang} for lang, t in sides.items()]
        if {"de", "ja"} <= sides.keys():
            out.append({"src": sides["de"], "tgt": sides["ja"], "src_lang": "de", "tgt_lang": "ja"})
    return out


def test_nlt_leaves_out_pairs_without_a_source_side(world, tmp_path, caplog):
    pairs = multiway(parallel_pairs(world))
    without = sum(1 for p in pairs if "en" not in (p["src_lang"], p["tgt_lang"]))
    assert without > 10
    shards = write_shard(tmp_path / "multiway", pairs)
    out = tmp_path / "mla"
    with caplog.at_level(logging.WARNING, logger="cclm.recipes"):
        results = run_mla(
            mla_cfg(
                world,
                out,
                "languages=[de,ja]",
                f"data.parallel_text.shards={shards}",
                "nlt.steps=4",
                "le.steps=1",
                finetune=False,
            )
        )
    left_out = results["training"]["nlt/skipped/no_source_side"]
    assert left_out > 0
    assert f"{left_out} parallel pairs without a 'en' side were left out" in caplog.text
    assert f"by pair: {{'de-ja': {left_out}}}" in caplog.text
    nlt = results["samples_per_language"]["nlt"]
    assert set(nlt) == {"de", "ja"}
    assert (sum(nlt.values()) + left_out) % 8 == 0  # every pair drawn is trained on or left out
    assert sum(nlt.values()) + left_out >= 4 * 8
    logged = [json.loads(line) for line in (out / "nlt" / METRICS_FILE).read_text().splitlines()]
    assert logged[-1]["skipped/no_source_side"] == left_out
    assert json.loads((out / "results.json").read_text())["samples_per_language"]["nlt"] == nlt

    only_de_ja = write_shard(tmp_path / "de_ja", [p for p in pairs if p["src_lang"] == "de"])
    with pytest.raises(UserError, match=r"batches in a row .* held no pair with a 'en' side"):
        run_mla(
            mla_cfg(
                world,
                tmp_path / "none",
                "languages=[de,ja]",
                f"data.parallel_text.shards={only_de_ja}",
                finetune=False,
            )
        )


# ------------------------------------------------------------------ 4. trained_params over every stage
def test_trained_params_is_every_parameter_any_stage_trained(finished):
    out, results = finished
    training = results["training"]
    # NLT: the embedding and acquirers (LE and stage 4 train a part of them); stage 3: the CLIP's towers
    union = training["nlt/trained_params"] + training["finetune_en/trained_params"]
    assert results["trained_params"] == union
    assert json.loads((out / "results.json").read_text())["trained_params"] == union
    assert training["finetune_en/trained_params"] > training["nlt/trained_params"]
    assert results["trained_params"] < results["total_params"]  # the CLIP's temperature stays frozen
    acquired = load_file(out / ACQUIRED_WEIGHTS)
    clip = load_file(out / FINETUNED_CLIP)
    towers = sum(v.numel() for k, v in clip.items() if k != "logit_scale" and not k.startswith("logit_bias"))
    assert union <= sum(v.numel() for v in acquired.values()) + towers


# ------------------------------------------------------------------------ 5. cViL empty translations
@pytest.fixture(scope="module")
def random_teacher(world, tmp_path_factory) -> Path:
    """An XVNLI task folder with a random tiny cross-view model (the skips do not need a trained one)."""
    from cclm.config import ModelConfig
    from cclm.data.tokenize import load_tokenizer
    from cclm.model import CrossViewModel
    from cclm.tasks.task_model import TaskModel

    tokenizer = load_tokenizer(str(world / "tokenizer"))
    cfg = load_config(ModelConfig, REPO / "configs" / "model" / "tiny.yaml")
    cfg.text.encoder["vocab_size"] = len(tokenizer)
    out = tmp_path_factory.mktemp("teacher") / "model"
    torch.manual_seed(0)
    TaskModel(CrossViewModel(cfg, load_pretrained=False), "xvnli", "single", XVNLI_LABELS).save(
        out, tokenizer
    )
    return out


def test_cvil_leaves_out_pairs_with_an_empty_side(world, random_teacher, tmp_path, caplog):
    source = world / "xvnli" / "annotations" / "de" / "train.jsonl"
    records = [json.loads(line) for line in source.read_text().splitlines()]
    for i, record in enumerate(records[:7]):
        record["sentence2"] = "" if i % 2 else "  \t"
    translated = tmp_path / "de_train.jsonl"
    translated.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))

    def cfg(out: str, parallel: Path):
        return load_config(
            CViLRecipeConfig,
            CVIL_YAML,
            [
                f"world={world}",
                f"teacher={random_teacher}",
                f"output_dir={tmp_path / out}",
                f"data.parallel.de={parallel}",
                "distill.steps=1",
                "distill.batch_size=8",
            ],
        )

    from cclm.recipes.cvil import run_cvil

    with caplog.at_level(logging.WARNING, logger="cclm.recipes"):
        results = run_cvil(cfg("cvil", translated))
    assert results["parallel_examples"] == len(records) - 7
    assert results["skipped_pairs"] == {
        "de": {"no_translation": 0, "empty_translation": 7, "empty_english": 0}
    }
    assert f"7 of {len(records)} pairs left out for an empty sentence" in caplog.text
    assert (
        json.loads((tmp_path / "cvil" / "results.json").read_text())["skipped_pairs"]["de"][
            "empty_translation"
        ]
        == 7
    )

    for record in records:
        record["sentence2"] = " "
    translated.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    with pytest.raises(ConfigError, match=r"data.parallel.de .*has an empty sentence"):
        run_cvil(cfg("none", translated))
    assert not (tmp_path / "none" / "distill").exists()


# ------------------------------------------------------- 6. a language without samples, no manifest
def test_a_language_without_samples_is_an_error_without_a_manifest(world, tmp_path):
    """Shards copied without manifest.json (en, de, ja) and languages=[ja, fr]: NLT ends with an error naming
    fr and the samples each language had, instead of scoring fr as acquired."""
    shards = {}
    for stream in ("parallel", "image_caption"):
        shards[stream] = tmp_path / stream
        shards[stream].mkdir()
        for tar in (world / stream).glob("*.tar"):
            shutil.copy(tar, shards[stream])
    cfg = mla_cfg(
        world,
        tmp_path / "mla",
        "languages=[ja,fr]",
        f"data.parallel_text.shards={shards['parallel']}",
        f"data.image_caption.shards={shards['image_caption']}",
        "eval.retrieval.world=null",
        finetune=False,
    )
    with pytest.raises(UserError, match=r"stage nlt: no sample of language\(s\) \['fr'\].*'ja': \d+"):
        run_mla(cfg)
    assert not (tmp_path / "mla" / "le").exists() and not (tmp_path / "mla" / "results.json").exists()


def test_samples_per_language_are_recorded_for_every_stage(finished):
    out, results = finished
    counts = results["samples_per_language"]
    # languages=[ja], batches of 8, 2 steps per stage: every sample is counted in the stage that drew it
    assert counts == {
        "nlt": {"ja": 16},
        "le": {"ja": 16},
        "finetune_en": {"en": 16},
        "finetune_all": {"ja": 16},
    }
    assert json.loads((out / "results.json").read_text())["samples_per_language"] == counts


def test_sample_counts_survive_a_stop_and_resume(world, finished, tmp_path, monkeypatch):
    """SIGUSR1 after LE's first step (a checkpoint at step 1 holding 8 counted captions); resume=auto ends with
    the uninterrupted run's counts: they are part of the stage's data state."""
    import os
    import signal

    from cclm.errors import RunInterrupted

    original = runner.Trainer

    class Stopping(original):
        def train_step(self, stats):
            super().train_step(stats)
            if self.output_dir.name == "le" and self.step == 1:
                os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(runner, "Trainer", Stopping)
    out = tmp_path / "mla"
    torch.manual_seed(0)
    with pytest.raises(RunInterrupted):
        run_mla(mla_cfg(world, out, finetune=False))
    monkeypatch.setattr(runner, "Trainer", original)
    torch.manual_seed(0)
    resumed = run_mla(mla_cfg(world, out, "resume=auto", finetune=False))
    expected = {stage: finished[1]["samples_per_language"][stage] for stage in ("nlt", "le")}
    assert resumed["samples_per_language"] == expected == {"nlt": {"ja": 16}, "le": {"ja": 16}}
