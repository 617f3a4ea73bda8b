"""``cclm prep <corpus>``: the public corpora, from the files exactly as their publishers release them.

* :mod:`.web_captions` -- ``cc3m``, ``sbu`` (img2dataset output) and ``uc2`` (UC2's machine-translated CC3M
  captions joined to those images): image-caption shards.
* :mod:`.parallel_corpora` -- ``wikimatrix`` (scored TSV) and ``opus`` (OPUS / Europarl Moses files):
  parallel-text shards.
* :mod:`.multi30k`, :mod:`.coco`, :mod:`.test_sets` (``xtd10``, ``xm3600``) -- retrieval sets: check a download
  and write ready-to-run retrieval configs, one per split (:mod:`.retrieval_sets`).

Docs: docs/data.md, "Corpus recipes"."""
