"""Every reason a ``cclm prep`` converter counts a skip under (the closing summary's ``skipped:`` line and
``manifest.json``'s ``skipped``), with what was dropped. :class:`data_prep.common.SplitWriter` refuses a name not
listed here, and ``tests/test_skip_reasons_doc.py`` checks that docs/data.md lists exactly these names."""

from __future__ import annotations

SKIP_REASONS: dict[str, str] = {
    # any input file
    "bad_utf8": "an input line (or a txt caption) that is not UTF-8",
    "bad_json": "a malformed line of a cclm-jsonl dump; JSON holding a lone UTF-16 surrogate (half a character)",
    "duplicate": "an exact duplicate sample (--dedup)",
    "corrupt_shard": "samples of an input shard lost to damage (rekey-wds, cc3m, sbu, uc2)",
    "truncated_shard": "samples an input shard's sizes.json promises but the shard lacks",
    # image-caption samples
    "missing_image": "an image file (or shard member) that is not there",
    "bad_image": "an image that does not decode",
    "no_caption": "an image left without any caption",
    "empty_caption": "a sample whose captions are all empty (blank, or only invisible characters)",
    "unknown_language": "a sample (or pair) with an unknown language code",
    "filtered_language": "a sample (or pair) in a language --languages leaves out",
    "caption_unknown_language": "a table row whose lang is unknown (the image keeps its other rows)",
    "caption_filtered_language": "a table row (or COCO caption) in a language --languages leaves out",
    "caption_empty": "a table row (or COCO caption) with an empty caption",
    "caption_unknown_image": "coco-regions --captions: a caption of an image the image list lacks",
    # uc2
    "translation_failed": "uc2: a translation row marked fail, or with an empty caption",
    "translation_bad_row": "uc2: a translation row without the image id, url and caption columns",
    "no_translation": "uc2 --drop-untranslated: an image without any translation",
    # parallel text
    "empty_text": "a pair with an empty side, blank or only invisible characters (or a line missing its second column)",
    "bad_columns": "wikimatrix: a line without score<TAB>src<TAB>tgt; parallel-tsv: a line with a third column",
    "bad_score": "wikimatrix: a score that is not a number",
    "below_min_score": "wikimatrix: a pair under --min-score",
    "over_pair_cap": "wikimatrix: a pair past its language pair's --max-pairs cap (the lowest scores go)",
    # region converters (docs/regions.md)
    "image_size_mismatch": "regions: an image whose size differs from the JSON's by more than 1 px",
    "no_region": "regions: an image left with no region",
    "region_outside_image": "regions: a box reaching past the image by more than --box-tolerance",
    "region_degenerate_box": "regions: a box without width or height",
    "region_bad_box": "regions: a box whose values are not numbers",
    "region_empty_caption": "regions: a region without a non-empty name or phrase",
    "region_filtered_language": "regions: a region in a language --languages leaves out",
    "region_unknown_image": "regions: an annotation naming an image the image list lacks",
    "region_unknown_category": "coco-regions: an unknown category_id",
    "region_crowd": "coco-regions: a crowd box (without --keep-crowd)",
}
