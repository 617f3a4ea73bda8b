"""Bad annotation input fails clearly (file and line, the unknown label) or is reported, never silently lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from cclm.cli import main as cclm_main
from cclm.data.images import load_image
from cclm.tasks import get_task
from cclm.tasks.annotations import AnnotationError
from cclm.tasks.images import ImageRef, MissingImageError, require_images
from cclm.tasks.task_data import NO_GOLD_CLASS

REPO = Path(__file__).resolve().parent.parent
XVNLI_RECORD = {
    "gold_label": "entailment",
    "sentence1": "A dog runs.",
    "sentence2": "An animal moves.",
    "captionID": "1.jpg#0",
    "pairID": "1.jpg#0r1e",
    "Flikr30kID": "1",
}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_malformed_jsonl_line_names_file_and_line(tmp_path, capsys):
    path = write_lines(
        tmp_path / "de" / "test.jsonl",
        [json.dumps(XVNLI_RECORD), "", json.dumps(XVNLI_RECORD), '{"gold_label": "neutral", '],
    )
    with pytest.raises(AnnotationError, match=rf"{path}:4: malformed JSON"):
        get_task("xvnli").read(path)
    # an unreadable file is an error: one line naming the command, exit status 2 (1 is for a file read and found
    # to hold no usable example)
    assert cclm_main(["iglue", "inspect", "--task", "xvnli", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cclm iglue inspect: {path}:4: malformed JSON") and err.count("\n") == 1


@pytest.mark.parametrize("task", ["marvl", "xflickrco", "wit"])
def test_malformed_line_in_every_jsonl_task(tmp_path, task):
    path = write_lines(tmp_path / "broken.jsonl", ["{not json"])
    with pytest.raises(AnnotationError, match=r"broken.jsonl:1: malformed JSON"):
        get_task(task).read(path)


def test_unknown_xvnli_label_fails_clearly(tmp_path):
    path = write_lines(
        tmp_path / "fr" / "test.jsonl",
        [json.dumps(XVNLI_RECORD), json.dumps({**XVNLI_RECORD, "gold_label": "entails"})],
    )
    with pytest.raises(AnnotationError, match=r"test.jsonl:2: unknown label 'entails'"):
        get_task("xvnli").read(path)


def test_unknown_marvl_label_and_missing_field(tmp_path):
    record = {
        "concept": "1-x",
        "language": "id",
        "caption": "c",
        "left_img": "1-0.jpg",
        "right_img": "1-1.jpg",
        "id": "id-0",
        "label": "maybe",
    }
    with pytest.raises(AnnotationError, match=r"unknown label 'maybe'"):
        get_task("marvl").read(write_lines(tmp_path / "marvl-id.jsonl", [json.dumps(record)]))
    del record["left_img"]
    with pytest.raises(AnnotationError, match=r"marvl-id2.jsonl:1: missing field 'left_img'"):
        get_task("marvl").read(write_lines(tmp_path / "marvl-id2.jsonl", [json.dumps(record)]))


def test_an_xgqa_answer_outside_the_vocabulary_is_kept_and_counted(tmp_path):
    """Scored as wrong, as IGLUE's GQA_score.py counts it (training leaves it out: test_iglue_fidelity.py)."""
    path = tmp_path / "de" / "dev.json"
    path.parent.mkdir()
    path.write_text(
        json.dumps(
            {
                "7": {"question": "Was?", "answer": "zebra", "imageId": "n1"},
                "8": {"question": "Wer?", "answer": "unicorn rider", "imageId": "n2"},
            }
        )
    )
    data = get_task("xgqa").read(path, ["zebra", "dog"])
    assert [(e.uid, e.label) for e in data.examples] == [("7", 0), ("8", NO_GOLD_CLASS)]
    assert data.no_gold_class == {"answer not in the answer vocabulary": 1} and not data.skipped


def test_missing_image_is_reported_with_its_path(tmp_path):
    with pytest.raises(MissingImageError, match=str(tmp_path / "gone.jpg")):
        load_image(tmp_path / "gone.jpg", 32)


def test_all_missing_images_listed_before_training(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "1.jpg")
    records = [XVNLI_RECORD, {**XVNLI_RECORD, "Flikr30kID": "2"}, {**XVNLI_RECORD, "Flikr30kID": "3"}]
    path = write_lines(tmp_path / "en" / "test.jsonl", [json.dumps(r) for r in records])
    refs = get_task("xvnli").read(path).image_refs
    with pytest.raises(MissingImageError) as err:
        require_images(refs, {"flickr30k": str(tmp_path)})
    assert "2 image(s) missing" in str(err.value)
    assert str(tmp_path / "2.jpg") in str(err.value) and str(tmp_path / "3.jpg") in str(err.value)
    code = cclm_main(
        ["iglue", "check-images", "--task", "xvnli", "--root", f"flickr30k={tmp_path}", str(path)]
    )
    out = capsys.readouterr()
    assert code == 1
    assert out.out.split() == [str(tmp_path / "2.jpg"), str(tmp_path / "3.jpg")]
    assert "1 of 3 images found, 2 missing" in out.err

    # a misspelt --root is refused naming the known ones; a root the annotations need but nobody gave is one line
    with pytest.raises(SystemExit) as exit_status:
        cclm_main(["iglue", "check-images", "--task", "xvnli", "--root", f"flikr30k={tmp_path}", str(path)])
    assert exit_status.value.code == 2
    err = capsys.readouterr().err
    assert "unknown image folder name(s) flikr30k (known: coco, flickr30k, gqa, images" in err
    assert cclm_main(["iglue", "check-images", "--task", "xvnli", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "cclm iglue check-images: config key 'data.image_roots.flickr30k' must be set (folder of the flickr30k "
        "images)"
    )

    # a config naming missing annotation files: every one of them is listed, and the images of the others; the
    # status is 2, as the run would stop on them (1 only when the check could read every file and found images
    # missing)
    config = tmp_path / "xvnli.yaml"
    config.write_text(
        "task: xvnli\n"
        f"data:\n  root: {tmp_path}\n  image_roots: {{flickr30k: {tmp_path}}}\n"
        "  train: ['${data.root}/en/test.jsonl']\n"
        "  test: {ar: '${data.root}/ar/gone.jsonl', fr: '${data.root}/fr/gone.jsonl'}\n"
    )
    code = cclm_main(["iglue", "check-images", str(config)])
    out = capsys.readouterr()
    assert code == 2
    assert out.out.split() == [str(tmp_path / "2.jpg"), str(tmp_path / "3.jpg")]
    assert str(tmp_path / "ar" / "gone.jsonl") in out.err and str(tmp_path / "fr" / "gone.jsonl") in out.err
    assert "1 of 3 images found, 2 missing; 2 of 3 annotation files missing or unreadable" in out.err


def test_unset_image_root_names_the_config_key():
    with pytest.raises(KeyError, match=r"data.image_roots.coco"):
        ImageRef("coco", "COCO_val2014_000000000001.jpg").resolve({"flickr30k": "/data/flickr30k"})


def test_undecodable_image_fails_with_its_path(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"not an image")
    with pytest.raises(OSError, match=r"cannot decode image .*broken.jpg"):
        load_image(path, 32)


def test_unknown_task_and_unknown_config_key():
    from cclm.config import ConfigError, FinetuneConfig, load_config

    with pytest.raises(ValueError, match="unknown task 'vqa2'"):
        get_task("vqa2")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.learning_rate'"):
        load_config(FinetuneConfig, REPO / "configs/finetune/xvnli.yaml", ["train.learning_rate=1e-4"])


def test_finetune_check_images_lists_every_missing_image_of_the_config(iglue_dir, tmp_path, capsys):
    """Every image the zero-shot run reads: training, dev, test and translate-test files, not the few-shot files
    (read by protocol=few_shot only)."""
    files = [
        iglue_dir / "XVNLI/annotations/en/train_1.jsonl",
        iglue_dir / "XVNLI/annotations/en/train_5.jsonl",
        *(iglue_dir / f"XVNLI/annotations/{lang}/test.jsonl" for lang in ("en", "ar", "es", "fr", "ru")),
        *(
            iglue_dir / f"XVNLI/annotations_machine-translate/{lang}/test.jsonl"
            for lang in ("ar", "es", "fr", "ru")
        ),
    ]
    ids = {
        json.loads(line)["Flikr30kID"] for f in files for line in f.read_text().splitlines() if line.strip()
    }
    Image.new("RGB", (8, 8)).save(tmp_path / f"{sorted(ids)[0]}.jpg")
    code = cclm_main(
        [
            "finetune",
            str(REPO / "configs/finetune/xvnli.yaml"),
            "--check-images",
            f"data.root={iglue_dir}",
            f"data.image_roots.flickr30k={tmp_path}",
            f"data.train=[{files[0]}]",
            f"data.dev=[{files[1]}]",
        ]
    )
    out = capsys.readouterr()
    assert code == 1
    assert out.out.split() == [str(tmp_path / f"{i}.jpg") for i in sorted(ids)[1:]]
    assert f"1 of {len(ids)} images found, {len(ids) - 1} missing" in out.err


def test_snli_ve_release_field_names_are_read(tmp_path):
    # SNLI-VE as released (the English training source) spells the image id Flickr30K_ID
    record = {
        "gold_label": "neutral",
        "sentence2": "A dog sleeps.",
        "Flickr30K_ID": "42",
        "pairID": "42#0r1n",
    }
    data = get_task("xvnli").read(write_lines(tmp_path / "snli_ve_train.jsonl", [json.dumps(record)]))
    (example,) = data.examples
    assert (example.images[0].path, example.label, example.language) == ("42.jpg", 1, "en")
    del record["Flickr30K_ID"]
    with pytest.raises(AnnotationError, match=r"snli_ve_dev.jsonl:1: missing field 'Flikr30kID'"):
        get_task("xvnli").read(write_lines(tmp_path / "snli_ve_dev.jsonl", [json.dumps(record)]))
