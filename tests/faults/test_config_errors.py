"""Config and argument errors through the real ``cclm`` entry point: exit status 2, one line naming the key or
file, no traceback (a traceback only with ``--debug`` / ``CCLM_DEBUG=1``). Every probe fails before any data,
model or process group is touched, so each takes a fraction of a second once the modules are imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cclm.cli import main as cclm_main
from cclm.config import FinetuneConfig, load_config

REPO = Path(__file__).resolve().parents[2]
XVNLI = REPO / "configs" / "finetune" / "xvnli.yaml"
SHARDS = ["data.image_caption.shards=/nowhere/ic.tar", "data.parallel_text.shards=/nowhere/pt.tar"]


def pretrain_config(tmp_path: Path, model: str) -> Path:
    """A pretraining config on a shipped model config (``tiny``: random init, a tower; ``base``: open_clip and HF
    names); nothing it names exists, which no probe below gets far enough to notice."""
    path = tmp_path / f"{model}.yaml"
    path.write_text(f"defaults:\n  model: {model}\noutput_dir: {tmp_path / 'out'}\n")
    return path


def run_cclm(capsys, *argv: str) -> tuple[int, str]:
    code = cclm_main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, command: str, *needles: str) -> str:
    """Exit status 2 and exactly one ``cclm COMMAND:`` line holding every needle (library log lines such as
    DeepSpeed's accelerator notice may precede it); no traceback."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"cclm {command}:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def offline(monkeypatch):
    """No request leaves the machine: the Hub check must answer from the cache alone, at once."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)


# ------------------------------------------------------------------------------------------ model fields, names
def test_encoder_typo_names_the_key(tmp_path, capsys):
    code, err = run_cclm(
        capsys,
        "pretrain",
        pretrain_config(tmp_path, "tiny"),
        *SHARDS,
        "model.text.encoder.num_hiden_layers=8",
    )
    assert_one_line_error(code, err, "pretrain", "model.text.encoder.num_hiden_layers", "'num_hidden_layers'")


def test_tower_typo_names_the_key(tmp_path, capsys):
    code, err = run_cclm(
        capsys, "pretrain", pretrain_config(tmp_path, "tiny"), *SHARDS, "model.vision.tower.widht=64"
    )
    assert_one_line_error(code, err, "pretrain", "model.vision.tower.widht", "'width'")


def test_unknown_open_clip_name_names_the_key_and_the_local_forms(tmp_path, capsys, offline):
    code, err = run_cclm(
        capsys, "pretrain", pretrain_config(tmp_path, "base"), *SHARDS, "model.vision.name=ViT-Nope-99"
    )
    assert_one_line_error(code, err, "pretrain", "model.vision.name='ViT-Nope-99'", "local-dir:")


def test_unknown_hf_text_name_offline_says_to_give_a_folder(tmp_path, capsys, offline):
    code, err = run_cclm(
        capsys,
        "pretrain",
        pretrain_config(tmp_path, "tiny"),
        *SHARDS,
        "model.text.name_or_path=nonexistent-org/x",
    )
    assert_one_line_error(
        code,
        err,
        "pretrain",
        "model.text.name_or_path='nonexistent-org/x': not a local folder and not loadable from the Hugging Face "
        "Hub (offline?): download it and give the folder path",
    )


# ----------------------------------------------------------------------------------------------------- overrides
def test_key_given_twice_is_refused(tmp_path, capsys):
    config = pretrain_config(tmp_path, "tiny")
    code, err = run_cclm(capsys, "pretrain", config, *SHARDS, "train.max_steps=5", "train.max_steps=50")
    assert_one_line_error(code, err, "pretrain", "'train.max_steps'", "given 2 times")


def test_brace_pattern_expanded_by_the_shell_says_to_quote_it(tmp_path):
    """The real shell: bash expands ``key=a-{0..2}.tar`` into three ``key=...`` words."""
    config = pretrain_config(tmp_path, "tiny")
    script = (
        f"{sys.executable} -m cclm.cli pretrain {config} data.parallel_text.shards=/nowhere/pt.tar "
        f"data.image_caption.shards={tmp_path}/shard-{{000000..000002}}.tar"
    )
    proc = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert_one_line_error(
        proc.returncode,
        proc.stderr,
        "pretrain",
        "data.image_caption.shards",
        "quote it",
        f"'data.image_caption.shards={tmp_path}/shard-{{000000..000002}}.tar'",
    )


def test_brace_pattern_arriving_as_loose_paths_says_to_quote_it(tmp_path, capsys):
    shards = [f"{tmp_path}/shard-00000{i}.tar" for i in range(3)]
    code, err = run_cclm(
        capsys,
        "pretrain",
        pretrain_config(tmp_path, "tiny"),
        "data.parallel_text.shards=/nowhere/pt.tar",
        f"data.image_caption.shards={shards[0]}",
        *shards[1:],
    )
    assert_one_line_error(code, err, "pretrain", "data.image_caption.shards", "quote it", "{000000..000002}")


def test_null_drops_a_language_from_a_mapping(tmp_path, capsys):
    cfg = load_config(FinetuneConfig, XVNLI, ["data.test.ar=null", "data.few_shot_train.ar=~"])
    assert list(cfg.data.test) == ["en", "es", "fr", "ru"] and "ar" not in cfg.data.few_shot_train
    # Through the command: the override is accepted and the run fails later on what is really missing.
    code, err = run_cclm(capsys, "evaluate", XVNLI, f"checkpoint={tmp_path / 'none'}", "data.test.ar=null")
    line = assert_one_line_error(code, err, "evaluate")
    assert "data.test.ar" not in line
    # A language the mapping does not have is named, in one line.
    code, err = run_cclm(capsys, "evaluate", XVNLI, f"checkpoint={tmp_path / 'none'}", "data.test.xx=null")
    assert_one_line_error(code, err, "evaluate", "data.test.xx", "ar, es")


# --------------------------------------------------------------------------------------- one style, every command
def bad_arguments(tmp_path: Path) -> dict[str, list[str]]:
    missing = tmp_path / "missing"
    return {
        "finetune": ["finetune", str(XVNLI), f"data.root={missing}"],
        "index": ["index", str(missing), "--model", str(missing), "--out", str(tmp_path / "index")],
        "search": ["search", str(missing), "a red circle"],
        "evaluate": [
            "evaluate",
            "retrieval",
            str(REPO / "configs/eval/demo_world.yaml"),
            f"checkpoint={missing}",
            f"data.root={missing}",
        ],
    }


@pytest.mark.parametrize("command", ["finetune", "index", "search", "evaluate"])
def test_every_command_reports_a_user_error_in_one_line(tmp_path, capsys, monkeypatch, command):
    monkeypatch.delenv("CCLM_DEBUG", raising=False)
    argv = bad_arguments(tmp_path)[command]
    code, err = run_cclm(capsys, *argv)
    assert_one_line_error(code, err, command, str(tmp_path / "missing"))
    # The traceback is there for whoever asks: a global --debug flag, or CCLM_DEBUG=1.
    code, err = run_cclm(capsys, "--debug", *argv)
    assert code == 2 and "Traceback" in err
    monkeypatch.setenv("CCLM_DEBUG", "1")
    code, err = run_cclm(capsys, *argv)
    assert code == 2 and "Traceback" in err


def test_module_entry_points_that_launchers_start_report_the_same_way(tmp_path):
    """launch/*.sh and torchrun start ``python -m cclm.train.cli`` and ``cclm.recipes.cli``, not the dispatcher."""
    env = {k: v for k, v in os.environ.items() if k != "CCLM_DEBUG"}
    for module, command in (("cclm.train.cli", "pretrain"), ("cclm.recipes.cli", "recipe")):
        extra = ["mla"] if command == "recipe" else []
        proc = subprocess.run(
            [sys.executable, "-m", module, *extra, str(tmp_path / "missing.yaml")],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert_one_line_error(proc.returncode, proc.stderr, command, str(tmp_path / "missing.yaml"))


def test_prep_reports_in_one_line_and_shows_the_traceback_under_debug(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CCLM_DEBUG", raising=False)
    missing = tmp_path / "missing.tsv"
    argv = ["prep", "parallel-tsv", "--input", str(missing), "--out", str(tmp_path / "out")]
    argv += ["--src-lang", "en", "--tgt-lang", "de"]
    code, err = run_cclm(capsys, *argv)
    assert code == 2 and str(missing) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    code, err = run_cclm(capsys, "--debug", *argv)
    assert code == 2 and "Traceback" in err
    code, err = run_cclm(capsys, *argv)  # --debug held for that command only
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------------------- devices
@pytest.mark.parametrize(
    "device, needle",
    [
        ("gpu", "unknown device 'gpu': use auto, cpu, cuda or cuda:N"),
        ("cuda:0", "no CUDA device is available"),
    ],
)
def test_a_device_this_machine_lacks_or_no_device_is_one_line(capsys, device, needle, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = run_cclm(capsys, "finetune", XVNLI, f"train.device={device}")
    assert_one_line_error(code, err, "finetune", needle)


def test_cuda_without_an_index_is_this_process_gpu_and_a_missing_index_is_named(monkeypatch):
    import torch

    from cclm.errors import UserError
    from cclm.runtime.env import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("CUDA:0") == torch.device("cuda", 0)
    with pytest.raises(UserError, match="'cuda:2': this machine has 2 CUDA device"):
        resolve_device("cuda:2")
    assert resolve_device("cpu") == torch.device("cpu")


# -------------------------------------------------------------------------------------- periodic evaluation
# with eval_every=0 the set is unused, but its path is still a mistake
@pytest.mark.parametrize("every", [5, 0])
def test_a_missing_periodic_evaluation_set_is_one_line(tmp_path, capsys, every):
    code, err = run_cclm(
        capsys,
        "pretrain",
        pretrain_config(tmp_path, "tiny"),
        *SHARDS,
        f"train.eval_every={every}",
        f"eval.datasets.world={tmp_path / 'no'}",
    )
    assert_one_line_error(code, err, "pretrain", "eval.datasets.world: folder", "does not exist")


@pytest.mark.parametrize(
    "overrides, warning",
    [
        (["train.eval_every=5"], "train.eval_every=5 but eval.datasets names no held-out set"),
        (["eval.datasets.world={tmp}"], "eval.datasets names world but train.eval_every=0"),
    ],
)
def test_either_half_of_periodic_evaluation_alone_is_a_warning(tmp_path, caplog, overrides, warning):
    from cclm.config import PretrainConfig
    from cclm.train.pretrain import check_periodic_evaluation

    given = [o.format(tmp=tmp_path) for o in overrides]
    cfg = load_config(PretrainConfig, pretrain_config(tmp_path, "tiny"), [*SHARDS, *given])
    check_periodic_evaluation(cfg)
    assert warning in caplog.text


# ------------------------------------------------------------------------------------------------ fine-tuning
def test_finetune_refuses_pretrained_with_checkpoint(tmp_path, capsys):
    code, err = run_cclm(
        capsys,
        "finetune",
        XVNLI,
        f"pretrained={tmp_path}",
        f"checkpoint={tmp_path}",
        f"output_dir={tmp_path}/o",
    )
    assert_one_line_error(code, err, "finetune", "pretrained and checkpoint are both set")


def test_a_zero_shot_language_filter_that_leaves_no_test_file_is_refused_before_training(tmp_path, capsys):
    code, err = run_cclm(
        capsys,
        "finetune",
        XVNLI,
        "data.test.ar=null",
        "data.translate_test.ar=null",
        "languages=ar",
        f"output_dir={tmp_path / 'o'}",
    )
    assert_one_line_error(
        code, err, "finetune", "languages: ar has no test file in this config (it tests en, es"
    )
    assert not (tmp_path / "o" / "model").exists()
