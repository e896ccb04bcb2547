"""Tokenizers, text -> packed webdataset shards, the resumable streaming loader, synthetic sources."""
