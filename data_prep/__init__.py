"""Converters from common raw formats to cclm's WebDataset shards (``cclm prep ...``; see docs/data.md)."""
