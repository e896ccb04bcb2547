"""Templates copied verbatim into ``mdtrain export --format hf`` directories: a configuration and the networks,
self-contained (torch + transformers), loaded by ``transformers`` with ``trust_remote_code=True``. Nothing in
mdtrain imports them."""
