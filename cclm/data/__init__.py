"""Data: shards, streaming pipeline, transforms, tokenisation and MLM masking."""
