"""What the retrieval-set recipes (``multi30k``, ``coco``, ``xtd10``, ``xm3600``) share: they check a download
against its publisher's layout, count images and captions per language and split, list every missing image file
at once, and publish ready-to-run retrieval configs (the ``configs/eval`` format, :class:`RetrievalRunConfig`) --
one per split, with absolute paths -- plus any annotation files they had to write (decompressed or converted).

Publishing is all or nothing: files are written under ``*.partial`` names and renamed into place only when
everything checked out, the configs last, so a config never names a file that is not there."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cclm.config import RetrievalRunConfig, from_dict
from cclm.data.images import MissingImageError
from cclm.errors import DataError, UserError
from cclm.evaluation.datasets import read_text_lines


class MissingImageFiles(UserError, MissingImageError):
    """Image files a retrieval set names that are not there (all of them are listed before this is raised)."""


@dataclass
class SplitSet:
    """One split of a benchmark: its data config and what it holds."""

    split: str
    data: dict  # RetrievalDataConfig fields, paths absolute
    images: list[Path]  # every image file the split names
    captions: dict[str, int] = field(default_factory=dict)  # language -> captions
    captioned: dict[str, int] = field(default_factory=dict)  # language -> images with at least one caption
    k_test: int = 128

    def count(self, lang: str, captions_per_image: list[int]) -> None:
        """Record one language: how many captions each image of the split has in it."""
        self.captions[lang] = sum(captions_per_image)
        self.captioned[lang] = sum(1 for n in captions_per_image if n)


def layout_error(where: Path | str, expected: str) -> DataError:
    return DataError(f"{where}: not the publisher's layout; expected {expected}")


def read_lines(path: Path) -> list[str]:
    """Lines as the evaluation's ``lines`` reader sees them, trailing blank lines dropped."""
    lines = read_text_lines(path)
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def add_options(
    parser: argparse.ArgumentParser, dataset_help: str, images_help: str, many: bool = False
) -> None:
    parser.add_argument("--dataset", required=True, nargs="+" if many else None, help=dataset_help)
    parser.add_argument("--images", required=True, help=images_help)
    parser.add_argument(
        "--out", required=True, help="folder for the configs (and any annotation files written)"
    )


def config_text(benchmark: str, split: SplitSet, comment: str) -> str:
    """The YAML of one split's retrieval config; checked against :class:`RetrievalRunConfig` first."""
    run = {
        "name": f"{benchmark}_{split.split}",
        "checkpoint": "???",
        "data": split.data,
        "eval": {"k_test": split.k_test},
        "output_dir": "results/retrieval",
    }
    from_dict(RetrievalRunConfig, run)
    header = "".join(f"# {line}\n" for line in comment.splitlines())
    return header + yaml.safe_dump(run, sort_keys=False, allow_unicode=True, width=120)


def counts_table(benchmark: str, splits: list[SplitSet]) -> str:
    rows = [f"{benchmark}: images and captions per split and language"]
    for split in splits:
        per_lang = ", ".join(
            f"{lang} {split.captioned[lang]}/{split.captions[lang]}" for lang in sorted(split.captions)
        )
        rows.append(
            f"  {split.split}: {len(set(split.images))} images; captioned images/captions: {per_lang}"
        )
    return "\n".join(rows)


def check_images(splits: list[SplitSet], image_root: Path) -> None:
    """Every image file of every split, or every missing one printed (one a line) and an error."""
    named = {path for split in splits for path in split.images}
    missing = sorted(path for path in named if not path.is_file())
    if missing:
        for path in missing:
            print(path, file=sys.stderr)
        raise MissingImageFiles(
            f"{len(missing)} of {len(named)} image files are missing (listed above, one a line); "
            f"--images {image_root} should hold them"
        )


def write_atomically(files: dict[Path, bytes]) -> None:
    """Write every file under a ``.partial`` name, then rename them all into place (in the given order)."""
    written: list[tuple[Path, Path]] = []
    try:
        for path, data in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(path.name + ".partial")
            partial.write_bytes(data)
            written.append((partial, path))
    except BaseException:
        for partial, _ in written:
            partial.unlink(missing_ok=True)
        raise
    for partial, path in written:
        os.replace(partial, path)


def publish(
    benchmark: str,
    splits: list[SplitSet],
    out: Path,
    image_root: Path,
    annotations: dict[Path, bytes],
    comment: str,
) -> int:
    """Print the counts, check the images, write the annotation files and then one config per split."""
    if not splits:
        raise DataError(f"no {benchmark} split found")
    print(counts_table(benchmark, splits))
    check_images(splits, image_root)
    configs = {
        out / f"{benchmark}_{s.split}.yaml": config_text(benchmark, s, comment).encode() for s in splits
    }
    write_atomically({**annotations, **configs})
    for path in configs:
        print(f"wrote {path}")
    test = next((p for p in configs if p.stem.endswith("_test")), next(iter(configs)))
    print(f"evaluate with: cclm evaluate retrieval {test} checkpoint=MODEL_DIR")
    return 0


def finetune_json(train: bool, images: list[str], captions: list[list[str]], image_ids: list[str]) -> bytes:
    """One split and language in the CCLM reference's retrieval fine-tuning layout (read by
    :mod:`cclm.tasks.retrieval_json`): training items are (caption, image) pairs, valid and test items are images
    with their caption lists (an image without captions is left out of those)."""
    rows = zip(images, captions, image_ids)
    if train:
        items = [
            {"caption": text, "image": image, "image_id": iid} for image, texts, iid in rows for text in texts
        ]
    else:
        items = [{"image": image, "caption": texts, "image_id": iid} for image, texts, iid in rows if texts]
    return json.dumps(items, ensure_ascii=False, indent=1).encode("utf-8")


def existing_folder(path: str, what: str) -> Path:
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} {path} is not a folder")
    return folder
