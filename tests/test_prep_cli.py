"""``cclm prep synthetic`` and ``cclm prep tokenizer`` end to end, and their errors."""

from __future__ import annotations

import json
import tarfile

from cclm.cli import main as cclm_main
from cclm.data.tokenize import load_tokenizer


def test_synthetic_then_tokenizer(tmp_path, capsys):
    world = tmp_path / "world"
    rc = cclm_main(
        [
            "prep",
            "synthetic",
            "--out",
            str(world),
            "--num-images",
            "40",
            "--heldout-images",
            "10",
            "--xvnli-images",
            "5",
            "--parallel-langs",
            "de,zh",
            "--num-parallel",
            "30",
            "--image-size",
            "32",
        ]
    )
    assert rc == 0 and "wrote the synthetic world" in capsys.readouterr().out
    tok_dir = tmp_path / "tok"
    rc = cclm_main(
        [
            "prep",
            "tokenizer",
            "--shards",
            str(world / "image_caption"),
            "--shards",
            str(world / "parallel"),
            "--out",
            str(tok_dir),
            "--vocab-size",
            "200",
        ]
    )
    assert rc == 0
    tok = load_tokenizer(str(tok_dir))
    assert [tok.convert_ids_to_tokens(i) for i in range(4)] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert tok.mask_token == "<mask>"
    ids = tok("ein roter Kreis links von einem blauen Quadrat")["input_ids"]
    assert tok.unk_token_id not in ids and ids[0] == 0 and ids[-1] == 2
    assert "Kreis" in tok.decode(ids, skip_special_tokens=True)  # case kept
    bpe_dir = tmp_path / "bpe"
    assert (
        cclm_main(
            [
                "prep",
                "tokenizer",
                "--text",
                str(world / "text" / "corpus.txt"),
                "--out",
                str(bpe_dir),
                "--model",
                "bpe",
                "--vocab-size",
                "300",
            ]
        )
        == 0
    )
    assert load_tokenizer(str(bpe_dir)).mask_token == "<mask>"


def test_prep_errors_are_clear(tmp_path, capsys):
    assert (
        cclm_main(["prep", "tokenizer", "--shards", str(tmp_path / "none-*.tar"), "--out", str(tmp_path)])
        == 2
    )
    assert "matches no file" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert cclm_main(["prep", "tokenizer", "--text", str(empty), "--out", str(tmp_path / "t")]) == 2
    assert "no text" in capsys.readouterr().err
    assert cclm_main(["prep", "synthetic", "--out", str(tmp_path / "w"), "--caption-langs", "xx"]) == 2
    assert "no grammar" in capsys.readouterr().err


def test_synthetic_regions_from_the_command_line(tmp_path, capsys):
    world = tmp_path / "world"
    argv = ["prep", "synthetic", "--out", str(world), "--num-images", "6", "--heldout-images", "4"]
    argv += ["--xvnli-images", "0", "--parallel-langs", "de", "--num-parallel", "6", "--image-size", "32"]
    assert cclm_main([*argv, "--regions", "--region-langs", "en,de", "--no-progress"]) == 0
    capsys.readouterr()
    with tarfile.open(next((world / "image_caption").glob("*.tar"))) as tar:
        meta = next(json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json"))
    assert meta["regions"] and set(meta["regions"][0]["captions"]) == {"en", "de"}
    assert (world / "heldout" / "de" / "grounding.jsonl").is_file()


def test_tokenizer_split_cjk_from_the_command_line(tmp_path, capsys):
    """--split-cjk: a Japanese sentence is cut into characters before training, so no piece spans a whole
    sentence (without it, a short unspaced corpus can leave whole sentences as single pieces)."""
    corpus = tmp_path / "ja.txt"
    sentences = ["青い四角の上に赤い丸", "左に緑の三角が二つ", "大きな黄色い星が右にある"] * 30
    corpus.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    for flags, name in (([], "plain"), (["--split-cjk"], "split")):
        argv = ["prep", "tokenizer", "--text", str(corpus), "--out", str(tmp_path / name), "--model", "bpe"]
        assert cclm_main([*argv, "--vocab-size", "200", *flags]) == 0
    capsys.readouterr()
    plain, split = load_tokenizer(str(tmp_path / "plain")), load_tokenizer(str(tmp_path / "split"))
    longest = max(len(p.lstrip("▁")) for p in split.tokenize(sentences[0]))
    assert longest == 1 and len(split.tokenize(sentences[0])) >= len(sentences[0])
    assert len(plain.tokenize(sentences[0])) < len(split.tokenize(sentences[0]))
