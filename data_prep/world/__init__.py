"""The embedded synthetic world: procedurally drawn scenes with captions in several languages, built to be
learnable by a tiny model in a few CPU minutes, so the whole pipeline (and zero-shot cross-lingual transfer) can be
demonstrated without downloading anything. ``cclm prep synthetic`` (:mod:`data_prep.synthetic`) is its command.

* :mod:`data_prep.world.grammar`  per-language grammars: the sentences every language can say about a scene;
* :mod:`data_prep.world.scenes`   scenes: random drawing, rendering, captions and hypotheses;
* :mod:`data_prep.world.build`    ``build_world``: shards, held-out retrieval sets, an XVNLI-style set, a corpus.
"""
