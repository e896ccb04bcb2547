"""The `data` config section (owned by data/)."""
from __future__ import annotations

from dataclasses import dataclass

from mdtrain.configtools import doc


@dataclass
class DataConfig:
    train: str = doc("", "directory of prepared train shards (with manifest.json), or synthetic:NAME")
    valid: str = doc("", "directory of prepared validation shards; empty = the train dir's valid split")
    seq_len: int = doc(128, "tokens per sample (must match the prepared shards)")
    num_workers: int = doc(0, "DataLoader worker processes per rank")
    seed: int = doc(0, "shuffling seed")
