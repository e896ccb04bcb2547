"""The prepared-dataset format: webdataset tar shards of fixed-length token samples plus ``manifest.json``.

Layout of a prepared directory::

    manifest.json            shards with sample counts, bytes and sha256; token counts; seq_len; packing; splits
    tokenizer/               the saved tokenizer (``load_tokenizer``)
    train/shard-000000.tar   members ``<key>.input_ids.npy``: one uint16/int32 array of ``seq_len`` ids each
    valid/shard-000000.tar

Padding (packing "pad") uses the tokenizer's pad id, which text never produces, so attention_mask = ids != pad.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from typing import Optional

import numpy as np

from mdtrain.configtools import atomic_write_text
from mdtrain.data.errors import DataError

MANIFEST = "manifest.json"
FORMAT = "mdtrain-shards"
FORMAT_VERSION = 1
SPLITS = ("train", "valid")
SUFFIX = "input_ids.npy"


def sample_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def encode_sample(ids: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(ids), allow_pickle=False)
    return buf.getvalue()


_HEADERS: dict = {}


def decode_sample(data: bytes) -> np.ndarray:
    """Parse one ``.npy`` member (headers are cached: every sample of a dataset has the same one)."""
    if data[:6] != b"\x93NUMPY":
        raise ValueError("not a .npy array")
    start = 10 + int.from_bytes(data[8:10], "little") if data[6] == 1 else 12 + int.from_bytes(data[8:12], "little")
    header = bytes(data[:start])
    parsed = _HEADERS.get(header)
    if parsed is None:
        f = io.BytesIO(header)
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        if fortran or dtype.hasobject or len(shape) != 1:
            raise ValueError(f"expected a 1-D integer array, got shape {shape} dtype {dtype}")
        parsed = _HEADERS[header] = (dtype, shape[0])
    dtype, n = parsed
    if len(data) - start != n * dtype.itemsize:
        raise ValueError(f"array data is {len(data) - start} bytes, its header says {n * dtype.itemsize}")
    return np.frombuffer(data, dtype=dtype, offset=start)


class _HashingFile:
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, path: str):
        self.fh = open(path, "wb")
        self.sha = hashlib.sha256()
        self.bytes = 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.bytes += len(b)
        return self.fh.write(b)

    def flush(self):
        self.fh.flush()

    def close(self):
        self.fh.close()


class ShardWriter:
    """Writes one split's samples into ``<root>/<split>/shard-NNNNNN.tar`` files of ``samples_per_shard`` each.

    Tar members carry mtime 0, so the same samples give byte-identical shards (and checksums)."""

    def __init__(self, root: str, split: str, samples_per_shard: int):
        import webdataset as wds

        self._wds = wds
        self.root, self.split, self.per_shard = root, split, int(samples_per_shard)
        self.shards: list[dict] = []
        self.num_samples = 0
        self._file: Optional[_HashingFile] = None
        self._tar = None
        self._count = 0

    def write(self, ids: np.ndarray) -> None:
        if self._tar is None:
            rel = f"{self.split}/shard-{len(self.shards):06d}.tar"
            os.makedirs(os.path.join(self.root, self.split), exist_ok=True)
            self._rel = rel
            self._file = _HashingFile(os.path.join(self.root, rel + ".tmp"))
            self._tar = self._wds.TarWriter(self._file, encoder=False, mtime=0)
        key = f"{self.split}-{self.num_samples:010d}"
        self._tar.write({"__key__": key, SUFFIX: encode_sample(ids)})
        self._count += 1
        self.num_samples += 1
        if self._count == self.per_shard:
            self._close_shard()

    def _close_shard(self) -> None:
        self._tar.close()
        self._file.close()
        path = os.path.join(self.root, self._rel)
        os.replace(path + ".tmp", path)
        self.shards.append({"path": self._rel, "samples": self._count, "bytes": self._file.bytes,
                            "sha256": self._file.sha.hexdigest()})
        self._tar, self._file, self._count = None, None, 0

    def close(self) -> list[dict]:
        if self._tar is not None:
            self._close_shard()
        return self.shards


def file_sha256(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def write_manifest(root: str, manifest: dict) -> None:
    atomic_write_text(os.path.join(root, MANIFEST), json.dumps(manifest, indent=1) + "\n")


def read_manifest(root: str) -> dict:
    """Load and check ``<root>/manifest.json``; every problem is a DataError naming the file."""
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        hint = " (it holds no manifest.json: run `mdtrain prepare` first)" if os.path.isdir(root) else ""
        raise DataError(f"{path}: not found; '{root}' is not a prepared dataset{hint}")
    try:
        with open(path, encoding="utf-8") as fh:
            m = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    fmt = m.get("format") if isinstance(m, dict) else None
    if fmt != FORMAT:
        raise DataError(f"{path}: not an mdtrain shard manifest (format {fmt!r}, expected {FORMAT!r})")
    if m.get("version") != FORMAT_VERSION:
        raise DataError(f"{path}: manifest version {m.get('version')} is not supported (this mdtrain reads "
                        f"{FORMAT_VERSION}); re-run mdtrain prepare")
    try:
        int(m["seq_len"]), str(m["tokenizer"]), str(m["dtype"])
        for split in SPLITS:
            s = m["splits"][split]
            total = 0
            for sh in s["shards"]:
                str(sh["path"]), str(sh["sha256"]), int(sh["bytes"])
                total += int(sh["samples"])
            if total != s["num_samples"]:
                raise DataError(f"{path}: split '{split}' lists {s['num_samples']} samples but its shards add up "
                                f"to {total}; the manifest was edited or is damaged")
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from None
    return m


def verify_shards(root: str, manifest: dict, split: str, mode: str) -> None:
    """Check that the split's shards exist with the manifest's sizes ("size") and checksums ("sha256")."""
    if mode == "none":
        return
    for sh in manifest["splits"][split]["shards"]:
        path = os.path.join(root, sh["path"])
        try:
            size = os.path.getsize(path)
        except OSError:
            raise DataError(f"{path}: shard listed in {os.path.join(root, MANIFEST)} is missing") from None
        if size != sh["bytes"]:
            raise DataError(f"{path}: {size} bytes, but the manifest says {sh['bytes']} (truncated or replaced "
                            "shard); re-run mdtrain prepare, or set data.verify=none to read it anyway")
        if mode == "sha256" and file_sha256(path) != sh["sha256"]:
            raise DataError(f"{path}: sha256 differs from the manifest's (the shard was modified or is corrupt)")


def read_shard(path: str, expect: int, seq_len: int, dtype: np.dtype, on_corrupt: str = "error"):
    """All samples of one shard as ``(ids[expect, seq_len], ok[expect])``.

    With ``on_corrupt="error"`` any problem (unreadable or truncated tar, a bad member, a count or shape that
    differs from the manifest) raises a DataError naming the shard; with "skip" the affected rows are
    returned with ``ok=False`` so the caller can count and mask them.
    """
    from webdataset.tariterators import tar_file_iterator

    out = np.zeros((expect, seq_len), dtype=dtype)
    ok = np.zeros(expect, dtype=bool)
    n = 0

    def problem(msg):
        if on_corrupt == "error":
            raise DataError(f"{path}: {msg}; re-run mdtrain prepare or restore the file "
                            "(data.on_corrupt=skip masks bad samples instead)")

    try:
        fh = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot open shard ({e.strerror})") from None
    with fh:
        try:
            for member in tar_file_iterator(fh):
                if n >= expect:
                    problem(f"holds more than the {expect} samples its manifest lists")
                    break
                try:
                    arr = decode_sample(member["data"])
                    if arr.shape[0] != seq_len:
                        raise ValueError(f"{arr.shape[0]} tokens, the manifest's seq_len is {seq_len}")
                    out[n] = arr
                    ok[n] = True
                except ValueError as e:
                    problem(f"member {member['fname']!r} (sample {n}) is bad: {e}")
                n += 1
        except (tarfile.TarError, EOFError, OSError) as e:
            msg = str(e).split(" @ ")[0]
            problem(f"corrupt or truncated tar shard after {n} of {expect} samples ({type(e).__name__}: {msg})")
    if n < expect:
        problem(f"holds {n} samples, the manifest lists {expect} (truncated shard?)")
    return out, ok

