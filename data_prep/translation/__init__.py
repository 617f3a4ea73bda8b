"""The translation step (``cclm prep translate``, docs/translation.md): language codes per model family
(:mod:`.codes`), the batched model (:mod:`.translator`), what is translated in image-caption shards
(:mod:`.caption_shards`) and text corpora (:mod:`.text_corpus`), resumable output (:mod:`.output`) and the counts
(:mod:`.tally`)."""
