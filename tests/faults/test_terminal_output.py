"""Issue 15 item 14: what ``cclm index``, ``cclm search`` and ``cclm iglue`` print is safe for a terminal. A crafted
file name used to recolour the terminal and set its title; now every control character of a user-supplied
string is shown as an escape, and a file name that is not UTF-8 neither crashes the index nor the page."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from cclm.cli import main as cclm_main
from cclm.inference import search
from cclm.text_safety import printable, printable_json

TITLE_AND_COLOUR = "red\x1b]0;pwned\x07\x1b[31m.jpg"  # sets the window title, then turns the text red
CLEAR_AND_REVERSE = "notes\x1b[2J\u202e.txt"  # clears the screen, then reverses the text that follows
NOT_UTF8 = os.fsdecode(b"caf\xe9.jpg")  # how Python lists a name holding the Latin-1 byte 0xe9


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain name.jpg", "plain name.jpg"),
        ("日本語 café\u3000ü", "日本語 café\u3000ü"),  # printable text and spaces stay as they are
        (TITLE_AND_COLOUR, "red\\x1b]0;pwned\\x07\\x1b[31m.jpg"),
        (CLEAR_AND_REVERSE, "notes\\x1b[2J\\u202e.txt"),
        ("tab\there\nnew line\r", "tab\\x09here\\x0anew line\\x0d"),
        ("c1 csi \x9b and del \x7f", "c1 csi \\x9b and del \\x7f"),
        ("zero\u200bwidth, line\u2028separator", "zero\\u200bwidth, line\\u2028separator"),
        ("tag \U000e0041, private \ue000", "tag \\U000e0041, private \\ue000"),
        (NOT_UTF8, "caf\\xe9.jpg"),  # the undecodable byte, as the byte
        (Path("a\x1b/b"), "a\\x1b/b"),
    ],
)
def test_printable_escapes_every_unsafe_character(text, shown):
    assert printable(text) == shown
    assert printable(shown) == shown  # escaping is idempotent: nothing is escaped twice


def test_printable_json_stays_json_and_decodes_to_the_same_value():
    value = {"file": TITLE_AND_COLOUR, "other": [CLEAR_AND_REVERSE, NOT_UTF8, "\U000e0041", "日本語"]}
    line = printable_json(value)
    assert json.loads(line) == value
    assert line.isprintable() and "日本語" in line
    assert '"red\\u001b]0;pwned\\u0007\\u001b[31m.jpg"' in line
    assert '"notes\\u001b[2J\\u202e.txt"' in line and "\\udce9" in line and "\\udb40\\udc41" in line


def write_image(path: Path, colour) -> None:
    Image.new("RGB", (40, 40), colour).save(path, format="PNG")  # read by content, whatever the name says


@pytest.fixture
def crafted_dir(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    write_image(folder / TITLE_AND_COLOUR, (230, 20, 20))
    write_image(folder / NOT_UTF8, (20, 200, 40))
    write_image(folder / "blue.png", (20, 40, 230))
    (folder / CLEAR_AND_REVERSE).write_text("not an image\n")
    return folder


def assert_terminal_safe(text: str) -> None:
    unsafe = sorted({c for c in text if not (c.isprintable() or c in " \n")})
    assert not unsafe, f"unsafe characters reached the terminal: {unsafe}"


def test_index_and_search_escape_file_names(tiny_model_dir, crafted_dir, tmp_path, capsys):
    out = tmp_path / "index"
    command = [
        "index",
        str(crafted_dir),
        "--model",
        str(tiny_model_dir),
        "--out",
        str(out),
        "--num-workers",
        "0",
    ]
    assert cclm_main(command) == 0
    printed = capsys.readouterr()
    assert_terminal_safe(printed.out + printed.err)
    assert printed.out == f"indexed 3 new images (3 in the index) -> {out}\n"
    skipped = printed.err.splitlines()
    assert skipped[0] == "skipped 1 unreadable files:"
    assert skipped[1].startswith("  notes\\x1b[2J\\u202e.txt: cannot identify image file")

    # the index keeps the real names (index.json is valid UTF-8 and reads back the undecodable byte)
    (out / "index.json").read_bytes().decode("utf-8")
    index = search.ImageIndex.read(out)
    assert sorted(index.paths) == sorted([TITLE_AND_COLOUR, NOT_UTF8, "blue.png"])
    assert list(index.skipped) == [CLEAR_AND_REVERSE]

    page = tmp_path / "page.html"
    assert cclm_main(["search", str(out), "ein roter \x1b[5mKreis", "-k", "3", "--html", str(page)]) == 0
    printed = capsys.readouterr()
    assert_terminal_safe(printed.out + printed.err)
    lines = printed.out.splitlines()
    assert lines[0].split() == ["rank", "cosine", "path"]
    shown = sorted(line.split(maxsplit=2)[2] for line in lines[1:4])
    expected = sorted(
        f"{crafted_dir}/{name}" for name in ("red\\x1b]0;pwned\\x07\\x1b[31m.jpg", "caf\\xe9.jpg", "blue.png")
    )
    assert shown == expected
    assert lines[4] == f"wrote {page}"
    html_text = page.read_text(encoding="utf-8")
    assert "\x1b" not in html_text and "\x07" not in html_text
    assert "caf\\xe9.jpg" in html_text and "ein roter \\x1b[5mKreis" in html_text


def test_index_of_a_crafted_output_folder_name_is_escaped(tiny_model_dir, crafted_dir, tmp_path, capsys):
    out = tmp_path / "idx\x1b[8m"
    assert cclm_main(["index", str(crafted_dir), "--model", str(tiny_model_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert_terminal_safe(printed.out)
    assert printed.out == f"indexed 3 new images (3 in the index) -> {tmp_path}/idx\\x1b[8m\n"


def test_iglue_inspect_escapes_file_names_and_values(tmp_path, capsys):
    folder = tmp_path / "de"
    folder.mkdir()
    good = folder / "test\x1b]0;x\x07.jsonl"
    record = {"gold_label": "entailment", "sentence2": "ok", "Flikr30kID": "1"}
    good.write_text(json.dumps(record) + "\n", encoding="utf-8")
    bad = folder / "bad\x1b[31m.jsonl"
    bad.write_text(json.dumps({**record, "gold_label": "\x1b[2Jentails"}) + "\n", encoding="utf-8")
    assert cclm_main(["iglue", "inspect", "--task", "xvnli", str(good), str(bad)]) == 2
    printed = capsys.readouterr()
    assert_terminal_safe(printed.out + printed.err)
    assert json.loads(printed.out)["file"] == str(good)  # the JSON line still decodes to the real name
    assert printed.err == (
        f"cclm iglue inspect: {folder}/bad\\x1b[31m.jsonl:1: unknown label '\\x1b[2Jentails' "
        "(expected one of ['contradiction', 'entailment', 'neutral'])\n"
    )
