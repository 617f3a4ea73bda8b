"""WIT (Wikipedia-based image text): retrieval with one caption (``caption_reference_description``) per line.

This reader gives each line its own entry; the retrieval task then groups them as ``data.duplicate_images`` says
(:mod:`cclm.tasks.iglue_retrieval`): by ``wit_ix``, as IGLUE's evaluation keys its images (the lines that show one
picture share it), or by image file (the CCLM reference). Images: ``<image_roots.wit>/<file name of image_url>`` (URL-decoded),
as they are saved when downloaded from the URL list.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from cclm.tasks.annotations import IDENTIFIER, field, language_from_path, optional_field, read_records
from cclm.tasks.images import ImageRef
from cclm.tasks.task_data import RetrievalData

KIND = "retrieval"


def image_ref(url: str) -> ImageRef:
    return ImageRef("wit", unquote(Path(urlparse(url).path).name))


def read(path: str | Path, label_names=None, max_examples: int = 0) -> RetrievalData:
    default_language = language_from_path(path)
    images, ids, texts, languages = [], [], [], set()
    for number, record in read_records(path):
        where = f"{path}:{number}"
        images.append(image_ref(field(record, "image_url", where)))
        ids.append(str(optional_field(record, "wit_ix", where, IDENTIFIER, f"{Path(path).name}:{number}")))
        texts.append(field(record, "caption_reference_description", where))
        languages.add(optional_field(record, "language", where, default=default_language))
    data = RetrievalData(str(path), images, ids, texts, list(range(len(texts))), languages)
    return data.truncated(max_examples)
