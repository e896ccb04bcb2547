"""``mdtrain prepare``: text / JSONL / Parquet -> tokenized, packed, fixed-length samples in webdataset shards.

Streaming and constant-memory: documents are read one at a time, tokenized in chunks by worker processes
(at most a few chunks in flight), packed and written as they come. The output is byte-identical for any
number of workers. Each document goes to "valid" when a keyed hash of its text falls below
``--val-fraction`` (deterministic, order-free, and duplicates always land in the same split).

Packing (``--packing``):
  mdlm  documents + EOS concatenated, cut into seq_len-2 pieces, each framed [BOS] piece [EOS] (MDLM ``wrap``)
  md4   documents + EOS concatenated, cut into plain seq_len blocks (MD4's OpenWebText pipeline)
  pad   one document per sample, [BOS] doc [EOS] truncated to seq_len and padded (MDLM's LM1B setting)
The tail shorter than one sample at the end of each split is dropped (counted as ``dropped_tokens``).
"""
from __future__ import annotations

import collections
import hashlib
import multiprocessing as mp
import os
import sys
import time
from typing import Iterator

import numpy as np

from mdtrain.data.detokenize import get_detokenizer
from mdtrain.data.errors import DataError
from mdtrain.data.readers import expand_inputs, iter_all_documents
from mdtrain.data.shards import FORMAT, FORMAT_VERSION, MANIFEST, SPLITS, ShardWriter, sample_dtype, write_manifest
from mdtrain.data.tokenizers import Tokenizer, build_tokenizer, load_tokenizer

PACKINGS = ("mdlm", "md4", "pad")
CHUNK_CHARS = 1 << 20  # text per worker task


# ----------------------------------------------------------------------------------------------------
# packing


class Packer:
    """Turns a stream of documents' token ids into fixed-length samples (see the module doc)."""

    @staticmethod
    def check(mode: str, seq_len: int) -> None:
        if mode not in PACKINGS:
            raise DataError(f"unknown packing {mode!r}; expected one of {PACKINGS}")
        need = 3 if mode in ("mdlm", "pad") else 1
        if seq_len < need:
            raise DataError(f"--seq-len {seq_len} is too short for --packing {mode} (needs >= {need})")

    def __init__(self, mode: str, seq_len: int, tok: Tokenizer):
        self.check(mode, seq_len)
        self.mode, self.L, self.tok = mode, seq_len, tok
        self.body = seq_len - 2 if mode == "mdlm" else seq_len
        self._parts: list[np.ndarray] = []
        self._have = 0
        self.dropped_tokens = 0
        self.truncated_documents = 0

    def add(self, ids: np.ndarray) -> list[np.ndarray]:
        tok, L = self.tok, self.L
        if self.mode == "pad":
            keep = ids[: L - 2]
            if len(ids) > L - 2:
                self.truncated_documents += 1
                self.dropped_tokens += len(ids) - (L - 2)
            out = np.full(L, tok.pad_id, dtype=np.int64)
            out[0], out[1:1 + len(keep)], out[1 + len(keep)] = tok.bos_id, keep, tok.eos_id
            return [out]
        self._parts += [ids, np.array([tok.eos_id])]
        self._have += len(ids) + 1
        if self._have < self.body:
            return []
        stream = np.concatenate(self._parts)
        n = len(stream) // self.body
        blocks = stream[: n * self.body].reshape(n, self.body)
        rest = stream[n * self.body:]
        self._parts, self._have = [rest], len(rest)
        if self.mode == "mdlm":
            framed = np.empty((n, L), dtype=np.int64)
            framed[:, 0], framed[:, 1:-1], framed[:, -1] = tok.bos_id, blocks, tok.eos_id
            blocks = framed
        return list(blocks)

    def finish(self) -> None:
        self.dropped_tokens += self._have
        self._parts, self._have = [], 0


# ----------------------------------------------------------------------------------------------------
# tokenization (runs in worker processes, or in-process with --workers 1)

_W: dict = {}


def _init_worker(tok_dir: str, seed: int, val_fraction: float) -> None:
    _W["tok"] = load_tokenizer(tok_dir)
    _W["key"] = hashlib.blake2b(str(seed).encode(), digest_size=16).digest()
    _W["threshold"] = int(val_fraction * 2.0 ** 64) if val_fraction < 1 else 1 << 64


def _encode_chunk(texts: list[str]):
    """-> (is_valid[n] bool, lengths[n], concatenated ids) for one chunk of documents."""
    tok, key, threshold = _W["tok"], _W["key"], _W["threshold"]
    valid = np.empty(len(texts), dtype=bool)
    lengths = np.empty(len(texts), dtype=np.int64)
    ids = []
    for i, text in enumerate(texts):
        h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=key).digest()
        valid[i] = int.from_bytes(h, "little") < threshold
        enc = tok.encode(text)
        lengths[i] = len(enc)
        ids.append(np.asarray(enc, dtype=np.int64))
    return valid, lengths, (np.concatenate(ids) if ids else np.zeros(0, np.int64))


def _chunks(docs: Iterator[tuple[str, int]]) -> Iterator[tuple[list[str], float]]:
    texts, size, nbytes = [], 0, 0.0
    for text, b in docs:
        texts.append(text)
        size += len(text)
        nbytes += b
        if size >= CHUNK_CHARS:
            yield texts, nbytes
            texts, size, nbytes = [], 0, 0.0
    if texts:
        yield texts, nbytes


def _encoded(chunks, workers: int, init_args: tuple):
    """Yield each chunk's encoding in input order; at most 2 x workers chunks are in flight (bounded memory)."""
    if workers <= 1:
        _init_worker(*init_args)
        for texts, nbytes in chunks:
            yield _encode_chunk(texts), nbytes
        return
    ctx = mp.get_context("spawn")  # fork after a Rust/C++ tokenizer has started threads can deadlock
    with ctx.Pool(workers, initializer=_init_worker, initargs=init_args) as pool:
        pending = collections.deque()
        for texts, nbytes in chunks:
            pending.append((pool.apply_async(_encode_chunk, (texts,)), nbytes))
            if len(pending) >= 2 * workers:
                res, nb = pending.popleft()
                yield res.get(), nb
        while pending:
            res, nb = pending.popleft()
            yield res.get(), nb


# ----------------------------------------------------------------------------------------------------
# progress


class _Progress:
    """tqdm bar (bytes of input, with docs/s and tokens/s) on a terminal; a plain line every 30 s otherwise."""

    def __init__(self, total_bytes: int):
        self.t0 = self.last = time.time()
        self.docs = self.tokens = 0
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", mininterval=0.5)

    def rates(self) -> str:
        dt = max(time.time() - self.t0, 1e-9)
        return f"{self.docs / dt:,.0f} docs/s, {self.tokens / dt:,.0f} tokens/s"

    def update(self, nbytes: float, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        if self.bar is not None:
            self.bar.set_postfix_str(self.rates(), refresh=False)
            self.bar.update(nbytes)
        elif time.time() - self.last > 30:
            self.last = time.time()
            print(f"prepare: {self.docs:,} docs, {self.tokens:,} tokens ({self.rates()})", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------------------------
# the command


def prepare(inputs: list[str], tokenizer: str, seq_len: int, out: str, val_fraction: float = 0.01,
            packing: str = "mdlm", doc_per: str = "file", text_field: str = "text", samples_per_shard: int = 1024,
            workers: int = 1, seed: int = 0, glob: str = "*", quiet: bool = False, detokenize: str = "none") -> dict:
    """Tokenize, pack and shard ``inputs`` into ``out``; returns the manifest (also written to out/manifest.json).
    ``detokenize`` names a rule set of ``mdtrain.data.detokenize`` applied to every document first (the
    zero-shot sets of the MDLM/SEDD/BD3-LM papers)."""
    if not 0.0 <= val_fraction <= 1.0:
        raise DataError(f"--val-fraction must be in [0, 1], got {val_fraction}")
    if samples_per_shard < 1 or workers < 1:
        raise DataError("--samples-per-shard and --workers must be >= 1")
    if doc_per not in ("file", "line"):
        raise DataError(f"--doc-per must be file or line, got {doc_per!r}")
    Packer.check(packing, seq_len)
    detok = get_detokenizer(detokenize)
    if os.path.exists(os.path.join(out, MANIFEST)):
        raise DataError(f"{out}: already holds a prepared dataset ({MANIFEST}); remove it or choose another --out")
    files = expand_inputs(inputs, glob)

    def documents():
        for text, nbytes in iter_all_documents(files, doc_per, text_field):
            yield detok(text), nbytes

    t_tok = time.time()
    tok = build_tokenizer(tokenizer, texts=(text for text, _ in documents()))  # read only when training one
    t_tok = time.time() - t_tok
    tok_dir = os.path.join(out, "tokenizer")
    tok.save(tok_dir)
    dtype = sample_dtype(tok.vocab_size)

    packers = {s: Packer(packing, seq_len, tok) for s in SPLITS}
    writers = {s: ShardWriter(out, s, samples_per_shard) for s in SPLITS}
    stats = {s: {"num_documents": 0, "doc_tokens": 0, "num_tokens": 0} for s in SPLITS}
    progress = _Progress(sum(os.path.getsize(f) for f, _ in files)) if not quiet else None
    t0 = time.time()
    try:
        for (is_valid, lengths, ids), nbytes in _encoded(_chunks(documents()), workers, (tok_dir, seed, val_fraction)):
            bounds = np.concatenate([[0], np.cumsum(lengths)])
            for i in range(len(lengths)):
                split = "valid" if is_valid[i] else "train"
                st = stats[split]
                st["num_documents"] += 1
                st["doc_tokens"] += int(lengths[i])
                for sample in packers[split].add(ids[bounds[i]:bounds[i + 1]]):
                    st["num_tokens"] += int(np.count_nonzero(sample != tok.pad_id))
                    writers[split].write(sample.astype(dtype))
            if progress:
                progress.update(nbytes, len(lengths), int(bounds[-1]))
    finally:
        if progress:
            progress.close()
    splits = {}
    for s in SPLITS:
        packers[s].finish()
        shards = writers[s].close()
        splits[s] = {"num_samples": writers[s].num_samples, **stats[s], "dropped_tokens": packers[s].dropped_tokens,
                     "truncated_documents": packers[s].truncated_documents, "shards": shards}
    if not any(splits[s]["num_samples"] for s in SPLITS):
        total = sum(stats[s]["doc_tokens"] for s in SPLITS)
        raise DataError(f"{', '.join(inputs)}: produced no samples: the input has {total} tokens, fewer than one "
                        f"sample of --seq-len {seq_len}")
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "seq_len": seq_len, "packing": packing, "dtype": dtype.name,
        "tokenizer": "tokenizer", "tokenizer_spec": tokenizer, "vocab_size": tok.vocab_size,
        "specials": tok.special_ids, "val_fraction": val_fraction, "seed": seed, "doc_per": doc_per,
        "text_field": text_field, "detokenize": detokenize, "inputs": [os.path.abspath(p) for p in inputs],
        "num_files": len(files), "splits": splits,
    }
    write_manifest(out, manifest)
    if not quiet:
        dt = time.time() - t0
        docs = sum(stats[s]["num_documents"] for s in SPLITS)
        toks = sum(stats[s]["doc_tokens"] for s in SPLITS)
        print(f"prepared {out}: " + ", ".join(
            f"{s} {splits[s]['num_samples']:,} samples / {splits[s]['num_tokens']:,} tokens in "
            f"{len(splits[s]['shards'])} shards" for s in SPLITS)
            + f" | {docs:,} docs in {dt:.1f}s ({docs / dt:,.0f} docs/s, {toks / dt:,.0f} tokens/s)"
            + f" | {tok!r}" + (f" trained in {t_tok:.1f}s" if t_tok > 1 else ""))
        if val_fraction > 0 and splits["valid"]["num_samples"] == 0:
            print(f"warning: --val-fraction {val_fraction} gave no validation samples (too few documents)",
                  file=sys.stderr)
    return manifest


def main(args) -> int:
    """Entry point of ``mdtrain prepare`` (``args`` is the argparse namespace from ``mdtrain.cli``)."""
    try:
        if args.images:  # pixels as tokens: mdtrain/data/images.py
            from mdtrain.data.images import prepare_images
            if args.tokenizer:
                raise DataError("--images tokenizes pixels itself (values 0..255, mask 256); leave --tokenizer out")
            prepare_images(args.input, args.out, image_size=args.image_size, val_fraction=args.val_fraction,
                           samples_per_shard=args.samples_per_shard, seed=args.seed, on_corrupt=args.on_corrupt,
                           seq_len=args.seq_len)
            return 0
        if not args.tokenizer or args.seq_len is None:
            raise DataError("text needs --tokenizer and --seq-len (or pass --images for image inputs)")
        prepare(args.input, args.tokenizer, args.seq_len, args.out, val_fraction=args.val_fraction,
                packing=args.packing, doc_per=args.doc_per, text_field=args.text_field,
                samples_per_shard=args.samples_per_shard, workers=args.workers, seed=args.seed, glob=args.glob,
                detokenize=args.detokenize)
    except DataError as e:
        print(f"mdtrain prepare: error: {e}", file=sys.stderr)
        return 1
    return 0
