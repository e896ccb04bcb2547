"""The resumable streaming loader: prepared shards (or a synthetic source) -> per-rank micro-batches.

How the order is defined (a pure function of the dataset, the seeds and one integer, so resume is O(1)):

* Epoch ``e`` of a split is an order of its N samples: the shards are permuted (seeded by ``e``), grouped
  into windows of ``shuffle_window`` consecutive shards, and the samples of each window are permuted. The
  validation split is never shuffled.
* The train stream is epoch 0, epoch 1, ... back to back. Global step ``s`` takes the next ``dp_size × B``
  positions of the stream; DP rank ``r`` gets the ``r``-th block of ``B``. So every sample is used exactly
  once per epoch, every rank has a batch at every step (no hang at an epoch's end, whatever the shard sizes),
  and tensor-parallel ranks of one DP rank (same ``dp_rank``) get the same batch.
* Batches are made in chunks of consecutive steps (about two shuffle windows of the stream, and at least
  MIN_CHUNK_SAMPLES of this rank's samples, so per-chunk costs stay small at any dp_size). DataLoader
  worker ``w`` of ``W`` makes chunks ``w, w+W, ...``; the DataLoader returns them round-robin, so the batch
  sequence does not depend on ``W``, and each window is read by about one worker of a rank.
* The state is the stream position of the next step, the same on every rank. A resume continues from it,
  also with another dp_size or micro-batch size: what was consumed is always a prefix of the stream.
* A finite loader (evaluation) makes one pass; its last step is completed with padding rows whose
  ``attention_mask`` is all zero, so every rank has the same number of batches and every sample counts once.

Each rank reads only its own samples: the order gives every position's (shard, sample number), the shards' index
gives its bytes, and a chunk's samples are read shard by shard in file order with nearby reads merged
(``mdtrain.data.shard_index``). A rank's reading and parsing work is proportional to its own samples, whatever
dp_size is; only the shuffle permutation of each window it touches is computed whole (O(window) per window, the
same on every rank). Measured in bench/loader_scale.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import sys
import threading
from collections import OrderedDict
from typing import Iterator, Optional

import numpy as np
import torch

from mdtrain.data.config import DataConfig
from mdtrain.data.errors import DataError
from mdtrain.data.shard_index import SampleReader
from mdtrain.data.shards import check_token_ids, read_manifest, verify_shards
from mdtrain.data.tokenizers import Tokenizer, load_tokenizer

STATE_VERSION = 1
MIN_CHUNK_SAMPLES = 256


class ShardSource:
    """Samples of one split of a prepared directory, addressed by stream position (see the module doc)."""

    def __init__(self, root: str, manifest: dict, split: str, shuffle: bool, window: int, key: tuple,
                 on_corrupt: str = "error", vocab_size: Optional[int] = None):
        self.root, self.split, self.on_corrupt, self.vocab_size = root, split, on_corrupt, vocab_size
        info = manifest["splits"][split]
        self.counts = np.array([sh["samples"] for sh in info["shards"]], dtype=np.int64)
        self.num_samples = int(self.counts.sum())
        self.seq_len = int(manifest["seq_len"])
        self.shuffle, self.window = shuffle, (window if shuffle else 1)
        self.key = tuple(int(k) % (1 << 63) for k in key)  # numpy seeds must be >= 0
        per_window = self.num_samples / max(1, -(-len(self.counts) // self.window))
        self.chunk_positions = int(2 * per_window)  # stream positions a loader chunk should span
        from mdtrain.data.images import read_split_labels
        self.labels = read_split_labels(root, manifest, split)  # image classes (prepare --images), or None
        self.image = manifest.get("image")  # {shape, num_classes, class_names, source} of image datasets
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])  # first sample of each shard in the split
        self.fingerprint = hashlib.sha256(json.dumps(
            [self.seq_len, [sh["sha256"] for sh in info["shards"]]]).encode()).hexdigest()[:16]
        self.entropy = manifest.get("entropy_per_token")  # shards written from a synthetic source
        self.reader = SampleReader(root, info["shards"], self.seq_len, np.dtype(manifest["dtype"]), on_corrupt,
                                   split=split)
        self._epochs: OrderedDict = OrderedDict()
        self._windows: OrderedDict = OrderedDict()

    def _epoch(self, e: int):
        """(windows: list of shard-index arrays, starts: first position of each window, plus N)."""
        if e not in self._epochs:
            n = len(self.counts)
            order = np.random.default_rng(self.key + (e,)).permutation(n) if self.shuffle else np.arange(n)
            cuts = np.arange(0, n, self.window)
            windows = [order[i:i + self.window] for i in cuts.tolist()]
            starts = np.concatenate([[0], np.cumsum(np.add.reduceat(self.counts[order], cuts))])
            self._epochs[e] = (windows, starts)
            while len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        return self._epochs[e]

    def _window(self, e: int, w: int):
        """(shards, first, perm) of window ``w`` of epoch ``e``: its samples are its shards' samples back to back
        (shard ``shards[k]`` holds window samples ``first[k]..first[k+1]-1``), and position i of the window's order
        is window sample ``perm[i]`` (a permutation seeded by epoch and window)."""
        if (e, w) not in self._windows:
            shards = self._epoch(e)[0][w]
            first = np.concatenate([[0], np.cumsum(self.counts[shards])])
            perm = (np.random.default_rng(self.key + (e, 1 << 20, w)).permutation(int(first[-1])) if self.shuffle
                    else None)
            self._windows[(e, w)] = (shards, first, perm)
            while len(self._windows) > 4:  # a chunk spans about two windows
                self._windows.popitem(last=False)
        return self._windows[(e, w)]

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, sample number in the shard) of each stream position."""
        shard = np.empty(len(positions), dtype=np.int64)
        sample = np.empty(len(positions), dtype=np.int64)
        epochs, local = np.divmod(positions, self.num_samples)
        for e in np.unique(epochs):
            sel = np.nonzero(epochs == e)[0]
            starts = self._epoch(int(e))[1]
            win = np.searchsorted(starts, local[sel], side="right") - 1
            for w in np.unique(win):
                at = sel[win == w]
                shards, first, perm = self._window(int(e), int(w))
                r = local[at] - starts[w]
                if perm is not None:
                    r = perm[r]
                k = np.searchsorted(first, r, side="right") - 1
                shard[at], sample[at] = shards[k], r - first[k]
        return shard, sample

    def rows(self, positions: np.ndarray):
        """Samples at stream ``positions`` -> (ids[n, L] int64, ok[n] bool)."""
        shard, sample = self.locate(positions)
        ids, ok = self.reader.read(shard, sample)
        if self.vocab_size is not None:  # ids are range-checked as they are decoded (shards.check_token_ids)
            check_token_ids(ids, ok, self.vocab_size, self.on_corrupt,
                            lambda i: f"{self.reader.paths[shard[i]]}: sample {int(sample[i])}")
        return ids, ok

    def labels_at(self, positions: np.ndarray) -> np.ndarray:
        """Class labels (int64) of the samples at stream ``positions`` (the same mapping as :meth:`rows`)."""
        shard, sample = self.locate(positions)
        return self.labels[self.offsets[shard] + sample]


class _ChunkStream(torch.utils.data.IterableDataset):
    """This rank's batches, made ``steps_per_chunk`` steps at a time: DataLoader worker ``w`` of ``W`` makes
    chunks ``w, w+W, ...`` (see the module doc). A chunk spans about two shuffle windows of the stream, so
    each window is read by about one worker, and crosses the process boundary as one pair of tensors."""

    def __init__(self, source, batch_size: int, dp_rank: int, dp_size: int, start: int, stop: Optional[int],
                 pad_id: int, steps_per_chunk: int):
        self.source, self.B, self.rank, self.dp = source, batch_size, dp_rank, dp_size
        self.start, self.stop, self.pad_id, self.K = start, stop, pad_id, steps_per_chunk

    def num_steps(self) -> Optional[int]:
        if self.stop is None:
            return None
        return -(-(self.stop - self.start) // (self.B * self.dp))

    def chunk(self, c: int) -> dict:
        """Steps ``[cK, cK+K)``: input_ids / attention_mask [steps*B, L] int64 and skipped[steps]."""
        total = self.num_steps()
        steps = np.arange(c * self.K, (c + 1) * self.K if total is None else min((c + 1) * self.K, total))
        pos = (self.start + steps[:, None] * (self.B * self.dp) + self.rank * self.B
               + np.arange(self.B)[None, :]).reshape(-1)
        real = pos < self.stop if self.stop is not None else np.ones(len(pos), dtype=bool)
        if real.all():
            ids, ok = self.source.rows(pos)
            ids = np.asarray(ids, dtype=np.int64)
        else:
            ids = np.full((len(pos), self.source.seq_len), self.pad_id, dtype=np.int64)
            ok = np.zeros(len(pos), dtype=bool)
            if real.any():
                ids[real], ok[real] = self.source.rows(pos[real])
        bad = real & ~ok  # corrupt samples (data.on_corrupt=skip) become padding rows, like the end of a pass
        if bad.any():
            ids[bad] = self.pad_id
        out = {"skipped": torch.from_numpy(bad.reshape(len(steps), self.B).sum(1))}
        if getattr(self.source, "labels", None) is not None:  # image classes; padding rows get class 0
            labels = np.zeros(len(pos), dtype=np.int64)
            labels[real] = self.source.labels_at(pos[real])
            out["labels"] = torch.from_numpy(labels)
        # numpy, not torch, for the mask: torch's intra-op threads would compete with the training step's
        mask = (ids != self.pad_id).astype(np.int64)
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask), **out}

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        total = self.num_steps()
        c = w
        while total is None or c * self.K < total:
            yield self.chunk(c)
            c += nw


def _thread_prefetch(iterable, depth: int, pin: bool) -> Iterator:
    """Run ``iterable`` in a daemon thread, ``depth`` items ahead; errors re-raise in the consumer."""
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run():
        try:
            for item in iterable:
                if pin:
                    item = {k: (v.pin_memory() if torch.is_tensor(v) else v) for k, v in item.items()}
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(("error", e))

    t = threading.Thread(target=run, name="mdtrain-data-prefetch", daemon=True)
    t.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        t.join()  # the source's caches are not shared between threads: a later iterator starts after this ends


class Loader:
    """Iterates ``{"input_ids", "attention_mask"}`` LongTensor[B, L] batches of one DP rank; resumable. Image
    datasets with labels add ``"labels"`` LongTensor[B].

    Attributes: ``tokenizer``, ``seq_len``, ``num_samples`` (of the split), ``batch_size``, ``epoch``
    (fractional), ``skipped_samples`` (corrupt samples masked out with data.on_corrupt=skip), and
    ``entropy_per_token``: the data's exact entropy in nats per token for synthetic data (on the fly or
    written as shards), else None; no model's NLL / NELBO per token may go below it.
    A finite loader restarts its pass at each ``iter()`` (unless a state was just loaded) and has ``len()``.
    """

    def __init__(self, source, tokenizer: Tokenizer, cfg: DataConfig, split: str, batch_size: int, dp_rank: int,
                 dp_size: int, seed_key: tuple, infinite: bool):
        self.source, self.tokenizer, self.split = source, tokenizer, split
        self.seq_len, self.num_samples = source.seq_len, source.num_samples
        self.entropy_per_token = source.entropy
        self.batch_size, self.dp_rank, self.dp_size = batch_size, dp_rank, dp_size
        self.infinite, self.seed_key = infinite, seed_key
        self.num_workers, self.prefetch = cfg.num_workers, cfg.prefetch
        self.pin_memory = cfg.pin_memory and torch.cuda.is_available()
        self.shuffle_window = cfg.shuffle_window
        # steps per chunk: about two shuffle windows of the stream but at least MIN_CHUNK_SAMPLES of this rank's
        # samples (at a large dp_size one step is a few of its samples, too few to pay for a chunk's fixed costs),
        # and at most ~32 MB of this rank's int64 rows
        steps_cap = max(1, (32 << 20) // (self.seq_len * 16 * batch_size))
        want = max(-(-source.chunk_positions // (batch_size * dp_size)), -(-MIN_CHUNK_SAMPLES // batch_size))
        self.steps_per_chunk = max(1, min(steps_cap, want))
        self.consumed = 0  # stream position of the next step's first sample (the same on every rank)
        self.pass_start = 0  # finite loaders: where the current pass began
        self.skipped_samples = 0
        self._resumed = False

    @property
    def step_samples(self) -> int:
        return self.batch_size * self.dp_size

    @property
    def epoch(self) -> float:
        return self.consumed / self.num_samples

    def __len__(self) -> int:
        if self.infinite:
            raise TypeError("an infinite loader has no length")
        return -(-self.num_samples // self.step_samples)

    def __iter__(self) -> Iterator[dict]:
        if not self.infinite and not self._resumed:
            self.consumed = self.pass_start
        self._resumed = False
        stop = None if self.infinite else self.pass_start + self.num_samples
        stream = _ChunkStream(self.source, self.batch_size, self.dp_rank, self.dp_size, self.consumed, stop,
                              self.tokenizer.pad_id, self.steps_per_chunk)
        if self.num_workers > 0:
            it = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                                             prefetch_factor=self.prefetch, pin_memory=self.pin_memory)
        else:
            it = _thread_prefetch(stream, self.prefetch, self.pin_memory)
        B = self.batch_size
        try:
            for chunk in it:
                ids, mask = chunk["input_ids"], chunk["attention_mask"]
                for j, skipped in enumerate(chunk["skipped"].tolist()):
                    self.skipped_samples += skipped
                    self.consumed += self.step_samples
                    if stop is not None:
                        self.consumed = min(self.consumed, stop)
                    batch = {"input_ids": ids[j * B:(j + 1) * B], "attention_mask": mask[j * B:(j + 1) * B]}
                    if "labels" in chunk:
                        batch["labels"] = chunk["labels"][j * B:(j + 1) * B]
                    yield batch
        finally:
            if hasattr(it, "close"):
                it.close()

    def state_dict(self) -> dict:
        """Position and identity of the stream; the same on every DP rank."""
        return {"version": STATE_VERSION, "split": self.split, "source": self.source.fingerprint,
                "num_samples": self.num_samples, "seed": list(self.seed_key),
                "shuffle_window": self.shuffle_window, "consumed": self.consumed, "pass_start": self.pass_start,
                "dp_size": self.dp_size, "batch_size": self.batch_size, "skipped_samples": self.skipped_samples}

    def load_state_dict(self, state: dict, from_dp_size: Optional[int] = None) -> None:
        """Continue exactly where ``state`` was taken, whatever the DP size and micro-batch were then (the state
        records them; ``from_dp_size``, if given, must agree). Raises a DataError if the state belongs to another
        stream (dataset, seeds, shuffle window)."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data loader state version {state.get('version')} is not supported")
        if from_dp_size is not None and from_dp_size != state["dp_size"]:
            raise DataError(f"the data loader state was saved with dp_size {state['dp_size']}, not {from_dp_size}")
        mine = self.state_dict()
        for key, what in (("split", "split"), ("source", "dataset (shards or synthetic spec)"),
                          ("num_samples", "number of samples"), ("seed", "seeds (data.seed, train.seed)"),
                          ("shuffle_window", "data.shuffle_window")):
            if state[key] != mine[key]:
                raise DataError(f"cannot resume the {self.split} data stream: the checkpoint's {what} is "
                                f"{state[key]!r}, this run's is {mine[key]!r}; the sample order would differ. "
                                "Restore the original data settings, or start the data stream afresh.")
        self.consumed, self.pass_start = int(state["consumed"]), int(state["pass_start"])
        self.skipped_samples = int(state.get("skipped_samples", 0))
        self._resumed = True
        if (state["dp_size"], state["batch_size"]) != (self.dp_size, self.batch_size) and self.dp_rank == 0:
            print(f"data: resuming the {self.split} stream at sample {self.consumed:,} (epoch {self.epoch:.3f}) "
                  f"with dp_size {self.dp_size} x micro-batch {self.batch_size} (saved with {state['dp_size']} x "
                  f"{state['batch_size']}); the epoch continues exactly, no sample repeated or skipped",
                  file=sys.stderr)


def build_loader(cfg: DataConfig, split: str, batch_size: int, dp_rank: int, dp_size: int, seed: int,
                 infinite: bool = True) -> Loader:
    """The loader of ``split`` ("train" or "valid") for one data-parallel rank.

    ``batch_size`` is this rank's micro-batch. Tensor-parallel ranks pass the same ``dp_rank`` and get the
    same batches. ``seed`` (train.seed) is combined with ``cfg.seed`` for the shuffle order.
    """
    if split not in ("train", "valid"):
        raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
    if not 0 <= dp_rank < dp_size or batch_size < 1:
        raise ValueError(f"need 0 <= dp_rank < dp_size and batch_size >= 1, got rank {dp_rank} of {dp_size}, "
                         f"batch {batch_size}")
    spec = cfg.train if split == "train" else (cfg.valid or cfg.train)
    if not spec:
        raise DataError("data.train is empty: set it to a prepared directory or synthetic:NAME")
    key = (cfg.seed, seed)
    if spec.startswith("synthetic:"):
        from mdtrain.data.synthetic import SyntheticSource

        source = SyntheticSource(spec, cfg.seq_len, split)
        tokenizer = source.tokenizer
    else:
        manifest = read_manifest(spec)
        if manifest["seq_len"] != cfg.seq_len:
            raise DataError(f"{spec}: prepared with seq_len {manifest['seq_len']}, but data.seq_len is "
                            f"{cfg.seq_len}; set data.seq_len={manifest['seq_len']}")
        verify_shards(spec, manifest, split, cfg.verify)
        tokenizer = load_tokenizer(os.path.join(spec, manifest["tokenizer"]))
        if tokenizer.vocab_size != manifest["vocab_size"]:
            raise DataError(f"{spec}: tokenizer has vocab size {tokenizer.vocab_size}, the manifest says "
                            f"{manifest['vocab_size']}")
        source = ShardSource(spec, manifest, split, shuffle=(split == "train"), window=cfg.shuffle_window,
                             key=key, on_corrupt=cfg.on_corrupt, vocab_size=tokenizer.vocab_size)
    if source.num_samples == 0:
        hint = (" (prepare it with --val-fraction > 0, or --val-fraction 1 for an evaluation-only corpus, or set "
                "data.valid)" if split == "valid" else "")
        raise DataError(f"{spec}: the {split} split has no samples{hint}")
    return Loader(source, tokenizer, cfg, split, batch_size, dp_rank, dp_size, key, infinite)
