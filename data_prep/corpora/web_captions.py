"""Web image-caption corpora downloaded with img2dataset, re-keyed into cclm shards (``rekey-wds`` underneath):

* ``cc3m``: Conceptual Captions 3M, ``img2dataset --url_list Train_GCC-training.tsv --input_format tsv
  --url_col url --caption_col caption --output_format webdataset`` (after adding the ``caption<TAB>url`` header
  the Google file lacks);
* ``sbu``: SBU Captions, ``img2dataset --url_list sbu-captions-all.json --input_format json --url_col image_urls
  --caption_col captions --output_format webdataset``;
* ``uc2``: the CC3M shards above, each image joined by its URL to UC2's machine translations of its caption
  (``{split}_imageId2Ann_{lang}.tsv``: ``image_id<TAB>url<TAB>caption<TAB>status``, as UC2's
  ``utils/ms_internal_mt.py`` writes them), giving ``{"en": ..., "de": ..., "fr": ..., ...}`` samples.

img2dataset's output folder holds ``00000.tar, 00001.tar, ...`` (``{key}.jpg``, ``{key}.txt`` = the caption,
``{key}.json`` with ``url``, ``caption``, ``status``, ...) and ``00000_stats.json, ...``; the stats say how many
URLs could not be downloaded, which the closing summary reports beside the skips.
"""

from __future__ import annotations

import json
import re
import sqlite3
import tempfile
from collections import Counter
from pathlib import Path

from cclm.data.languages import normalize_language
from cclm.data.shards import iter_tar_samples
from cclm.data.skips import SkipSample
from cclm.errors import DataError
from data_prep.common import SplitWriter, add_output_options, csv_rows
from data_prep.corpora.files import decoded_lines
from data_prep.image_caption import run_rekey

UC2_FILE = re.compile(r"^(?P<split>[A-Za-z0-9]+)_imageId2Ann_(?P<lang>[A-Za-z-]+)\.tsv(\.gz)?$")
UC2_LAYOUT = "{split}_imageId2Ann_{lang}.tsv files (image_id<TAB>url<TAB>caption<TAB>status)"


# ----------------------------------------------------------------------------------------------- img2dataset
def img2dataset_folder(folder: str | Path, need_url: bool = False) -> Path:
    """The folder of an img2dataset ``--output_format webdataset`` download, or an error saying what was
    expected. With ``need_url`` its samples must carry the ``url`` of their image (in ``{key}.json``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--img2dataset {folder} is not a folder")
    tars = sorted(folder.glob("*.tar"))
    if not tars:
        other = sorted({p.suffix for p in folder.iterdir() if p.suffix in (".parquet", ".tfrecord")})
        hint = (
            f" (it holds {', '.join(other)} files: img2dataset ran with another --output_format)"
            if other
            else ""
        )
        raise DataError(
            f"{folder} has no .tar shards{hint}; expected img2dataset --output_format webdataset output: "
            "00000.tar, 00001.tar, ... with {key}.jpg, {key}.txt and {key}.json members"
        )
    if need_url:
        first = next((s for s in iter_tar_samples(str(tars[0])) if "json" in s), None)
        meta = _json(first["json"]) if first else {}
        if "url" not in meta:
            raise DataError(
                f"{tars[0]}: its samples have no {{key}}.json with the image's url; expected img2dataset output "
                "(the url is what joins an image to its UC2 translations)"
            )
    return folder


def _json(raw: bytes) -> dict:
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def download_stats(folder: Path) -> str:
    """One line from img2dataset's ``*_stats.json`` files: URLs tried, downloaded, failed; "" without them."""
    totals: Counter[str] = Counter()
    for path in sorted(folder.glob("*_stats.json")):
        stats = _json(path.read_bytes())
        for key in ("count", "successes", "failed_to_download", "failed_to_resize"):
            if isinstance(stats.get(key), int):
                totals[key] += stats[key]
    if not totals:
        return ""
    return (
        f"img2dataset: {totals['successes']} of {totals['count']} urls downloaded "
        f"({totals['failed_to_download']} failed to download, {totals['failed_to_resize']} to resize)"
    )


def run_web_corpus(args) -> int:
    folder = img2dataset_folder(args.img2dataset)
    args.shards, args.lang = str(folder), "en"
    stats = download_stats(folder)
    if stats:
        print(stats)
    return run_rekey(args)


# ------------------------------------------------------------------------------------------------------- UC2
def uc2_files(folder: str | Path, split: str) -> dict[str, Path]:
    """language -> UC2 translation file of ``split`` in ``folder``, or an error naming the layout expected."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--translations {folder} is not a folder")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        match = UC2_FILE.match(path.name)
        if not match or match["split"] != split:
            continue
        lang = normalize_language(match["lang"])
        if lang is None:
            raise DataError(f"{path}: unknown language code {match['lang']!r} in the file name")
        if lang != "en":  # UC2's English file is the source; the shard's caption is the English one
            files[lang] = path
    if not files:
        raise DataError(f"{folder} has no UC2 translations of split {split!r}: expected {UC2_LAYOUT}")
    return files


class TranslationTable:
    """UC2's translations by image URL, in an SQLite file in a temporary folder: CC3M's 3.3M images x 5
    languages would take several GB as a Python dict."""

    def __init__(self, folder: str):
        self.path = Path(folder) / "uc2.sqlite"
        # read by the converter's reading thread (image_caption._write_all), one thread at a time
        self.db = sqlite3.connect(self.path, check_same_thread=False)
        self.db.execute(
            "CREATE TABLE t (url TEXT, lang TEXT, caption TEXT, PRIMARY KEY (url, lang)) WITHOUT ROWID"
        )
        self.loaded: Counter[str] = Counter()

    def load(self, lang: str, path: Path, writer: SplitWriter) -> None:
        rows = []
        # UC2 wrote them with csv.writer: quoted fields allowed, line breaks in them kept
        lines = ((number, text + "\n") for number, text in decoded_lines(path, writer))
        for _, row in csv_rows(lines, path, delimiter="\t"):
            if not row:
                continue
            if len(row) < 3 or not row[1].strip():
                writer.skip("translation_bad_row")
            elif not row[2].strip() or (len(row) > 3 and row[3].strip().lower() == "fail"):
                writer.skip("translation_failed")
            else:
                rows.append((row[1].strip(), lang, row[2].strip()))
            if len(rows) >= 10000:
                self._insert(rows)
        self._insert(rows)

    def _insert(self, rows: list[tuple[str, str, str]]) -> None:
        self.db.executemany("INSERT OR REPLACE INTO t VALUES (?, ?, ?)", rows)
        self.loaded.update(lang for _, lang, _ in rows)
        rows.clear()

    def captions(self, url) -> dict[str, list[str]]:
        if not isinstance(url, str):
            return {}
        return {
            lang: [caption]
            for lang, caption in self.db.execute("SELECT lang, caption FROM t WHERE url = ?", (url,))
        }

    def close(self) -> None:
        self.db.close()


def run_uc2(args) -> int:
    folder = img2dataset_folder(args.img2dataset, need_url=True)
    files = uc2_files(args.translations, args.split)
    args.shards, args.lang = str(folder), "en"
    with tempfile.TemporaryDirectory(prefix="cclm-uc2-", dir=args.tmp_dir or None) as tmp:
        table = TranslationTable(tmp)
        try:
            return _convert_uc2(args, table, files)
        finally:
            table.close()


def _convert_uc2(args, table: TranslationTable, files: dict[str, Path]) -> int:
    def load(writer: SplitWriter) -> None:
        for lang, path in files.items():
            if writer.allowed_language(lang):  # a language --languages leaves out is not even loaded
                table.load(lang, path, writer)
        print(f"uc2 translations loaded: {dict(sorted(table.loaded.items()))}")

    def join(meta: dict) -> dict[str, list[str]]:
        found = table.captions(meta.get("url"))
        if not found and args.drop_untranslated:
            raise SkipSample("no_translation")
        return found

    stats = download_stats(Path(args.img2dataset))
    if stats:
        print(stats)
    return run_rekey(args, join=join, before=load)


# ------------------------------------------------------------------------------------------------- parsers
def add_parser(subparsers) -> None:
    for name, source in (
        ("cc3m", "Conceptual Captions 3M (Train_GCC-training.tsv)"),
        ("sbu", "SBU Captions (sbu-captions-all.json)"),
    ):
        p = subparsers.add_parser(name, help=f"image-caption shards from an img2dataset download of {source}")
        p.add_argument(
            "--img2dataset", required=True, help="img2dataset --output_format webdataset output folder"
        )
        add_output_options(p, images=True)
        p.set_defaults(run=run_web_corpus)

    p = subparsers.add_parser(
        "uc2", help="CC3M shards with UC2's machine-translated captions joined by image URL"
    )
    p.add_argument(
        "--img2dataset", required=True, help="img2dataset output folder of CC3M (its json has url)"
    )
    p.add_argument("--translations", required=True, help=f"folder of UC2's {UC2_LAYOUT}")
    p.add_argument("--split", default="train", help="which UC2 split's files to read (default train)")
    p.add_argument(
        "--drop-untranslated",
        action="store_true",
        help="skip images without any translation (no_translation)",
    )
    p.add_argument("--tmp-dir", default="", help="folder for the temporary URL index (default: the system's)")
    add_output_options(p, images=True)
    p.set_defaults(run=run_uc2)
