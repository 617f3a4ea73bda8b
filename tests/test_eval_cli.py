"""`cclm evaluate retrieval` end to end, periodic evaluation, and a trained model beating chance."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cclm.cli import main as cclm_main
from cclm.config import EvalConfig, ModelConfig, load_config
from cclm.evaluation.run import evaluate_during_training, load_periodic_sets
from cclm.model import CrossViewModel
from cclm.model.fingerprint import weights_digest

from .conftest import build_test_world

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "configs" / "eval" / "demo_world.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A small synthetic world (the data helper's generator): its held-out sets in en and de."""
    return build_test_world(
        tmp_path_factory.mktemp("world") / "world",
        tokenizer_vocab=None,
        num_images=4,
        parallel_langs=("de",),
        heldout_images=60,
        heldout_langs=("en", "de"),
        xvnli_images=3,
        image_size=32,
        seed=1,
    )


def train_on_world(model: CrossViewModel, tokenizer, steps: int, batch_size: int = 24, seed: int = 0) -> None:
    """Plain AdamW on the model's own losses over freshly drawn synthetic-world scenes (English captions)."""
    from cclm.data.images import load_image
    from data_prep.world.scenes import render, sample_scene

    rng = random.Random(seed)
    scenes = [sample_scene(rng) for _ in range(1000)]
    captions = [scene.caption("en") for scene in scenes]
    images = torch.stack([load_image(render(scene, 32), 32) for scene in scenes])
    enc = tokenizer(captions, padding=True, truncation=True, max_length=32, return_tensors="pt")
    group_of = {caption: g for g, caption in enumerate(dict.fromkeys(captions))}
    groups = torch.tensor([group_of[c] for c in captions])
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(scenes), (batch_size,), generator=generator)
        batch = {
            "images": images[idx],
            "text_ids": enc.input_ids[idx],
            "text_mask": enc.attention_mask[idx],
            "group_ids": groups[idx],
        }
        loss = model(batch, "image")["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@pytest.fixture(scope="module")
def world_tokenizer(tmp_path_factory):
    from cclm.data.tokenize import train_tokenizer
    from data_prep.world.scenes import sample_scene

    rng = random.Random(5)
    corpus = [sample_scene(rng).caption(lang) for _ in range(400) for lang in ("en", "de")]
    return train_tokenizer(corpus, tmp_path_factory.mktemp("world_tok"), vocab_size=200)


def save_model(model: CrossViewModel, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(str(folder))  # project convention: the tokenizer travels with the model
    return folder


def run_cli(*args: str) -> int:
    return cclm_main(["evaluate", "retrieval", str(DEMO_CONFIG), *args])


def tiny_cfg(tokenizer) -> ModelConfig:
    cfg = load_config(ModelConfig, REPO / "configs" / "model" / "tiny.yaml")
    cfg.text.encoder["vocab_size"] = len(tokenizer)
    return cfg


def test_trained_model_beats_chance_through_the_cli(world, world_tokenizer, tmp_path, capsys):
    torch.manual_seed(0)
    model = CrossViewModel(tiny_cfg(world_tokenizer))
    train_on_world(model, world_tokenizer, steps=300)
    model_dir = save_model(model, world_tokenizer, tmp_path / "model")
    heldout = world / "heldout"
    n_images = sum(1 for _ in open(heldout / "en" / "retrieval.jsonl"))
    chance_r1 = 100.0 / n_images

    common = [f"checkpoint={model_dir}", f"data.root={heldout}", "languages=en", "eval.batch_size=16"]
    assert run_cli(*common, "eval.rerank=false", f"output_dir={tmp_path / 'itc'}") == 0
    itc = json.loads((tmp_path / "itc" / "demo_world.json").read_text())["en"]
    assert itc["txt_r1"] > 8 * chance_r1 and itc["img_r1"] > 8 * chance_r1, itc
    # Two stages (ITM re-ranks the ITC top-16; CCLM adds the ITC score): still far above chance.
    assert (
        run_cli(*common, "eval.k_test=16", "eval.itc_weight_in_rerank=1.0", f"output_dir={tmp_path / 'itm'}")
        == 0
    )
    two_stage = json.loads((tmp_path / "itm" / "demo_world.json").read_text())["en"]
    assert two_stage["r_mean"] > 8 * chance_r1, two_stage
    printed = capsys.readouterr().out
    assert "txt_r1" in printed and "en " in printed
    # The untrained model is near chance on the same data, through the same code path.
    untrained = save_model(CrossViewModel(tiny_cfg(world_tokenizer)), world_tokenizer, tmp_path / "untrained")
    assert (
        run_cli(
            f"checkpoint={untrained}",
            f"data.root={heldout}",
            "languages=en",
            "eval.rerank=false",
            f"output_dir={tmp_path / 'untrained_out'}",
        )
        == 0
    )
    base = json.loads((tmp_path / "untrained_out" / "demo_world.json").read_text())["en"]
    assert base["r_mean"] < itc["r_mean"] / 2


def test_cli_writes_a_row_per_language_and_the_means(world, world_tokenizer, tmp_path, capsys):
    model_dir = save_model(CrossViewModel(tiny_cfg(world_tokenizer)), world_tokenizer, tmp_path / "model")
    out = tmp_path / "out"
    code = run_cli(
        f"checkpoint={model_dir}",
        f"data.root={world / 'heldout'}",
        "languages=en,de",
        "eval.k_test=4",
        "name=heldout",
        f"output_dir={out}",
    )
    assert code == 0
    rows = json.loads((out / "heldout.json").read_text())
    assert list(rows) == ["en", "de", "mean", "mean (non-English)"]
    assert rows["mean"]["r_mean"] == pytest.approx((rows["en"]["r_mean"] + rows["de"]["r_mean"]) / 2)
    assert rows["mean (non-English)"] == {
        k: v for k, v in rows["de"].items() if k not in ("model", "model_digest", "protocol")
    }
    csv_lines = (out / "heldout.csv").read_text().splitlines()
    assert csv_lines[0].startswith("language,txt_r1,txt_r5") and csv_lines[2].startswith("de,")
    table = capsys.readouterr().out
    assert "mean (non-English)" in table


def test_checkpoint_may_be_a_hub_model(world, world_tokenizer, tmp_path, capsys, monkeypatch):
    """``checkpoint=hf-hub:ORG/NAME``: the folder behind it (here an offline Hub cache) is evaluated, with the same
    rows as the folder itself."""
    from huggingface_hub import constants

    from .test_hub import put_in_hub_cache

    model_dir = save_model(CrossViewModel(tiny_cfg(world_tokenizer)), world_tokenizer, tmp_path / "model")
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    files = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}
    put_in_hub_cache(cache, "cclm-org/tiny", files)
    rows = {}
    for name, checkpoint in (("hub", "hf-hub:cclm-org/tiny"), ("folder", str(model_dir))):
        args = (f"data.root={world / 'heldout'}", "languages=en", "eval.k_test=4", f"name={name}")
        assert run_cli(f"checkpoint={checkpoint}", *args, f"output_dir={tmp_path / name}") == 0
        rows[name] = json.loads((tmp_path / name / f"{name}.json").read_text())["en"]
    # the same weights (each row names the folder it was read from)
    assert rows["hub"].pop("model") != rows["folder"].pop("model")
    assert rows["hub"] == rows["folder"]
    capsys.readouterr()


# ------------------------------------------------------------------------------ results are never silently replaced
def test_results_keep_the_models_other_languages_and_refuse_another_models(
    world, world_tokenizer, tmp_path, capsys
):
    """Before, re-running with languages=de left only de in the file, and another model's results replaced the
    first model's without a word (the file did not say which model wrote it)."""
    torch.manual_seed(0)
    model_dir = save_model(CrossViewModel(tiny_cfg(world_tokenizer)), world_tokenizer, tmp_path / "model")
    out = tmp_path / "out"
    common = [f"data.root={world / 'heldout'}", "eval.k_test=4", f"output_dir={out}"]
    assert run_cli(f"checkpoint={model_dir}", "languages=en", *common) == 0
    assert run_cli(f"checkpoint={model_dir}", "languages=de", *common) == 0
    rows = json.loads((out / "demo_world.json").read_text())
    assert list(rows) == ["en", "de", "mean", "mean (non-English)"]
    assert rows["mean"]["r_mean"] == pytest.approx((rows["en"]["r_mean"] + rows["de"]["r_mean"]) / 2)
    assert rows["en"]["model_digest"] == rows["de"]["model_digest"] == weights_digest(model_dir)
    assert rows["en"]["model"] == str(model_dir.resolve())

    torch.manual_seed(1)
    other = save_model(CrossViewModel(tiny_cfg(world_tokenizer)), world_tokenizer, tmp_path / "other")
    before = (out / "demo_world.json").read_text()
    capsys.readouterr()
    assert run_cli(f"checkpoint={other}", "languages=en", *common) == 2
    err = capsys.readouterr().err
    assert f"demo_world.json holds results of another model ({model_dir.resolve()})" in err
    assert "Traceback" not in err and (out / "demo_world.json").read_text() == before
    assert run_cli(f"checkpoint={other}", "languages=en", "overwrite=true", *common) == 0
    (aside,) = out.glob("demo_world.old-*.json")
    assert aside.read_text() == before
    assert list(json.loads((out / "demo_world.json").read_text())) == ["en"]


def test_rows_scored_with_other_settings_are_not_merged_into_one_table(
    world, world_tokenizer, tmp_path, capsys
):
    """Before, German re-ranked by ITM was averaged with the ITC-only rows of an earlier run (`eval.rerank=false`),
    and no row said how it was scored."""
    torch.manual_seed(0)
    model_dir = save_model(CrossViewModel(tiny_cfg(world_tokenizer)), world_tokenizer, tmp_path / "model")
    out = tmp_path / "out"
    common = [
        f"checkpoint={model_dir}",
        f"data.root={world / 'heldout'}",
        "eval.k_test=4",
        f"output_dir={out}",
    ]
    assert run_cli(*common, "languages=en", "eval.rerank=false") == 0
    row = json.loads((out / "demo_world.json").read_text())["en"]
    assert row["protocol"]["rerank"] is False and row["protocol"]["k_test"] == 4
    before = (out / "demo_world.json").read_text()
    capsys.readouterr()
    assert run_cli(*common, "languages=de") == 2
    err = capsys.readouterr().err
    assert "holds this model's results of en scored with other settings (en: rerank=False (now True))" in err
    assert "overwrite=true" in err and "Traceback" not in err
    assert (out / "demo_world.json").read_text() == before
    # the same settings merge; overwrite=true moves the other protocol's table aside
    assert run_cli(*common, "languages=de", "eval.rerank=false") == 0
    assert list(json.loads((out / "demo_world.json").read_text()))[:2] == ["en", "de"]
    assert run_cli(*common, "languages=de", "overwrite=true") == 0
    assert list(json.loads((out / "demo_world.json").read_text())) == ["de"]
    (aside,) = out.glob("demo_world.old-*.json")
    assert list(json.loads(aside.read_text()))[:2] == ["en", "de"]


def test_the_precision_and_the_image_split_are_part_of_a_rows_protocol_and_older_rows_are_unknown(
    world, world_tokenizer, tmp_path, capsys
):
    """Rows scored in bf16 and in fp32, or on another image split, are not averaged together either; rows of an
    older file (no protocol recorded) are not merged into a new table: refused, or moved aside by overwrite."""
    torch.manual_seed(0)
    model_dir = save_model(CrossViewModel(tiny_cfg(world_tokenizer)), world_tokenizer, tmp_path / "model")
    out = tmp_path / "out"
    common = [
        f"checkpoint={model_dir}",
        f"data.root={world / 'heldout'}",
        "eval.k_test=4",
        f"output_dir={out}",
    ]
    assert run_cli(*common, "languages=en", "eval.rerank=false") == 0
    path = out / "demo_world.json"
    protocol = json.loads(path.read_text())["en"]["protocol"]
    assert protocol["precision"] == "fp32" and protocol["format"] == "demo_world"  # auto on a CPU
    before = path.read_text()
    for setting, differs in (
        ("eval.precision=bf16", "precision='fp32' (now 'bf16')"),
        ("data.split_file=test_ids.txt", "split_file=None (now 'test_ids.txt')"),
    ):
        capsys.readouterr()
        assert run_cli(*common, "languages=de", "eval.rerank=false", setting) == 2, setting
        err = capsys.readouterr().err
        assert f"(en: {differs})" in err and "Traceback" not in err, err
        assert path.read_text() == before
    # an older file: the same rows without their protocol
    older = {
        lang: {k: v for k, v in row.items() if k != "protocol"} for lang, row in json.loads(before).items()
    }
    path.write_text(json.dumps(older))
    capsys.readouterr()
    assert run_cli(*common, "languages=de", "eval.rerank=false") == 2
    err = capsys.readouterr().err
    assert "results of en scored with other settings (en: not recorded (an older results file))" in err
    assert "overwrite=true" in err and json.loads(path.read_text()) == older
    assert run_cli(*common, "languages=de", "eval.rerank=false", "overwrite=true") == 0
    assert list(json.loads(path.read_text())) == ["de"]
    (aside,) = out.glob("demo_world.old-*.json")
    assert json.loads(aside.read_text()) == older


def test_another_models_tokenizer_and_a_k_test_that_skips_re_ranking_fail_before_scoring(
    world, world_tokenizer, tmp_path, capsys
):
    """Before, a larger tokenizer failed with an IndexError inside the text encoder, and eval.k_test=0 silently
    gave ITC-only numbers."""
    from cclm.data.tokenize import train_tokenizer
    from data_prep.world.scenes import sample_scene

    model_dir = save_model(CrossViewModel(tiny_cfg(world_tokenizer)), world_tokenizer, tmp_path / "model")
    rng, other = random.Random(7), tmp_path / "other_tokenizer"
    corpus = [sample_scene(rng).caption(lang) for _ in range(300) for lang in ("en", "de", "fr", "es")]
    bigger = train_tokenizer(corpus, other, vocab_size=400)
    assert len(bigger) > len(world_tokenizer)
    args = [
        f"checkpoint={model_dir}",
        f"data.root={world / 'heldout'}",
        "languages=en",
        f"output_dir={tmp_path}",
    ]
    assert run_cli(*args, f"tokenizer={other}") == 2
    err = capsys.readouterr().err
    assert f"the tokenizer {other} has {len(bigger)} tokens but the model {model_dir}" in err
    assert run_cli(*args, "eval.k_test=0") == 2
    assert "eval.k_test must be at least 1 when re-ranking" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))


def test_image_size_runs_the_vision_tower_at_that_resolution(world, world_tokenizer, tmp_path):
    """Before, the images were read at image_size but the tower stayed at its own size: a shape error."""
    model_dir = save_model(CrossViewModel(tiny_cfg(world_tokenizer)), world_tokenizer, tmp_path / "model")
    args = [f"checkpoint={model_dir}", f"data.root={world / 'heldout'}", "languages=en", "eval.k_test=4"]
    assert run_cli(*args, "image_size=48", f"output_dir={tmp_path / 'out'}") == 0
    assert 0 <= json.loads((tmp_path / "out" / "demo_world.json").read_text())["en"]["r_mean"] <= 100


def test_cli_reports_bad_input(world, tmp_path, capsys):
    assert run_cli("checkpoint=x", "eval.k_tset=3") == 2
    assert "eval.k_test" in capsys.readouterr().err  # the typo is named, with the closest valid key
    assert run_cli(f"checkpoint={tmp_path / 'nothing'}", f"data.root={world / 'heldout'}") == 2
    assert "not a cclm model folder" in capsys.readouterr().err
    # Data problems are reported before the (possibly large) model is loaded.
    assert (
        run_cli(f"checkpoint={tmp_path / 'nothing'}", f"data.root={world / 'heldout'}", "languages=xx") == 2
    )
    # the languages listed are the data's own, not the ones asked for
    assert "unknown language 'xx'" in capsys.readouterr().err
    assert (
        run_cli(f"checkpoint={tmp_path / 'nothing'}", f"data.root={world / 'heldout'}", "languages=de,xx")
        == 2
    )
    err = capsys.readouterr().err
    assert "unknown language 'xx'" in err and "(it has de, en)" in err and "ValueError" not in err


def test_every_missing_image_is_listed_in_one_error_before_the_model_loads(tmp_path, capsys):
    """25 images in two languages, 3 of them on disk: one error counts the 22 missing files (each once,
    whichever languages name it), lists the first 20 and says how many more; no model is loaded."""
    folder = tmp_path / "heldout"
    (folder / "images").mkdir(parents=True)
    lines = []
    for i in range(25):
        if i % 10 == 0:
            (folder / "images" / f"{i:02d}.jpg").write_bytes(b"a file")
        captions = {"en": [f"picture {i}"], "de": [f"Bild {i}"]}
        lines.append(json.dumps({"image": f"images/{i:02d}.jpg", "image_id": str(i), "captions": captions}))
    (folder / "retrieval.jsonl").write_text("\n".join(lines) + "\n")
    assert run_cli(f"checkpoint={tmp_path / 'no_model'}", f"data.root={folder}") == 2
    err = capsys.readouterr().err
    assert "cclm evaluate: 22 image file(s) missing:" in err and "not a cclm model folder" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("cclm evaluate:")]
    missing = [str(folder / "images" / f"{i:02d}.jpg") for i in range(25) if i % 10]
    assert f"missing: {', '.join(missing[:20])}, ... and 2 more (" in line


def test_other_configs_are_delegated_to_the_finetune_evaluator(monkeypatch):
    import cclm.tasks.cli

    seen = []
    monkeypatch.setattr(cclm.tasks.cli, "evaluate_main", lambda argv: seen.append(argv) or 0)
    assert cclm_main(["evaluate", "configs/finetune/xvnli.yaml", "checkpoint=some/dir"]) == 0
    assert seen == [["evaluate", "configs/finetune/xvnli.yaml", "checkpoint=some/dir"]]


def test_evaluate_help_names_both_kinds_and_evaluation_does_not_import_the_tasks(capsys):
    assert cclm_main(["evaluate", "--help"]) == 0
    usage = capsys.readouterr().out
    assert "cclm evaluate retrieval CONFIG" in usage and "configs/finetune/<task>.yaml" in usage
    assert cclm_main(["evaluate", "retrieval", "--help"]) == 0
    assert "configs/eval/" in capsys.readouterr().out
    assert cclm_main(["evaluate", "retrieval"]) == 2
    assert "a config file is needed" in capsys.readouterr().err
    code = (
        "import sys, cclm.evaluation.cli; print(sorted(m for m in sys.modules if m.startswith('cclm.tasks')))"
    )
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "[]"


def test_periodic_evaluation_during_pretraining(world, world_tokenizer):
    eval_cfg = load_config(EvalConfig, None, [f"datasets={{world: {world / 'heldout'}}}", "languages=[de]"])
    sets = load_periodic_sets(eval_cfg)
    assert [s.lang for s in sets["world"]] == ["de"]
    model = CrossViewModel(tiny_cfg(world_tokenizer)).train()
    scalars = evaluate_during_training(model, sets, world_tokenizer, eval_cfg, image_size=32)
    assert model.training  # the trainer's mode is restored
    assert set(scalars) >= {
        "eval/world/de/txt_r1",
        "eval/world/de/img_r1",
        "eval/world/de/r_mean",
        "eval/world/mean/r_mean",
    }
    assert all(isinstance(v, float) and 0 <= v for v in scalars.values())
    # ITC-only by default: identical to an explicit ITC-only evaluation through the CLI's function.
    from cclm.evaluation.run import evaluate_retrieval

    direct = evaluate_retrieval(model, sets["world"][0], world_tokenizer, eval_cfg, 32, rerank=False)
    assert scalars["eval/world/de/r_mean"] == direct["r_mean"]
