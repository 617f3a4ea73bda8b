"""Cheap language extension: add languages to an existing vision-language model without full multilingual
pretraining. ``mla`` (a frozen English CLIP learns new languages through acquirer adapters) and ``cvil`` (a
target-language student distils an English task model); both share :mod:`cclm.recipes.runner`."""
