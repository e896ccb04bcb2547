"""The prepared-dataset format: webdataset tar shards of fixed-length token samples plus ``manifest.json``.

Layout of a prepared directory::

    manifest.json            shards with sample counts, bytes, sha256 and sample index; token counts; seq_len;
                             packing; splits
    tokenizer/               the saved tokenizer (``load_tokenizer``)
    train/shard-000000.tar   per sample: ``<key>.input_ids.npy`` (one uint16/int32 array of ``seq_len`` ids) and
                             any extra fields (``<key>.<suffix>`` members written next to it)
    train/shard-000000.tar.idx   only when a shard's samples differ in size: their byte offsets (shard_index.py)
    valid/shard-000000.tar

Each shard entry's ``index`` says where its samples lie, so a loader reads only the samples it needs
(``mdtrain.data.shard_index``): ``{"stride": S}`` when every sample spans S bytes, else the sidecar file above.
Shards written before indexes existed have none; the reader derives it (see shard_index.py).

Padding (packing "pad") uses the tokenizer's pad id, which text never produces, so attention_mask = ids != pad.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import numpy as np

from mdtrain.configtools import atomic_write_text
from mdtrain.data.errors import DataError
from mdtrain.data.shard_index import BLOCK, OFFSET_DTYPE, SUFFIX, encode_sample

MANIFEST = "manifest.json"
FORMAT = "mdtrain-shards"
FORMAT_VERSION = 1
SPLITS = ("train", "valid")


def sample_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


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
    """Writes one split's samples into ``<root>/<split>/shard-NNNNNN.tar`` files of ``samples_per_shard`` each, and
    the index of each shard (module doc).

    Tar members carry mtime 0, so the same samples give byte-identical shards (and checksums)."""

    def __init__(self, root: str, split: str, samples_per_shard: int):
        import webdataset as wds

        self._wds = wds
        self.root, self.split, self.per_shard = root, split, int(samples_per_shard)
        self.shards: list[dict] = []
        self.num_samples = 0
        self._file: Optional[_HashingFile] = None
        self._tar = None
        self._offsets: list[int] = []

    def write(self, ids: np.ndarray, extra: Optional[dict] = None) -> None:
        """One sample: ``ids`` becomes ``<key>.input_ids.npy``; ``extra`` maps further suffixes (``"roles.npy"``,
        ``"cls"``) to bytes or arrays (arrays are stored as ``.npy``), written as members of the same sample."""
        if self._tar is None:
            rel = f"{self.split}/shard-{len(self.shards):06d}.tar"
            os.makedirs(os.path.join(self.root, self.split), exist_ok=True)
            self._rel = rel
            self._file = _HashingFile(os.path.join(self.root, rel + ".tmp"))
            self._tar = self._wds.TarWriter(self._file, encoder=False, mtime=0)
        members = {SUFFIX: encode_sample(ids)}
        for suffix, value in (extra or {}).items():
            if suffix == SUFFIX or suffix.startswith("_") or "/" in suffix:
                raise ValueError(f"extra field {suffix!r}: reserved or not a plain suffix")
            members[suffix] = encode_sample(value) if isinstance(value, np.ndarray) else bytes(value)
        self._offsets.append(self._tar.tarstream.offset)  # tarfile's own count of the archive's bytes so far
        self._tar.write({"__key__": f"{self.split}-{self.num_samples:010d}", **members})
        self.num_samples += 1
        if len(self._offsets) == self.per_shard:
            self._close_shard()

    def _close_shard(self) -> None:
        end = self._tar.tarstream.offset
        self._tar.close()
        self._file.close()
        path = os.path.join(self.root, self._rel)
        os.replace(path + ".tmp", path)
        offsets = np.array(self._offsets + [end], dtype=np.int64)
        sizes = np.diff(offsets)
        if (sizes == sizes[0]).all():
            index = {"stride": int(sizes[0])}
        else:
            raw = offsets.astype(OFFSET_DTYPE).tobytes()
            atomic_write_bytes(path + ".idx", raw)
            index = {"path": self._rel + ".idx", "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
        self.shards.append({"path": self._rel, "samples": len(self._offsets), "bytes": self._file.bytes,
                            "sha256": self._file.sha.hexdigest(), "index": index})
        self._tar, self._file, self._offsets = None, None, []

    def close(self) -> list[dict]:
        if self._tar is not None:
            self._close_shard()
        return self.shards


def atomic_write_bytes(path: str, data: bytes) -> None:
    with open(path + ".tmp", "wb") as fh:
        fh.write(data)
    os.replace(path + ".tmp", path)


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
        what = "holds no manifest.json" if os.path.isdir(root) else "does not exist"
        raise DataError(f"{path}: not found; '{root}' {what}, so it is not a prepared dataset. Make one with "
                        f"`mdtrain prepare --input FILES... --tokenizer ... --seq-len N --out {root}` (README, "
                        f"\"Preparing the datasets the recipes use\", has the command for each recipe's data)")
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
        tok = m["tokenizer"]
        if os.path.isabs(tok) or os.path.normpath(tok).split(os.sep)[0] in ("..", ""):
            raise DataError(f"{path}: tokenizer {tok!r} is not a directory inside {root}; a prepared dataset holds "
                            "its own tokenizer (re-run mdtrain prepare)")
        for split in SPLITS:
            s = m["splits"][split]
            total = 0
            for sh in s["shards"]:
                str(sh["path"]), str(sh["sha256"]), int(sh["bytes"])
                total += int(sh["samples"])
                _check_index(path, sh)
            if total != s["num_samples"]:
                raise DataError(f"{path}: split '{split}' lists {s['num_samples']} samples but its shards add up "
                                f"to {total}; the manifest was edited or is damaged")
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from None
    return m


def _check_index(path: str, sh: dict) -> None:
    idx = sh.get("index")
    if idx is None:
        return  # written before indexes existed: the reader derives one
    if isinstance(idx, dict) and "stride" in idx and int(idx["stride"]) > 0 and int(idx["stride"]) % BLOCK == 0:
        return
    if isinstance(idx, dict) and "path" in idx:
        str(idx["path"]), int(idx["bytes"]), str(idx["sha256"])
        return
    raise DataError(f"{path}: shard {sh['path']!r} has a malformed index {idx!r} (expected {{'stride': a multiple "
                    f"of {BLOCK}}} or {{'path', 'bytes', 'sha256'}}); re-run mdtrain prepare")


def verify_shards(root: str, manifest: dict, split: str, mode: str) -> None:
    """Check that the split's shards (and sidecar indexes) exist with the manifest's sizes ("size") and checksums
    ("sha256")."""
    if mode == "none":
        return
    for sh in manifest["splits"][split]["shards"]:
        files = [(os.path.join(root, sh["path"]), sh, "shard")]
        if "path" in (sh.get("index") or {}):
            files.append((os.path.join(root, sh["index"]["path"]), sh["index"], "sample index"))
        for path, entry, what in files:
            try:
                size = os.path.getsize(path)
            except OSError:
                raise DataError(f"{path}: {what} listed in {os.path.join(root, MANIFEST)} is missing") from None
            if size != entry["bytes"]:
                raise DataError(f"{path}: {size} bytes, but the manifest says {entry['bytes']} (truncated or replaced "
                                f"{what}); re-run mdtrain prepare, or set data.verify=none to read it anyway")
            if mode == "sha256" and file_sha256(path) != entry["sha256"]:
                raise DataError(f"{path}: sha256 differs from the manifest's (the {what} was modified or is corrupt)")


def check_token_ids(ids: np.ndarray, ok: np.ndarray, vocab_size: int, on_corrupt: str, where) -> None:
    """Decoded samples (rows of ``ids``) holding an id outside ``[0, vocab_size)`` (one flipped byte gives 65377 in
    a 50k vocabulary): a DataError naming ``where(row)`` (shard and sample), or with ``on_corrupt="skip"`` their
    ``ok`` is cleared in place so the loader masks and counts them. One vectorised pass over the rows."""
    bad = ok & ((ids >= vocab_size) | (ids < 0)).any(axis=1)
    if not bad.any():
        return
    if on_corrupt == "error":
        row = int(np.flatnonzero(bad)[0])
        top = int(ids[row].max()) if int(ids[row].max()) >= vocab_size else int(ids[row].min())
        raise DataError(f"{where(row)} holds token id {top}, outside the tokenizer's vocabulary [0, {vocab_size}) "
                        "(a damaged shard?); re-run mdtrain prepare or restore the file (data.on_corrupt=skip masks "
                        "bad samples instead)")
    ok &= ~bad


def read_shard(path: str, expect: int, seq_len: int, dtype: np.dtype, on_corrupt: str = "error"):
    """All samples of one shard as ``(ids[expect, seq_len] int64, ok[expect])``, for tools that read whole shards
    (the loader reads by sample index). Problems raise a DataError naming the shard, or with
    ``on_corrupt="skip"`` come back as rows with ``ok=False``."""
    from mdtrain.data.shard_index import SampleReader

    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise DataError(f"{path}: cannot open shard ({e.strerror})") from None
    entry = {"path": os.path.basename(path), "samples": int(expect), "bytes": size}  # no index: derived or walked
    reader = SampleReader(os.path.dirname(path), [entry], seq_len, dtype, on_corrupt)
    try:
        return reader.read(np.zeros(expect, dtype=np.int64), np.arange(expect, dtype=np.int64))
    finally:
        reader.close()
