"""``cclm iglue check-images CONFIG`` and ``cclm finetune|evaluate CONFIG --check-images`` check the images of
exactly the files the run reads, per protocol, read as the run reads them; and their errors (and those of
``cclm iglue inspect`` and ``cclm prep``) are one line ``cclm <command>: <message>`` with exit status 2, status 1
being a check's finding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from cclm.cli import main as cclm_main
from cclm.config import FinetuneConfig, load_config
from cclm.tasks import iglue_cli

REPO = Path(__file__).resolve().parent.parent


def xvnli_line(image: int, label: str = "entailment") -> str:
    return json.dumps(
        {
            "gold_label": label,
            "sentence2": f"about image {image}",
            "pairID": f"p{image}",
            "Flikr30kID": str(image),
        }
    )


@pytest.fixture
def config(tmp_path) -> Path:
    """An XVNLI config whose files each name their own images (the numbers below), none of them on disk:
    training 1, 2 and 9 (labelled '-': training leaves it out), dev 3, 4, 5 (data.dev_max_examples=2: 5 is never
    read), tests de 6 / fr 7, translate-test de 8, few-shot de 10 (train) and 11 (dev), and a few-shot fr file
    that does not exist."""
    root = tmp_path / "ann"
    files = {
        "en/train.jsonl": [xvnli_line(1), xvnli_line(2), xvnli_line(9, "-")],
        "en/dev.jsonl": [xvnli_line(3), xvnli_line(4), xvnli_line(5)],
        "de/test.jsonl": [xvnli_line(6)],
        "fr/test.jsonl": [xvnli_line(7)],
        "tt/de/test.jsonl": [xvnli_line(8)],
        "de/train_5.jsonl": [xvnli_line(10)],
        "de/dev.jsonl": [xvnli_line(11)],
    }
    for name, lines in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("\n".join(lines) + "\n")
    (tmp_path / "images").mkdir()
    path = tmp_path / "xvnli.yaml"
    path.write_text(
        "task: xvnli\n"
        "data:\n"
        f"  root: {root}\n"
        f"  image_roots: {{flickr30k: {tmp_path / 'images'}}}\n"
        "  train: ['${data.root}/en/train.jsonl']\n"
        "  dev: ['${data.root}/en/dev.jsonl']\n"
        "  dev_max_examples: 2\n"
        "  test: {de: '${data.root}/de/test.jsonl', fr: '${data.root}/fr/test.jsonl'}\n"
        "  translate_test: {de: '${data.root}/tt/de/test.jsonl'}\n"
        "  few_shot_train: {de: '${data.root}/de/train_5.jsonl', fr: '${data.root}/fr/gone_train_5.jsonl'}\n"
        "  few_shot_dev: {de: '${data.root}/de/dev.jsonl'}\n"
    )
    return path


def listed(capsys, tmp_path: Path) -> list[int]:
    """The image numbers a check printed as missing."""
    out = capsys.readouterr().out.split()
    return sorted(int(Path(line).stem) for line in out if Path(line).parent == tmp_path / "images")


def test_each_protocol_checks_only_the_files_its_run_reads(config, tmp_path, capsys):
    """Before, every config was checked for its training, dev, test, translate-test and every few-shot file,
    whatever its protocol, each example of them, and the dev file past data.dev_max_examples: a zero-shot config
    naming a missing few-shot file failed the check while its run trains and scores."""
    check = ["iglue", "check-images", str(config)]
    # zero-shot fine-tuning: training (without its '-' record), the dev cap, tests and translate-test
    assert cclm_main(check) == 1
    assert listed(capsys, tmp_path) == [1, 2, 3, 4, 6, 7, 8]
    assert cclm_main(["finetune", str(config), "--check-images"]) == 1
    assert listed(capsys, tmp_path) == [1, 2, 3, 4, 6, 7, 8]
    # few-shot: per language its few-shot file, its test file and its selection file
    assert cclm_main([*check, "protocol=few_shot", "languages=[de]"]) == 1
    assert listed(capsys, tmp_path) == [6, 10, 11]
    assert cclm_main([*check, "protocol=few_shot", "languages=[de]", "data.few_shot_dev.de=null"]) == 1
    assert listed(capsys, tmp_path) == [3, 4, 6, 10]  # the English dev set, capped
    assert cclm_main([*check, "protocol=few_shot", "languages=[de]", "train.select_on=test"]) == 1
    assert listed(capsys, tmp_path) == [6, 10]
    # every few-shot language: fr's few-shot file is missing, which the few-shot run would stop on (status 2)
    assert cclm_main([*check, "protocol=few_shot"]) == 2
    out = capsys.readouterr()
    assert "gone_train_5.jsonl" in out.err and "1 of 6 annotation files missing or unreadable" in out.err
    # the images of the others: de's, and fr's test file and selection file (the English dev set)
    assert sorted(int(Path(line).stem) for line in out.out.split()) == [3, 4, 6, 7, 10, 11]
    # evaluation: the test files (translate-test: its files), nothing it does not score
    assert cclm_main(["evaluate", str(config), "--check-images"]) == 1
    assert listed(capsys, tmp_path) == [6, 7]
    assert cclm_main(["evaluate", str(config), "--check-images", "protocol=translate_test"]) == 1
    assert listed(capsys, tmp_path) == [8]
    assert cclm_main([*check, "protocol=translate_test"]) == 1  # only `cclm evaluate` runs it
    assert listed(capsys, tmp_path) == [8]


def test_a_zero_shot_config_with_a_missing_few_shot_file_passes_the_check(config, tmp_path, capsys):
    for image in range(1, 12):
        Image.new("RGB", (8, 8)).save(tmp_path / "images" / f"{image}.jpg")
    assert cclm_main(["iglue", "check-images", str(config)]) == 0
    assert cclm_main(["finetune", str(config), "--check-images"]) == 0
    assert "7 of 7 images found, 0 missing" in capsys.readouterr().err


def test_the_real_zero_shot_config_does_not_check_few_shot_files(iglue_dir):
    """Before, checking configs/finetune/xflickrco.yaml demanded its seven train_100 few-shot files."""
    cfg = load_config(FinetuneConfig, REPO / "configs/finetune/xflickrco.yaml", [f"data.root={iglue_dir}"])
    files = iglue_cli._files_of_config(cfg)
    assert not [f for f in files if "train_100" in f]
    assert len(files) == 1 + 1 + 8 + 7  # train, dev, tests, translate-tests
    cfg = load_config(
        FinetuneConfig,
        REPO / "configs/finetune/xflickrco.yaml",
        [f"data.root={iglue_dir}", "protocol=few_shot"],
    )
    reads = iglue_cli.config_reads(cfg)
    assert sorted(f for f, how in reads if how == iglue_cli.TRAIN and "train_100" in f) == sorted(
        str(f) for f in cfg.data.few_shot_train.values()
    )
    assert not [f for f in dict(reads) if "train_ann" in f or "test_gmt" in f]  # no English training, no MT


# ------------------------------------------------------------------------------------------------ errors
def one_line(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured
    return captured.err.strip()


def test_config_and_file_errors_are_one_line_with_status_2(config, tmp_path, capsys):
    """Before, these exited with status 1 (the status of a check that found missing images), and
    `cclm finetune --check-images` named `cclm iglue check-images` in its error."""
    gone = tmp_path / "gone.yaml"
    assert cclm_main(["iglue", "check-images", str(gone)]) == 2
    assert one_line(capsys) == f"cclm iglue check-images: config file not found: {gone}"
    assert cclm_main(["iglue", "check-images", str(config), "data.bogus=1"]) == 2
    assert one_line(capsys).startswith("cclm iglue check-images: unknown config key 'data.bogus'")
    assert cclm_main(["finetune", str(config), "--check-images", "data.bogus=1"]) == 2
    assert one_line(capsys).startswith("cclm finetune: unknown config key 'data.bogus'")
    assert cclm_main(["evaluate", str(config), "--check-images", "data.bogus=1"]) == 2
    assert one_line(capsys).startswith("cclm evaluate: unknown config key 'data.bogus'")
    assert cclm_main(["finetune", str(gone), "--check-images"]) == 2
    assert one_line(capsys) == f"cclm finetune: config file not found: {gone}"
    assert cclm_main(["iglue", "check-images", str(config), "languages=[xx]"]) == 2
    assert one_line(capsys).startswith(
        "cclm iglue check-images: languages: xx not named by this config's files"
    )
    assert cclm_main(["finetune", str(config), "--check-images", "protocol=translate_test"]) == 2
    assert one_line(capsys).startswith("cclm finetune: translate-test needs no fine-tuning")
    # inspect: a missing file is an error (2); a file read and found to hold no usable example is a finding (1)
    missing = tmp_path / "de" / "gone.jsonl"
    assert cclm_main(["iglue", "inspect", "--task", "xvnli", str(missing)]) == 2
    assert one_line(capsys) == f"cclm iglue inspect: file not found: {missing}"
    unusable = tmp_path / "de" / "test.jsonl"
    unusable.parent.mkdir(parents=True, exist_ok=True)
    unusable.write_text(xvnli_line(1, "-") + "\n")
    assert cclm_main(["iglue", "inspect", "--task", "xvnli", str(unusable), str(missing)]) == 2
    capsys.readouterr()
    assert cclm_main(["iglue", "inspect", "--task", "xvnli", str(unusable)]) == 1
    assert "no usable example" in capsys.readouterr().err


def test_prep_errors_have_no_extra_error_word(tmp_path, capsys):
    """Before: `cclm prep tokenizer: error: ...`."""
    pattern = tmp_path / "none-*.tar"
    assert cclm_main(["prep", "tokenizer", "--shards", str(pattern), "--out", str(tmp_path)]) == 2
    line = one_line(capsys)
    assert line.startswith("cclm prep tokenizer: ") and "matches no file" in line, line
    assert not line.startswith("cclm prep tokenizer: error:"), line
