"""Issue 15 item 10: every field an IGLUE reader uses is type-checked when the file is read. A wrong type, a
non-UTF-8 line or a malformed JSON document fails with ``file:line`` from ``cclm iglue inspect`` and from
``cclm finetune`` before any model is built (it used to pass inspect and crash in the middle of training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cclm.cli import main as cclm_main
from cclm.errors import DataError
from cclm.runtime.env import DistEnv
from cclm.tasks import get_task, protocols
from cclm.tasks.annotations import AnnotationError

REPO = Path(__file__).resolve().parents[2]

XVNLI = {"gold_label": "entailment", "sentence2": "An animal moves.", "pairID": "1#0r1e", "Flikr30kID": "1"}
MARVL = {
    "concept": "1-x",
    "language": "id",
    "caption": "Dua gambar.",
    "left_img": "1-0.jpg",
    "right_img": "1-1.jpg",
    "id": "id-0",
    "label": True,
}
NLVR2 = {"sentence": "Two dogs.", "identifier": "train-10-0-0", "directory": 10, "label": "True"}
XFLICKRCO = {"sentences": ["Ein Hund."], "id": 42, "img_path": "COCO_val2014_000000000042.jpg"}
WIT = {
    "image_url": "https://upload.wikimedia.org/a/b/Bonn.jpg",
    "caption_reference_description": "Bonn",
    "language": "de",
    "wit_ix": "wit-1",
}
GQA = {"question": "Was ist das?", "answer": "dog", "imageId": "n1"}


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def inspect(task: str, path: Path, capsys) -> tuple[int, str, str]:
    code = cclm_main(["iglue", "inspect", "--task", task, str(path)])
    out = capsys.readouterr()
    return code, out.out, out.err


# (task, good record, the bad field values, the message after "file:2: ")
WRONG_TYPES = [
    ("xvnli", XVNLI, {"sentence2": None}, "field 'sentence2' must be a string, got null"),
    ("xvnli", XVNLI, {"sentence2": 3.5}, "field 'sentence2' must be a string, got a number 3.5"),
    (
        "xvnli",
        XVNLI,
        {"gold_label": ["entailment"]},
        "field 'gold_label' must be a string, got a list [\"entailment\"]",
    ),
    (
        "xvnli",
        XVNLI,
        {"Flikr30kID": {"id": 1}},
        "field 'Flikr30kID' must be a string or an integer, got an object {\"id\": 1}",
    ),
    ("xvnli", XVNLI, {"pairID": True}, "field 'pairID' must be a string or an integer, got a boolean true"),
    # a skipped record ('-': no gold label) is checked all the same
    (
        "xvnli",
        XVNLI,
        {"gold_label": "-", "sentence2": 7},
        "field 'sentence2' must be a string, got a number 7",
    ),
    ("marvl", MARVL, {"label": [True]}, "field 'label' must be a boolean or a string, got a list [true]"),
    ("marvl", MARVL, {"caption": None}, "field 'caption' must be a string, got null"),
    ("marvl", MARVL, {"left_img": 5}, "field 'left_img' must be a string, got a number 5"),
    ("marvl", MARVL, {"language": None}, "field 'language' must be a string, got null"),
    ("marvl", NLVR2, {"sentence": ["a"]}, "field 'sentence' must be a string, got a list [\"a\"]"),
    ("marvl", NLVR2, {"identifier": 3}, "field 'identifier' must be a string, got a number 3"),
    ("marvl", NLVR2, {"directory": None}, "field 'directory' must be a string or an integer, got null"),
    (
        "xflickrco",
        XFLICKRCO,
        {"sentences": "Ein Hund."},
        "field 'sentences' must be a non-empty list of strings, got a string \"Ein Hund.\"",
    ),
    (
        "xflickrco",
        XFLICKRCO,
        {"sentences": ["Ein Hund.", None]},
        "field 'sentences' must be a non-empty list of strings, got a list [\"Ein Hund.\", null]",
    ),
    (
        "xflickrco",
        XFLICKRCO,
        {"sentences": []},
        "field 'sentences' must be a non-empty list of strings, got a list []",
    ),
    ("xflickrco", XFLICKRCO, {"img_path": 42}, "field 'img_path' must be a string, got a number 42"),
    (
        "wit",
        WIT,
        {"caption_reference_description": 12},
        "field 'caption_reference_description' must be a string, got a number 12",
    ),
    ("wit", WIT, {"image_url": None}, "field 'image_url' must be a string, got null"),
    ("wit", WIT, {"language": ["de"]}, "field 'language' must be a string, got a list [\"de\"]"),
]


@pytest.mark.parametrize(("task", "good", "bad", "message"), WRONG_TYPES)
def test_wrong_field_type_names_file_line_and_field(tmp_path, capsys, task, good, bad, message):
    path = write_jsonl(tmp_path / "annotations.jsonl", [good, {**good, **bad}, good])
    with pytest.raises(AnnotationError) as err:
        get_task(task).read(path)
    assert str(err.value) == f"{path}:2: {message}"
    assert isinstance(err.value, DataError)
    assert inspect(task, path, capsys) == (2, "", f"cclm iglue inspect: {path}:2: {message}\n")


@pytest.mark.parametrize(
    ("task", "record"),
    [("xvnli", XVNLI), ("marvl", MARVL), ("marvl", NLVR2), ("xflickrco", XFLICKRCO), ("wit", WIT)],
)
def test_records_with_the_types_of_the_releases_pass(tmp_path, capsys, task, record):
    """Among them NLVR2's integer ``directory`` and COCO's integer ``id`` in xFlickr&CO."""
    path = write_jsonl(tmp_path / "en" / "annotations.jsonl", [record])
    code, out, err = inspect(task, path, capsys)
    assert (code, err) == (0, "")
    assert json.loads(out)["examples"] == 1


def test_nlvr2_integer_directory_names_the_image_folder(tmp_path):
    (example,) = get_task("nlvr2").read(write_jsonl(tmp_path / "train.jsonl", [NLVR2])).examples
    assert [image.path for image in example.images] == [
        "train/10/train-10-0-img0.png",
        "train/10/train-10-0-img1.png",
    ]


@pytest.mark.parametrize(
    ("task", "good"), [("xvnli", XVNLI), ("marvl", MARVL), ("xflickrco", XFLICKRCO), ("wit", WIT)]
)
def test_non_utf8_line_is_an_error_naming_file_and_line(tmp_path, capsys, task, good):
    path = tmp_path / "de" / "test.jsonl"
    path.parent.mkdir()
    line = json.dumps(good).encode()
    path.write_bytes(line + b"\n" + line + b"\n" + b'{"caption": "Caf\xe9"}\n' + line + b"\n")
    column = len(b'{"caption": "Caf') + 1
    message = (
        f"{path}:3: not valid UTF-8 (byte 0xe9 at column {column}); IGLUE annotations are curated files, so an "
        "undecodable line is an error rather than a skipped line: download the file again or repair that line"
    )
    with pytest.raises(AnnotationError) as err:
        get_task(task).read(path)
    assert str(err.value) == message
    assert inspect(task, path, capsys) == (2, "", f"cclm iglue inspect: {message}\n")


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "fr" / "test.jsonl"
    path.parent.mkdir()
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(XVNLI).encode() + b"\n")
    assert [e.text for e in get_task("xvnli").read(path).examples] == ["An animal moves."]


def test_a_line_that_is_not_an_object_names_its_type(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [XVNLI, ["not", "a", "record"]])
    with pytest.raises(AnnotationError, match=rf"^{path}:2: expected a JSON object, got a list$"):
        get_task("xvnli").read(path)


# ------------------------------------------------------------------------------------- xGQA: JSON documents
def write_gqa(path: Path, questions: dict) -> Path:
    """One question per line (as pretty-printed files are), so each question's line is known: 2, 3, ..."""
    path.parent.mkdir(parents=True, exist_ok=True)
    members = [f"{json.dumps(qid)}: {json.dumps(q, ensure_ascii=False)}" for qid, q in questions.items()]
    path.write_text("{\n" + ",\n".join(members) + "\n}\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"answer": ["dog"]}, "field 'answer' must be a string, got a list [\"dog\"]"),
        ({"question": None}, "field 'question' must be a string, got null"),
        ({"imageId": 1.5}, "field 'imageId' must be a string or an integer, got a number 1.5"),
    ],
)
def test_xgqa_wrong_type_names_line_and_question(tmp_path, capsys, bad, message):
    path = write_gqa(tmp_path / "de" / "dev.json", {"7": GQA, "8": GQA, "9": {**GQA, **bad}})
    with pytest.raises(AnnotationError) as err:
        get_task("xgqa").read(path, ["dog", "cat"])
    assert str(err.value) == f"{path}:4: question 9: {message}"
    assert inspect("xgqa", path, capsys) == (2, "", f"cclm iglue inspect: {path}:4: question 9: {message}\n")


def test_xgqa_question_that_is_not_an_object(tmp_path):
    path = write_gqa(tmp_path / "dev.json", {"7": GQA, "8": "dog"})
    with pytest.raises(AnnotationError) as err:
        get_task("xgqa").read(path)
    assert str(err.value) == f'{path}:3: question 8: the question must be a JSON object, got a string "dog"'


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ('{\n"7": Q,\n"8": {"answer": }\n}', 3, "Expecting value at column 17"),
        ('{\n"7": Q\n"8": Q\n}', 3, "Expecting ',' delimiter at column 1"),
        ('{\n"7": Q,\n8: Q\n}', 3, "Expecting property name enclosed in double quotes at column 1"),
        ('{\n"7" Q\n}', 2, "Expecting ':' delimiter at column 5"),
        ('{\n"7": Q\n}\n{"8": Q}', 4, "Extra data at column 1"),
        ('{"7": Q', 1, "Expecting ',' delimiter at column 69"),
    ],
)
def test_xgqa_malformed_document_names_the_line(tmp_path, text, line, message):
    """``Q`` is a good question: the members before the fault are read, and the fault is named where it is."""
    path = tmp_path / "dev.json"
    path.write_text(text.replace("Q", json.dumps(GQA)), encoding="utf-8")
    with pytest.raises(AnnotationError) as err:
        get_task("xgqa").read(path)
    assert str(err.value) == f"{path}:{line}: malformed JSON ({message})"
    if message.startswith(("Expecting value", "Expecting ','", "Extra")):  # the whole-document parser agrees
        with pytest.raises(json.JSONDecodeError) as reference:
            json.loads(path.read_text(encoding="utf-8"))
        reference_message = f"{reference.value.msg} at column {reference.value.colno}"
        assert (reference.value.lineno, reference_message) == (line, message)


def test_xgqa_document_that_is_not_an_object_or_repeats_a_question(tmp_path):
    listed = tmp_path / "list.json"
    listed.write_text('[{"question": "?"}]', encoding="utf-8")
    with pytest.raises(AnnotationError, match=rf"^{listed}:1: expected a JSON object, got a list$"):
        get_task("xgqa").read(listed)
    twice = tmp_path / "twice.json"
    twice.write_text(f'{{\n"7": {json.dumps(GQA)},\n"7": {json.dumps(GQA)}\n}}', encoding="utf-8")
    with pytest.raises(AnnotationError) as err:
        get_task("xgqa").read(twice)
    assert str(err.value) == f'{twice}:3: key "7" given twice (first at line 2)'


def test_xgqa_non_utf8_byte_names_its_line(tmp_path):
    path = tmp_path / "zh" / "dev.json"
    path.parent.mkdir()
    path.write_bytes(b'{\n"7": ' + json.dumps(GQA).encode() + b',\n"8": {"question": "\xff"}\n}\n')
    with pytest.raises(AnnotationError) as err:
        get_task("xgqa").read(path)
    assert str(err.value).startswith(f"{path}:3: not valid UTF-8 (byte 0xff at column 20); IGLUE annotations")


def test_xgqa_answer_vocabulary_ids_are_checked(tmp_path):
    from types import SimpleNamespace

    vocab = tmp_path / "trainval_ans2label.json"
    vocab.write_text('{\n"dog": 0,\n"cat": "1"\n}', encoding="utf-8")
    with pytest.raises(AnnotationError) as err:
        get_task("xgqa").labels(SimpleNamespace(label_vocab=str(vocab)))
    assert str(err.value) == f"{vocab}:3: the label id of answer 'cat' must be an integer, got a string \"1\""
    vocab.write_text('{"dog": 0, "cat": 1}', encoding="utf-8")
    assert get_task("xgqa").labels(SimpleNamespace(label_vocab=str(vocab))) == ["dog", "cat"]


# ------------------------------------------------------------------------------- before fine-tuning starts
XVNLI_FILES = [
    "XVNLI/annotations/en/train.jsonl",
    "XVNLI/annotations/en/dev.jsonl",
    *(f"XVNLI/annotations/{lang}/test.jsonl" for lang in ("en", "ar", "es", "fr", "ru")),
    *(f"XVNLI/annotations_machine-translate/{lang}/test.jsonl" for lang in ("ar", "es", "fr", "ru")),
]


def test_finetune_fails_at_read_time_before_any_model_is_built(tmp_path, monkeypatch, capsys):
    """The bad record sits in the last file the zero-shot protocol reads (a translate-test file): the error
    names it before a model, a tokenizer or the trainer exists."""
    iglue = tmp_path / "iglue"
    for name in XVNLI_FILES:
        write_jsonl(iglue / name, [XVNLI, {**XVNLI, "pairID": "2"}])
    bad = write_jsonl(iglue / XVNLI_FILES[-1], [XVNLI, {**XVNLI, "sentence2": None}])

    def must_not_run(*args, **kwargs):
        raise AssertionError("fine-tuning started although an annotation file is bad")

    monkeypatch.setattr(protocols, "init_distributed", lambda device: DistEnv(0, 1, 0, torch.device("cpu")))
    monkeypatch.setattr(protocols.TaskRunner, "start_model", must_not_run)
    monkeypatch.setattr(protocols, "finetune", must_not_run)
    code = cclm_main(
        [
            "finetune",
            str(REPO / "configs/finetune/xvnli.yaml"),
            f"data.root={iglue}",
            f"output_dir={tmp_path / 'out'}",
            "model=tiny",
        ]
    )
    err = capsys.readouterr().err
    assert code != 0
    assert f"{bad}:2: field 'sentence2' must be a string, got null" in err.splitlines()[-1]
    assert not (tmp_path / "out").exists()
