"""Image-caption converters under damaged or unusual input, each found by a reviewer: a truncated JPEG, quotes in
tsv/csv tables, sample names that collide once made safe, a byte-order mark, the reference's caption lists and
base64 variants, a damaged sizes.json, unnamed missing images, 16-bit greyscale, EXIF orientation and UTF-16."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cclm.cli import main as cclm_main
from cclm.data.images import load_image, open_image
from cclm.data.shards import ShardSink, expand_shards, iter_tar_samples, read_sizes
from cclm.errors import DataError

from .test_converters import assert_nothing_published


def prep(*args) -> int:
    return cclm_main(["prep", *map(str, args), "--no-progress"])


def jpeg(colour=(200, 30, 30), size=(48, 32), **save) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="JPEG", **save)
    return out.getvalue()


def samples(out: Path) -> dict[str, dict]:
    """key -> {"captions", "image": PIL image} of every sample written to ``out``."""
    found = {}
    for url in expand_shards(str(out)):
        for s in iter_tar_samples(url):
            found[s["__key__"]] = {
                "captions": json.loads(s["json"])["captions"],
                "image": Image.open(io.BytesIO(s["jpg"])),
            }
    return found


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def table_run(
    tmp_path: Path, name: str, text: str | bytes, images: dict[str, bytes], *extra
) -> tuple[int, Path]:
    root = tmp_path / "images"
    root.mkdir(exist_ok=True)
    for file, data in images.items():
        (root / file).write_bytes(data)
    table = tmp_path / name
    table.write_bytes(text if isinstance(text, bytes) else text.encode())
    out = tmp_path / "out"
    return prep("image-caption", "--input", table, "--image-root", root, "--out", out, *extra), out


# ---------------------------------------------------------------------------------------------- images
def test_a_truncated_jpeg_is_a_named_bad_image_not_a_published_sample(tmp_path, caplog):
    """``Image.verify`` reads only a JPEG's headers, so a file cut in half used to be kept byte for byte and only
    failed (or decoded grey) when training read it."""
    whole = jpeg(size=(256, 256), quality=95)
    rc, out = table_run(
        tmp_path,
        "t.tsv",
        "good.jpg\ta red square\ncut.jpg\ta red square, cut\n",
        {"good.jpg": whole, "cut.jpg": whole[: len(whole) // 2]},
    )
    assert rc == 0
    assert list(samples(out)) == ["good"]
    assert manifest(out)["skipped"] == {"bad_image": 1}
    assert any("bad_image" in r.message and "cut.jpg" in r.message for r in caplog.records)


def test_a_missing_image_is_named_in_its_warning(tmp_path, caplog):
    rc, out = table_run(tmp_path, "t.tsv", "here.jpg\tyes\ngone.jpg\tno\n", {"here.jpg": jpeg()})
    assert rc == 0 and manifest(out)["skipped"] == {"missing_image": 1}
    assert any("missing_image" in r.message and "'gone.jpg'" in r.message for r in caplog.records)


def test_sixteen_bit_greyscale_keeps_its_grey_levels(tmp_path):
    """PIL's own conversion clips 16-bit values at 255: a mid-grey 16-bit PNG came out white."""
    grey = np.full((40, 40), 32768, dtype=np.uint16)  # 50 % grey
    png = io.BytesIO()
    Image.fromarray(grey).save(png, format="PNG")
    assert Image.open(io.BytesIO(png.getvalue())).mode == "I;16"
    rc, out = table_run(tmp_path, "t.tsv", "g.png\ta grey square\n", {"g.png": png.getvalue()})
    assert rc == 0
    stored = np.asarray(samples(out)["g"]["image"].convert("L"), dtype=float)
    assert abs(stored.mean() - 127.5) < 2
    loaded = load_image(tmp_path / "images" / "g.png", 16).float()  # the evaluation loader
    assert abs(loaded.mean().item() - 127.5) < 2
    assert abs(np.asarray(open_image(tmp_path / "images" / "g.png"), dtype=float).mean() - 127.5) < 2


def test_a_photo_stored_sideways_is_turned_upright_by_its_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display": a portrait photo stored landscape
    sideways = jpeg(size=(60, 20), exif=exif.tobytes())
    rc, out = table_run(
        tmp_path, "t.tsv", "p.jpg\ta portrait\nq.jpg\tno tag\n", {"p.jpg": sideways, "q.jpg": jpeg()}
    )
    assert rc == 0
    written = samples(out)
    assert written["p"]["image"].size == (20, 60)
    assert (tmp_path / "images" / "q.jpg").read_bytes() == _raw_member(
        out, "q"
    )  # untagged: kept byte for byte


# EXIF blocks a fuzzer damaged: orientation 6 survives, other tags are broken (ImageOps.exif_transpose, which
# writes the block back, raised struct.error or TypeError on them and stopped the whole conversion)
DAMAGED_EXIF = [
    "4578696600004d4d002a00000008000301430002000000040a616d0001120003000000010006000087690004000000010000003200"
    "000000000127030002000000140000004400000000323032303a30313a30312030303a30303a301700",
    "4578696600004d4d002a000000080003011b000200000004438b6d00011200030000000100060000876900040000000100000032"
    "000000a4000190030002000000140000d04400000000323032303a30318a300b2030303a30303a303000",
]


def test_a_damaged_exif_block_neither_stops_the_run_nor_drops_a_good_image(tmp_path, caplog):
    webp = io.BytesIO()
    Image.new("RGB", (30, 20), (10, 200, 10)).save(webp, "WEBP", exif=b"Exif\0\0garbage")  # getexif fails
    images = {f"e{i}.jpg": jpeg(size=(60, 20), exif=bytes.fromhex(h)) for i, h in enumerate(DAMAGED_EXIF)}
    images["w.webp"] = webp.getvalue()
    text = "".join(f"{name}\tcaption\n" for name in images)
    rc, out = table_run(tmp_path, "t.tsv", text, images)
    assert rc == 0 and manifest(out)["skipped"] == {}
    written = samples(out)
    assert (
        written["e0"]["image"].size == written["e1"]["image"].size == (20, 60)
    )  # orientation 6 still applied
    assert written["w"]["image"].size == (30, 20)


def test_region_converters_keep_the_stored_orientation_their_boxes_refer_to(tmp_path):
    """COCO's and Visual Genome's boxes are drawn on the stored pixels (their tools ignore EXIF): turning a tagged
    image would move every box off its object."""
    from tests.test_region_converters import coco_files, red_extent
    from tests.test_region_converters import samples as region_samples

    instances, _, root = coco_files(tmp_path)
    tagged = root / "000000000001.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = Image.open(tagged)
    stored.load()
    stored.save(tagged, format="JPEG", quality=95, exif=exif.tobytes())
    out = tmp_path / "regions"
    assert prep("coco-regions", "--instances", instances, "--image-root", root, "--out", out) == 0
    sample = region_samples(out)["coco_1"]
    assert sample["meta"]["image_size"] == [100, 80]
    np.testing.assert_allclose(red_extent(sample["jpg"]), sample["meta"]["regions"][0]["box"], atol=1)


def _raw_member(out: Path, key: str) -> bytes:
    for url in expand_shards(str(out)):
        for s in iter_tar_samples(url):
            if s["__key__"] == key:
                return s["jpg"]
    raise KeyError(key)


# ---------------------------------------------------------------------------------------------- tables
def test_quotes_in_a_tsv_are_caption_text(tmp_path):
    """tsv has no quoting (img2dataset's and CC3M's files hold quotes as they are); csv quoting let the first
    unbalanced quote swallow every row after it into one caption."""
    rows = ['a.jpg\t"Hello," she said', "b.jpg\tanother image", 'c.jpg\ta 5" floppy disk', "d.jpg\tthe last"]
    rc, out = table_run(tmp_path, "t.tsv", "\n".join(rows) + "\n", {f"{k}.jpg": jpeg() for k in "abcd"})
    assert rc == 0
    written = samples(out)
    assert {k: v["captions"]["en"] for k, v in written.items()} == {
        "a": ['"Hello," she said'],
        "b": ["another image"],
        "c": ['a 5" floppy disk'],
        "d": ["the last"],
    }


@pytest.mark.parametrize(
    "line, why",
    [
        ('b.jpg,"quoted" and then more', "',' expected after '\"'"),
        ("b.jpg,carriage\rreturn", "new-line character seen in unquoted field"),
        ("b.jpg," + "x" * 140_000, "field larger than field limit"),
    ],
    ids=["stray-quote", "lone-carriage-return", "field-limit"],
)
def test_a_csv_line_csv_cannot_read_stops_the_run_naming_it(tmp_path, capsys, tiny_tokenizer, line, why):
    text = "image,caption\na.jpg,fine\n" + line + "\nc.jpg,fine\n"
    rc, out = table_run(tmp_path, "t.csv", text, {f"{k}.jpg": jpeg() for k in "abc"})
    err = capsys.readouterr().err
    assert rc == 2
    assert "t.csv:3: not a valid csv line (" in err and why in err and "Traceback" not in err
    assert_nothing_published(out, tiny_tokenizer)


def test_a_csv_row_over_several_lines_is_read_and_warned_about(tmp_path, caplog):
    text = 'image,caption\na.jpg,"two\nlines"\nb.jpg,one\n'
    rc, out = table_run(tmp_path, "t.csv", text, {"a.jpg": jpeg(), "b.jpg": jpeg()})
    assert rc == 0 and sorted(samples(out)) == ["a", "b"]
    assert any("t.csv:3: one csv row over 2 lines" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("name, sep", [("t.tsv", "\t"), ("t.csv", ",")])
def test_a_byte_order_mark_does_not_hide_the_header(tmp_path, name, sep):
    """Spreadsheets export UTF-8 with a BOM: the first column's name read as "\\ufeffimage", so the header was
    taken for a data row (an image named "image") and the lang column was ignored."""
    text = "\ufeff" + "\n".join(
        sep.join(r) for r in [("image", "caption", "lang"), ("a.jpg", "ein Hund", "de")]
    )
    rc, out = table_run(tmp_path, name, text + "\n", {"a.jpg": jpeg()})
    assert rc == 0
    assert samples(out)["a"]["captions"] == {"de": ["ein Hund"]}
    assert manifest(out)["skipped"] == {}


def test_a_utf16_table_is_refused_not_converted_to_garbage(tmp_path, capsys, tiny_tokenizer):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_bytes("hello\thallo\nworld\twelt\n".encode("utf-16"))
    out = tmp_path / "out"
    rc = prep("parallel-tsv", "--input", pairs, "--src-lang", "en", "--tgt-lang", "de", "--out", out)
    err = capsys.readouterr().err
    assert rc == 2 and "pairs.tsv: the file is UTF-16 or UTF-32, not UTF-8" in err
    assert_nothing_published(out, tiny_tokenizer)
    pairs.write_bytes("hello\thallo\n".encode("utf-16-le"))  # no byte-order mark: NUL bytes give it away
    assert prep("parallel-tsv", "--input", pairs, "--src-lang", "en", "--tgt-lang", "de", "--out", out) == 2
    (tmp_path / "c.en").write_text("hello\n")
    (tmp_path / "c.de").write_bytes("hallo\n".encode("utf-16"))
    args = ("--src", tmp_path / "c.en", "--tgt", tmp_path / "c.de", "--out", out)
    assert prep("parallel-moses", *args) == 2
    assert "c.de: the file is UTF-16 or UTF-32" in capsys.readouterr().err
    assert_nothing_published(out, tiny_tokenizer)


# ------------------------------------------------------------------------------------------------- keys
def test_names_that_collide_once_made_safe_keep_every_sample(tmp_path):
    """``Ä.jpg`` and ``Ö.jpg`` both became key ``_``, ``x.jpg`` and ``x.png`` both ``x``: the sink refused the
    second and the whole conversion stopped."""
    names = ["Ä.jpg", "Ö.jpg", "x.jpg", "x.png", "sub/y.jpg", "sub_y.jpg"]
    (tmp_path / "images" / "sub").mkdir(parents=True)
    text = "image\tcaption\n" + "".join(f"{n}\tcaption of {n}\n" for n in names)
    rc, out = table_run(tmp_path, "t.tsv", text, {n: jpeg() for n in names})
    assert rc == 0
    written = samples(out)
    assert sorted(c for v in written.values() for c in v["captions"]["en"]) == sorted(
        f"caption of {n}" for n in names
    )
    assert "x" in written and "sub_y" in written  # the first of a pair keeps its readable key


def test_rekey_of_two_folders_with_the_same_shard_names_keeps_every_sample(tmp_path):
    for folder in ("cc3m", "sbu"):
        with ShardSink(tmp_path / folder, "image_caption") as sink:
            for i in range(3):
                sink.write(f"{i:09d}", {"jpg": jpeg(), "txt": f"{folder} {i}".encode()})
            sink.close()
    out = tmp_path / "out"
    assert prep("rekey-wds", "--shards", f"{tmp_path / 'cc3m'}::{tmp_path / 'sbu'}", "--out", out) == 0
    written = samples(out)
    assert len(written) == 6
    assert sorted(v["captions"]["en"][0] for v in written.values()) == [
        f"{f} {i}" for f in ("cc3m", "sbu") for i in range(3)
    ]


# ------------------------------------------------------------------------------------------- cclm-jsonl
def test_cclm_jsonl_reads_the_references_caption_lists_and_base64_variants(tmp_path):
    image = jpeg()
    plain = base64.b64encode(image).decode()
    records = [
        {"binary": plain, "caption": [{"en": "a red box"}, {"de": "eine rote Kiste"}]},
        {"binary": base64.encodebytes(image).decode(), "caption": "wrapped every 76 characters"},
        {"binary": base64.urlsafe_b64encode(image).decode().rstrip("="), "caption": "url-safe, unpadded"},
        {"binary": "not base64 at all!", "caption": "dropped"},
    ]
    dump = tmp_path / "dump.jsonl"
    dump.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    assert prep("cclm-jsonl", "--input", dump, "--out", out) == 0
    written = sorted(samples(out).values(), key=lambda v: json.dumps(v["captions"]))
    assert [v["captions"] for v in written] == [
        {"en": ["a red box"], "de": ["eine rote Kiste"]},
        {"en": ["url-safe, unpadded"]},
        {"en": ["wrapped every 76 characters"]},
    ]
    assert manifest(out)["skipped"] == {"bad_image": 1}


# ---------------------------------------------------------------------------------------------- sizes.json
def test_a_damaged_sizes_json_names_itself(tmp_path):
    with ShardSink(tmp_path / "s", "image_caption") as sink:
        sink.write("a", {"jpg": jpeg(), "json": b'{"captions": {"en": ["x"]}}'})
        sink.close()
    sizes = tmp_path / "s" / "sizes.json"
    sizes.write_text('{"shard-000000.tar": 1')  # cut short by a full disk
    with pytest.raises(DataError, match=r"sizes\.json: damaged"):
        read_sizes(expand_shards(str(tmp_path / "s")))
    sizes.write_text('{"shard-000000.tar": "many"}')
    with pytest.raises(DataError, match=r"sizes\.json: expected \{shard name: sample count\}"):
        read_sizes(expand_shards(str(tmp_path / "s")))
