"""The `data` config section (owned by data/)."""
from __future__ import annotations

from dataclasses import dataclass

from mdtrain.configtools import ConfigError, doc


@dataclass
class DataConfig:
    train: str = doc("", "prepared dataset directory (with manifest.json), or synthetic:NAME[:k=v,...] "
                     "(markov, hmm: on-the-fly sources of known entropy)")
    valid: str = doc("", "dataset for validation; empty = the valid split of `train` (a prepared dir's valid "
                     "split, or the synthetic source's held-out samples)")
    seq_len: int = doc(128, "tokens per sample (must match the prepared shards)", ge=1)
    num_workers: int = doc(0, "DataLoader worker processes per rank; 0 = a background thread", ge=0)
    prefetch: int = doc(2, "chunks prepared ahead per worker or by the background thread (a chunk is this "
                        "rank's batches from about two shuffle windows and at least 256 of its samples, at most "
                        "~32 MB)", ge=1)
    pin_memory: bool = doc(True, "page-locked batches for asynchronous host-to-GPU copies (only with CUDA)")
    seed: int = doc(0, "seed of the train order's shuffles, together with the seed the trainer passes to the "
                    "loader (the validation order is never shuffled)", ge=0)
    shuffle_window: int = doc(8, "shards whose samples are shuffled together each epoch, after the shard order "
                              "is shuffled; each worker holds up to two windows of samples in memory", ge=1)
    verify: str = doc("size", "checks of the shards when a loader starts: none, size (cheap: catches missing and "
                      "truncated shards), sha256 (reads every shard)", choices=("none", "size", "sha256"))
    on_corrupt: str = doc("error", "a corrupt sample or shard: error (stop, naming the file) or skip (mask the "
                          "sample out, keep batch shapes, count it in the loader's skipped_samples)",
                          choices=("error", "skip"))

    def validate(self):
        if self.seq_len < 1:
            raise ConfigError(f"data.seq_len must be >= 1, got {self.seq_len}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.prefetch < 1:
            raise ConfigError(f"data.prefetch must be >= 1, got {self.prefetch}")
        if self.shuffle_window < 1:
            raise ConfigError(f"data.shuffle_window must be >= 1, got {self.shuffle_window}")
