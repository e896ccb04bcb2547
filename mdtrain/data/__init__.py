"""Tokenizers, text -> packed webdataset shards, the resumable streaming loader, synthetic sources.

``tokenizers``  one interface over SentencePiece / Hugging Face / bytes; ``build_tokenizer``, ``load_tokenizer``
``prepare``     ``mdtrain prepare``: text, JSONL, Parquet -> packed fixed-length samples in tar shards
``shards``      the prepared-directory format: manifest.json, shard writing, reading and verification
``loader``      ``build_loader``: per-DP-rank batches, exactly once per epoch, resumable
``synthetic``   Markov / hidden-Markov sources with exact entropy, streamed or written as shards
"""
