"""`cclm iglue inspect` on every released annotation file: counts computed here by plain JSON parsing must equal
the CLI's, and match the sizes the IGLUE paper reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cclm.cli import main as cclm_main

VOCAB_FILES = {"trainval_ans2label.json", "trainval_label2ans.json"}
TOP_FOLDER_TASK = {
    "XVNLI": "xvnli",
    "xGQA": "xgqa",
    "gqa": "xgqa",
    "marvl": "marvl",
    "nlvr2": "marvl",
    "xFlickrCO": "xflickrco",
    "flickr30k": "xflickrco",
    "wit": "wit",
}


def annotation_files(root: Path) -> list[Path]:
    files = sorted(p for p in root.rglob("*.json*") if p.name not in VOCAB_FILES)
    assert files, f"no annotation files under {root}"
    return files


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def expected_counts(task: str, path: Path, root: Path) -> dict:
    """Examples, distinct images and languages of one file, straight from its JSON."""
    parts = path.relative_to(root).parts
    if task == "xgqa":
        questions = json.loads(path.read_text(encoding="utf-8"))
        language = parts[-2] if parts[0] == "xGQA" else "en"
        return {
            "examples": len(questions),
            "images": len({q["imageId"] for q in questions.values()}),
            "languages": [language],
        }
    records = jsonl(path)
    if task == "xvnli":
        return {
            "examples": len(records),
            "images": len({r["Flikr30kID"] for r in records}),
            "languages": [parts[-2]],
        }
    if task == "xflickrco":
        language = parts[-2] if parts[0] == "xFlickrCO" else "en"
        return {
            "examples": sum(len(r["sentences"]) for r in records),
            "images": len({r["img_path"] for r in records}),
            "languages": [language],
        }
    if task == "wit":
        return {
            "examples": len(records),
            "images": len({r["image_url"] for r in records}),
            "languages": sorted({r["language"] for r in records}),
        }
    if parts[0] == "nlvr2":  # two images per pair, named by the identifier without its sentence index
        pairs = {r["identifier"].rsplit("-", 1)[0] for r in records}
        return {"examples": len(records), "images": 2 * len(pairs), "languages": ["en"]}
    images = set()
    for r in records:
        for key in ("left_img", "right_img"):
            name = r[key] if "/" in r[key] else f"{r['concept']}/{r[key]}"
            images.add((r["language"], name))
    return {
        "examples": len(records),
        "images": len(images),
        "languages": sorted({r["language"] for r in records}),
    }


def run_inspect(task: str, files: list[Path], capsys) -> list[dict]:
    assert cclm_main(["iglue", "inspect", "--task", task, *map(str, files)]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_inspect_counts_every_file(iglue_dir, capsys):
    by_task: dict[str, list[Path]] = {}
    for path in annotation_files(iglue_dir):
        by_task.setdefault(TOP_FOLDER_TASK[path.relative_to(iglue_dir).parts[0]], []).append(path)
    assert set(by_task) == {"xvnli", "xgqa", "marvl", "xflickrco", "wit"}
    checked = 0
    for task, files in by_task.items():
        lines = run_inspect(task, files, capsys)
        assert [line["file"] for line in lines] == [str(f) for f in files]
        for line, path in zip(lines, files):
            assert line["task"] == task
            got = {key: line[key] for key in ("examples", "images", "languages")}
            assert got == expected_counts(task, path, iglue_dir), path
            checked += 1
    assert checked == len(annotation_files(iglue_dir))


@pytest.mark.parametrize(
    ("task", "relative", "examples", "images"),
    [
        ("xvnli", "XVNLI/annotations/ar/test.jsonl", 1164, None),
        ("xvnli", "XVNLI/annotations/ru/test.jsonl", 1164, None),
        ("marvl", "marvl/zero_shot/annotations/marvl-id.jsonl", 1128, None),
        ("marvl", "marvl/zero_shot/annotations/marvl-sw.jsonl", 1108, None),
        ("marvl", "marvl/zero_shot/annotations/marvl-ta.jsonl", 1242, None),
        ("marvl", "marvl/zero_shot/annotations/marvl-tr.jsonl", 1180, None),
        ("marvl", "marvl/zero_shot/annotations/marvl-zh.jsonl", 1012, None),
        ("xflickrco", "xFlickrCO/annotations/de/test.jsonl", 2000, 2000),
        ("xflickrco", "xFlickrCO/annotations/ja/test.jsonl", 2000, 2000),
        ("wit", "wit/annotations/test_ar.jsonl", 890, None),
        ("wit", "wit/annotations/test_ja.jsonl", 1000, None),
        ("xgqa", "gqa/annotations/testdev_balanced_questions.json", 1944, None),
    ],
)
def test_inspect_matches_published_sizes(iglue_dir, capsys, task, relative, examples, images):
    (line,) = run_inspect(task, [iglue_dir / relative], capsys)
    assert line["examples"] == examples
    if images is not None:
        assert line["images"] == images


def test_xvnli_records_without_gold_label_are_counted_apart(iglue_dir, capsys):
    """A test file scores them as wrong answers (IGLUE's denominator: every record); training leaves them
    out."""
    path = iglue_dir / "XVNLI/annotations/en/test.jsonl"
    (line,) = run_inspect("xvnli", [path], capsys)
    no_gold = sum(r["gold_label"] == "-" for r in jsonl(path))
    assert no_gold > 0 and line["no_gold_class"] == {"no gold label ('-')": no_gold}
    assert line["examples"] == 1164 and line["usable"] == 1164 - no_gold and not line["skipped"]
