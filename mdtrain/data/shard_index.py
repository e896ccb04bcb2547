"""Random access to the samples of tar shards: where each sample's bytes lie, and coalesced reads of many samples.

A sample is a run of consecutive tar members that share one key (webdataset's grouping): ``<key>.input_ids.npy``
and any extra fields other pipelines add (``<key>.roles.npy``, ``<key>.cls``, ...). Its *span* runs from its
first member's header to the end of its last member's padded data; spans tile the archive.

Where the spans come from (``ShardIndex``), cheapest first:

* ``"index": {"stride": S}`` in the shard's manifest entry (``ShardWriter`` writes it when all samples have one
  size): sample j starts at j·S.
* ``"index": {"path": P, "bytes": n, "sha256": h}``: a sidecar file of count+1 little-endian uint64 offsets
  (samples of unequal sizes); a read fetches only the entries it needs.
* no index (shards prepared before indexes existed held exactly one ``input_ids.npy`` member per sample, named
  ``<split>-<n:010d>`` for sample n of the split): the stride follows from seq_len and dtype, checked against the
  shard's size in the manifest, and every read checks the sample's key, so a wrong guess cannot deliver a wrong
  sample.
* otherwise (those checks fail, or a stride does not fit the shard's size) the shard's tar headers are walked
  once, 512 bytes per member, and the offsets kept.

A read checks what it reads: each member's header checksum, type and name, that the members tile the span exactly
and share one key, and the ``.npy`` header of the ids. A failure is a DataError naming the shard and sample (or,
with ``on_corrupt="skip"``, a row marked bad). Flipped bytes inside the token data are caught only by
``data.verify=sha256``, as before.
"""
from __future__ import annotations

import io
import os
from collections import OrderedDict
from typing import Optional

import numpy as np

from mdtrain.data.errors import DataError

BLOCK = 512
RECORD = 20 * BLOCK  # tarfile pads an archive to a multiple of this after its two zero end blocks
OFFSET_DTYPE = np.dtype("<u8")  # sidecar index entries
MAX_READ = 16 << 20  # one coalesced read at most
GAP_FRACTION = 0.25  # a gap joins two reads when it is at most this fraction of the useful bytes so far
SUFFIX = "input_ids.npy"


def encode_sample(ids: np.ndarray) -> bytes:
    """One array as a ``.npy`` member (never pickled)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(ids), allow_pickle=False)
    return buf.getvalue()


def padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def stride_fits(count: int, stride: int, size: int) -> bool:
    """Can ``count`` samples of ``stride`` bytes (and tar's end blocks and record padding) be a file of ``size``?"""
    end = count * stride + 2 * BLOCK
    return stride > 0 and stride % BLOCK == 0 and end <= size < end + RECORD


def _number(field) -> int:
    """A tar numeric field: octal digits ended by NUL or space, or GNU base-256 for large values."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    return int(field.split(b"\0", 1)[0] or b"0", 8)  # int() ignores surrounding spaces


class BadSample(Exception):
    """A sample that failed a check (internal: turned into a DataError or a masked row)."""


class Truncated(BadSample):
    """The file ends before the sample does."""


class ArchiveEnded(BadSample):
    """The archive's end blocks stand where a sample should start: the shard holds fewer samples than listed."""


FILE, LONGNAME, PAX, OTHER, END = range(5)
_KINDS = {ord("0"): FILE, 0: FILE, ord("7"): FILE, ord("L"): LONGNAME, ord("x"): PAX, ord("g"): PAX}


def parse_header(buf, pos: int) -> tuple:
    """The 512-byte tar header at ``buf[pos:]`` -> (kind, name bytes, size, stored checksum); END for a zero block.

    The checksum is returned, not checked, so a batch of headers can be summed at once (``checksums_ok``)."""
    if buf[pos + 257:pos + 262] != b"ustar":
        if buf.count(0, pos, pos + BLOCK) == BLOCK:
            return END, b"", 0, 0
        raise BadSample("not a tar header (no ustar magic)")
    try:
        size, chk = _number(buf[pos + 124:pos + 136]), _number(buf[pos + 148:pos + 156])
    except ValueError:
        raise BadSample("unreadable size or checksum field in a tar header") from None
    name = buf[pos:pos + 100].split(b"\0", 1)[0]
    if buf[pos + 345] and buf[pos + 257:pos + 263] == b"ustar\0":  # POSIX ustar: a prefix holds the directories
        name = buf[pos + 345:pos + 500].split(b"\0", 1)[0] + b"/" + name
    return _KINDS.get(buf[pos + 156], OTHER), bytes(name), size, chk


def _split_name(name: bytes) -> tuple[Optional[bytes], str]:
    """webdataset's (key, suffix) of a member name: the key ends at the first dot of the file name."""
    head, _, base = name.rpartition(b"/")
    stem, dot, suffix = base.partition(b".")
    if not dot:
        return None, ""
    return (head + b"/" + stem if head else stem), suffix.decode("utf-8", "surrogateescape")


def _long_name(kind: int, body: bytes, previous: Optional[bytes]) -> Optional[bytes]:
    """The name a GNU long-name member or a pax header gives the member after it."""
    if kind == LONGNAME:
        return body.split(b"\0", 1)[0]
    for rec in body.split(b"\n"):
        _, _, kv = rec.partition(b" ")
        if kv.startswith(b"path="):
            return kv[5:]
    return previous


def parse_span(buf, start: int, end: int, headers: list, stored: list) -> tuple[bytes, dict]:
    """Members of the sample in ``buf[start:end]`` -> (key, {suffix: (data offset, size)}). Header offsets and their
    stored checksums are appended to ``headers`` / ``stored`` (checked in one batch by ``checksums_ok``). Raises
    BadSample unless the members tile the span exactly and share one key."""
    fields, key, pos, longname = {}, None, start, None
    while pos < end:
        if pos + BLOCK > end:
            raise BadSample(f"a tar header crosses the sample's end (byte {end})")
        kind, name, size, chk = parse_header(buf, pos)
        if kind == END:
            raise ArchiveEnded() if pos == start else BadSample("the archive ends inside the sample")
        headers.append(pos)
        stored.append(chk)
        data = pos + BLOCK
        pos = data + -(-size // BLOCK) * BLOCK
        if pos > end:
            raise BadSample(f"member {name!r} runs past the sample's end ({size} bytes of data)")
        if kind == LONGNAME or kind == PAX:
            longname = _long_name(kind, bytes(buf[data:data + size]), longname)
            continue
        if longname is not None:
            name, longname = longname, None
        if kind != FILE:
            continue
        k, suffix = _split_name(name)
        if k is None:
            continue  # webdataset ignores members without a suffix
        if key is None:
            key = k
        elif k != key:
            raise BadSample(f"member {name.decode(errors='replace')!r} belongs to another sample than "
                            f"{key.decode(errors='replace')!r} (misplaced index?)")
        fields[suffix] = (data, size)
    if key is None:
        raise BadSample("no member with a suffix")
    return key, fields


def checksums_ok(buf: bytes, headers: list, stored: list) -> np.ndarray:
    """Tar checksums of the 512-byte blocks at ``headers`` (block-aligned offsets in ``buf``) vs ``stored``."""
    blocks = np.frombuffer(buf, dtype=np.uint8, count=len(buf) // BLOCK * BLOCK).reshape(-1, BLOCK)
    h = blocks[np.asarray(headers, dtype=np.int64) // BLOCK]
    total = h.sum(axis=1, dtype=np.int64) - h[:, 148:156].sum(axis=1, dtype=np.int64) + 8 * 32
    return total == np.asarray(stored, dtype=np.int64)


def coalesce(starts: list, ends: list, groups: list) -> tuple[list[tuple[int, int, int]], list[int]]:
    """Spans sorted by (group, start) -> (byte ranges to read as (group, lo, hi), the range of each span). A span
    joins the current range of its group (file) when the gap before it is at most GAP_FRACTION of the useful bytes
    the range already holds (so at most that fraction is read in vain) and the range stays under MAX_READ."""
    ranges, which = [], []
    g0 = lo = hi = useful = None
    for g, s, e in zip(groups, starts, ends):
        if g == g0 and s - hi <= GAP_FRACTION * useful and e - lo <= MAX_READ:
            hi, useful = max(hi, e), useful + (e - s)
        else:
            if lo is not None:
                ranges.append((g0, lo, hi))
            g0, lo, hi, useful = g, s, e, e - s
        which.append(len(ranges))
    if lo is not None:
        ranges.append((g0, lo, hi))
    return ranges, which


class ShardIndex:
    """Spans of a shard without a stride: from its sidecar file, or from a walk of its tar headers (module doc)."""

    def __init__(self, root: str, entry: dict):
        self.path = os.path.join(root, entry["path"])
        self.count, self.size = int(entry["samples"]), int(entry["bytes"])
        idx = entry.get("index") or {}
        self.sidecar: Optional[str] = os.path.join(root, idx["path"]) if "path" in idx else None
        self.offsets: Optional[np.ndarray] = None  # from a header walk: one entry per sample found, plus the end


def shard_stride(entry: dict, legacy: int) -> int:
    """The stride of a shard's samples from its manifest entry (0: none, use a ShardIndex)."""
    idx = entry.get("index")
    stride = legacy if idx is None else int(idx.get("stride", 0))
    return stride if stride and stride_fits(int(entry["samples"]), stride, int(entry["bytes"])) else 0


class SampleReader:
    """Reads samples by (shard, sample number): coalesced ``pread`` s, checked as the module doc says.

    Counts what it reads (``bytes_read``, ``reads``) so benchmarks can report read amplification. Holds up to
    ``max_open`` shard files open; pickles without them (DataLoader workers reopen their own)."""

    def __init__(self, root: str, entries: list[dict], seq_len: int, dtype: np.dtype, on_corrupt: str = "error",
                 split: str = "", max_open: int = 128):
        self.root, self.entries, self.seq_len, self.split = root, entries, seq_len, split
        self.on_corrupt, self.max_open = on_corrupt, max_open
        self.paths = [os.path.join(root, e["path"]) for e in entries]
        self.counts = np.array([int(e["samples"]) for e in entries], dtype=np.int64)
        # shards written before indexes existed hold one input_ids.npy member per sample: a known stride
        legacy = BLOCK + padded(len(encode_sample(np.zeros(seq_len, dtype=dtype))))
        self.strides = np.array([shard_stride(e, legacy) for e in entries], dtype=np.int64)
        # shards without an index: their stride is derived, and each read checks the sample's key against the one
        # `mdtrain prepare` gave it (its number in the split), so a wrong guess can never deliver a wrong sample
        self.derived = np.array([e.get("index") is None for e in entries], dtype=bool)
        self.first = np.concatenate([[0], np.cumsum(self.counts)])
        self.bytes_read = self.reads = 0
        self._index: dict = {}
        self._fds: OrderedDict = OrderedDict()

    def __getstate__(self):
        return {**self.__dict__, "_fds": OrderedDict()}

    def __del__(self):
        self.close()

    def close(self) -> None:
        while getattr(self, "_fds", None):
            os.close(self._fds.popitem()[1])

    # -- files and indexes

    def _fd(self, path: str) -> int:
        fd = self._fds.pop(path, None)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise DataError(f"{path}: cannot open shard ({e.strerror})") from None
            while len(self._fds) >= self.max_open:
                os.close(self._fds.popitem(last=False)[1])
        self._fds[path] = fd
        return fd

    def _pread(self, path: str, lo: int, hi: int) -> bytes:
        data = os.pread(self._fd(path), hi - lo, lo)
        self.reads += 1
        self.bytes_read += len(data)
        return data

    def _pread_into(self, path: str, lo: int, into: memoryview) -> int:
        fd, got = self._fd(path), 0
        while got < len(into):  # preadv may return short reads (signals, network filesystems)
            n = os.preadv(fd, [into[got:]], lo + got)
            if n == 0:
                break
            got += n
        self.reads += 1
        self.bytes_read += got
        return got

    def _legacy_key(self, s: int, j: int) -> bytes:
        return f"{self.split}-{int(self.first[s]) + j:010d}".encode()

    def _problem(self, path: str, msg: str) -> None:
        if self.on_corrupt == "error":
            raise DataError(f"{path}: {msg}; re-run mdtrain prepare or restore the file "
                            "(data.on_corrupt=skip masks bad samples instead)")

    def _walk(self, ix: ShardIndex) -> np.ndarray:
        """Sample offsets of a shard from its tar headers (once per shard), plus the end of the last sample.
        Stops at the first bad header: the samples after it are missing."""
        offsets, key, pos = [], None, 0
        member_start, pending = None, None  # a long-name / pax header starts the member it names
        while True:
            h = self._pread(ix.path, pos, pos + BLOCK)
            try:
                if len(h) < BLOCK:
                    raise BadSample(f"the file ends at byte {pos + len(h)}")
                kind, name, size, chk = parse_header(h, 0)
                if kind != END and not checksums_ok(h, [0], [chk])[0]:
                    raise BadSample(f"bad tar header checksum at byte {pos}")
            except BadSample as e:
                self._problem(ix.path, f"corrupt or truncated tar shard after {len(offsets)} of {ix.count} samples "
                              f"({e})")
                break
            if kind == END:
                break
            if member_start is None:
                member_start = pos
            if kind == LONGNAME or kind == PAX:
                pending = _long_name(kind, self._pread(ix.path, pos + BLOCK, pos + BLOCK + size), pending)
                pos += BLOCK + padded(size)
                continue
            if pending is not None:
                name, pending = pending, None
            k = _split_name(name)[0] if kind == FILE else None
            if k is not None and k != key:
                offsets.append(member_start)
                key = k
            member_start = None
            pos += BLOCK + padded(size)
        end = pos
        if len(offsets) > ix.count:
            self._problem(ix.path, f"holds more than the {ix.count} samples its manifest lists")
            offsets, end = offsets[:ix.count], offsets[ix.count]
        return np.array(offsets + [end], dtype=np.int64)

    def _spans(self, s: int, js: np.ndarray):
        """(starts, ends, known) of samples ``js`` (sorted, unique) of shard ``s``, which has no stride."""
        if s not in self._index:
            self._index[s] = ShardIndex(self.root, self.entries[s])
        ix = self._index[s]
        if ix.sidecar is not None:  # entries j and j+1 of the sidecar bound sample j
            lo8 = (js * 8).tolist()
            ranges, which = coalesce(lo8, [x + 16 for x in lo8], [0] * len(lo8))
            raw = []
            for _, lo, hi in ranges:
                chunk = self._pread(ix.sidecar, lo, hi)
                if len(chunk) < hi - lo:
                    raise DataError(f"{ix.sidecar}: the sample index is truncated; re-run mdtrain prepare")
                raw.append(np.frombuffer(chunk, dtype=OFFSET_DTYPE).astype(np.int64))
            k = [(x - ranges[r][1]) // 8 for x, r in zip(lo8, which)]
            starts = np.array([raw[r][e] for r, e in zip(which, k)], dtype=np.int64)
            ends = np.array([raw[r][e + 1] for r, e in zip(which, k)], dtype=np.int64)
            if ((starts % BLOCK).any() or (ends <= starts).any() or (ends > ix.size).any()
                    or (starts[1:] < ends[:-1]).any()):
                raise DataError(f"{ix.sidecar}: the sample index does not fit its shard; re-run mdtrain prepare")
            return starts, ends, np.ones(len(js), dtype=bool)
        if ix.offsets is None:
            ix.offsets = self._walk(ix)
        found = len(ix.offsets) - 1
        known = js < found
        if not known.all():
            self._problem(ix.path, f"holds {found} samples, the manifest lists {ix.count} (truncated shard?)")
        safe = np.minimum(js, max(found - 1, 0))
        return ix.offsets[safe], ix.offsets[safe + 1], known

    # -- reading

    def read(self, shards: np.ndarray, js: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Samples ``js[i]`` of shards ``shards[i]`` -> (ids[n, seq_len] int64, ok[n] bool); bad rows are zeros.

        One pass for the whole request: spans in file order, coalesced ranges read into one buffer, every sample
        parsed, all tar header checksums tested in one batch, ids copied out."""
        n, L = len(js), self.seq_len
        ids = np.empty((n, L), dtype=np.int64)
        ok = np.zeros(n, dtype=bool)
        if n == 0:
            return ids, ok
        order = np.lexsort((js, shards))
        us, uj = shards[order], js[order]
        first = np.ones(n, dtype=bool)
        first[1:] = (us[1:] != us[:-1]) | (uj[1:] != uj[:-1])  # a sample asked twice is read once
        us, uj, urow = us[first], uj[first], order[first]
        if (uj >= self.counts[us]).any():
            raise ValueError("sample number past the end of its shard")
        stride = self.strides[us]
        derived = (self.derived[us] & (stride > 0)).tolist()  # read at a derived stride: check the key
        starts = uj * stride
        ends = starts + stride
        known = np.ones(len(uj), dtype=bool)
        for s in np.unique(us[stride == 0]).tolist():
            at = np.flatnonzero(us == s)
            starts[at], ends[at], known[at] = self._spans(s, uj[at])
        ids[urow[~known]] = 0
        kn = np.flatnonzero(known)
        ranges, which = coalesce(starts[kn].tolist(), ends[kn].tolist(), us[kn].tolist())
        buf = bytearray(sum(hi - lo for _, lo, hi in ranges))
        view = memoryview(buf)
        shift, stop, at = [], [], 0  # per range: file offset -> buf offset, and where the file's bytes ended
        for s, lo, hi in ranges:
            got = self._pread_into(self.paths[s], lo, view[at:at + hi - lo])
            shift.append(at - lo)
            stop.append(lo + got)
            at += hi - lo
        view.release()
        headers, stored, owner, good, retry = [], [], [], [], []
        for i, r, lo, hi in zip(kn.tolist(), which, starts[kn].tolist(), ends[kn].tolist()):
            mark = len(headers)
            try:
                if hi > stop[r]:
                    raise Truncated(f"corrupt or truncated tar shard: sample {int(uj[i])} (bytes {lo}-{hi}) lies "
                                    f"past the end of the file at byte {stop[r]}")
                key, fields = parse_span(buf, lo + shift[r], hi + shift[r], headers, stored)
                if derived[i] and key != self._legacy_key(int(us[i]), int(uj[i])):
                    raise BadSample(f"key {key.decode(errors='replace')!r} is not the one `mdtrain prepare` gave "
                                    "this sample")
                if SUFFIX not in fields:
                    raise BadSample(f"no {SUFFIX} member")
                dtype, count, start = _npy_layout(buf, *fields[SUFFIX])
                if count != L:
                    raise BadSample(f"{count} tokens, the manifest's seq_len is {L}")
            except BadSample as e:
                del headers[mark:], stored[mark:]
                ids[urow[i]] = 0
                j, path = int(uj[i]), self.paths[int(us[i])]
                if derived[i]:
                    self.strides[us[i]] = 0  # the derived layout does not hold: walk this shard's headers instead
                    retry.append(i)
                    continue
                if isinstance(e, Truncated):
                    self._problem(path, str(e))
                elif isinstance(e, ArchiveEnded):
                    self._problem(path, f"holds {j} samples, the manifest lists {int(self.counts[us[i]])} (the archive "
                                  f"ends at byte {lo}; truncated shard?)")
                else:
                    self._problem(path, f"sample {j} (bytes {lo}-{hi}) is bad: {e}")
                continue
            owner.extend([len(good)] * (len(headers) - mark))
            good.append((i, dtype, start))
        fine = np.ones(len(good), dtype=bool)
        if headers:
            for g in np.unique(np.asarray(owner)[~checksums_ok(buf, headers, stored)]).tolist():
                fine[g] = False
                i = good[g][0]
                ids[urow[i]] = 0
                self._problem(self.paths[int(us[i])], f"sample {int(uj[i])} (bytes {int(starts[i])}-{int(ends[i])}) is "
                              "bad: tar header checksum mismatch")
        rows = urow.tolist()
        for (i, dtype, start), f in zip(good, fine.tolist()):
            if f:
                ids[rows[i]] = np.frombuffer(buf, dtype=dtype, count=L, offset=start)
                ok[rows[i]] = True
        if retry:
            ids[urow[retry]], ok[urow[retry]] = self.read(us[retry], uj[retry])
        if not first.all():
            src = np.empty(n, dtype=np.int64)
            src[order] = urow[np.cumsum(first) - 1]
            dup = np.flatnonzero(src != np.arange(n))
            ids[dup], ok[dup] = ids[src[dup]], ok[src[dup]]
        return ids, ok


_NPY_HEADERS: dict = {}


def _npy_layout(data: bytes, off: int, size: int) -> tuple[np.dtype, int, int]:
    """(dtype, length, offset of the values) of the 1-D ``.npy`` array stored at ``data[off:off+size]``."""
    if data[off:off + 6] != b"\x93NUMPY":
        raise BadSample("not a .npy array")
    major = data[off + 6]
    hlen = (10 + int.from_bytes(data[off + 8:off + 10], "little") if major == 1
            else 12 + int.from_bytes(data[off + 8:off + 12], "little"))
    header = bytes(data[off:off + hlen])
    parsed = _NPY_HEADERS.get(header)
    if parsed is None:
        f = io.BytesIO(header)
        try:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
        except ValueError as e:
            raise BadSample(f"unreadable .npy header ({e})") from None
        if fortran or dtype.hasobject or len(shape) != 1 or dtype.kind not in "iu":
            raise BadSample(f"expected a 1-D integer array, got shape {shape} dtype {dtype}")
        parsed = _NPY_HEADERS[header] = (dtype, int(shape[0]))
    dtype, n = parsed
    if size - hlen != n * dtype.itemsize:
        raise BadSample(f"array data is {size - hlen} bytes, its header says {n * dtype.itemsize}")
    return dtype, n, off + hlen
