"""Random access into the shards: the order is the documented function of seeds and position (so checkpoints taken
before this reader resume the same), each rank reads only its own samples, shards of every index kind (stride,
sidecar, none: prepared before indexes, or foreign tars) give the same samples, extra fields are skipped, and
damage is caught when a sample is read.

Expected samples come from the numbered-sample datasets of test_data_loader, from Python's tarfile, or from the
module doc's recipe recomputed here with numpy directly, never from the reader under test.
"""
import io
import json
import os
import tarfile

import numpy as np
import pytest

from mdtrain.data.config import DataConfig
from mdtrain.data.errors import DataError
from mdtrain.data.loader import build_loader
from mdtrain.data.shard_index import GAP_FRACTION, MAX_READ, coalesce
from mdtrain.data.shards import FORMAT, FORMAT_VERSION, ShardWriter, file_sha256, write_manifest
from mdtrain.data.tokenizers import BytesTokenizer
from tests.test_data_loader import L, cfg, ids_of, make_dataset, sample, take


def _manifest(root, shards, n):
    tok = BytesTokenizer()
    tok.save(os.path.join(root, "tokenizer"))
    split = {"num_samples": n, "num_documents": n, "doc_tokens": n * L, "num_tokens": n * L, "dropped_tokens": 0,
             "truncated_documents": 0, "shards": shards}
    empty = {**split, "num_samples": 0, "num_documents": 0, "doc_tokens": 0, "num_tokens": 0, "shards": []}
    write_manifest(root, {"format": FORMAT, "version": FORMAT_VERSION, "seq_len": L, "packing": "md4",
                          "dtype": "uint16", "tokenizer": "tokenizer", "vocab_size": tok.vocab_size,
                          "specials": tok.special_ids, "splits": {"train": split, "valid": empty}})


def _edit_manifest(root, fn):
    path = os.path.join(root, "manifest.json")
    m = json.load(open(path))
    fn(m)
    json.dump(m, open(path, "w"))


def _stream(data, dp, B, steps, seed=0, **kw):
    """The global stream over ``steps`` steps: rank order within each step, as the trainer's ranks consume it."""
    per_rank = [take(build_loader(cfg(data, **kw), "train", B, r, dp, seed=seed), steps) for r in range(dp)]
    return [i for s in range(steps) for r in range(dp) for i in per_rank[r][s]]


def test_order_is_the_documented_function_of_seeds_and_position(tmp_path):
    """Recompute the order from the loader's module doc with numpy (shards permuted per epoch, windows of 2 shards,
    samples permuted per window) and read the samples with tarfile: a checkpoint's position means the same samples
    as before random access."""
    data = make_dataset(str(tmp_path / "d"))
    m = json.load(open(os.path.join(data, "manifest.json")))
    shards = m["splits"]["train"]["shards"]
    contents = []
    for sh in shards:  # the numbered samples of each shard, via tarfile
        with tarfile.open(os.path.join(data, sh["path"])) as tf:
            rows = [np.load(io.BytesIO(tf.extractfile(t).read())) for t in tf.getmembers() if t.isfile()]
        contents.append([int(r[0]) * 250 + int(r[1]) for r in rows])
    key = (0, 7)  # (data.seed, train.seed)
    expected = []
    for e in range(2):
        order = np.random.default_rng(key + (e,)).permutation(len(shards))
        for w, lo in enumerate(range(0, len(shards), 2)):
            window = [i for k in order[lo:lo + 2] for i in contents[k]]
            perm = np.random.default_rng(key + (e, 1 << 20, w)).permutation(len(window))
            expected += [window[p] for p in perm]
    dp, B = 3, 2
    steps = len(expected) // (dp * B)
    assert _stream(data, dp, B, steps, seed=7) == expected[:steps * dp * B]


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """2,048 numbered samples in 32 shards of 64 (stride 1,024 bytes)."""
    return make_dataset(str(tmp_path_factory.mktemp("wide") / "d"), n_train=2048, n_valid=4, per_shard=64)


def _rchar():
    with open("/proc/self/io") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("rchar:"))


def test_each_rank_reads_only_its_own_samples(wide):
    """Rank 3 of 8 over one epoch: the kernel's count of bytes this process read (and the reader's own count) stays
    within the coalescing bound of its own samples' bytes, an eighth of the dataset; dp=1 reads each sample once."""
    stride = json.load(open(os.path.join(wide, "manifest.json")))["splits"]["train"]["shards"][0]["index"]["stride"]
    B, N = 4, 2048
    for dp, rank in ((1, 0), (8, 3)):
        loader = build_loader(DataConfig(train=wide, seq_len=L, shuffle_window=4, prefetch=1), "train", B, rank, dp,
                              seed=0, infinite=False)
        before = _rchar()
        got = [i for b in loader for i in ids_of(b)]
        kernel = _rchar() - before
        own = N // dp
        assert sorted(got) == sorted(set(got)) and len(got) == own  # its own share, once
        reader = loader.source.reader
        assert own * stride <= reader.bytes_read <= (1 + GAP_FRACTION) * own * stride
        assert kernel <= (1 + GAP_FRACTION) * own * stride + 64 * 1024  # the whole dataset is 2 MiB
        if dp == 8:
            assert kernel < N * stride / 4


def test_shards_without_index_read_the_same_samples(wide):
    """A dataset prepared before indexes existed (same tar bytes, no "index" in the manifest) gives the same
    stream, reading no more bytes."""
    with_index = _stream(wide, 2, 4, 40)
    import shutil

    legacy = wide + "-legacy"
    shutil.copytree(wide, legacy)
    _edit_manifest(legacy, lambda m: [sh.pop("index") for s in m["splits"].values() for sh in s["shards"]])
    assert _stream(legacy, 2, 4, 40) == with_index
    a, b = (build_loader(cfg(d), "train", 4, 1, 2, seed=0, infinite=False) for d in (wide, legacy))
    assert [ids_of(x) for x in a] == [ids_of(x) for x in b]  # one whole pass each
    assert b.source.reader.bytes_read == a.source.reader.bytes_read and not b.source.reader._index  # no walk


def _write_with_extras(root, n, per_shard, variable):
    w = ShardWriter(root, "train", per_shard)
    rng = np.random.default_rng(0)
    for i in range(n):
        extra = {"roles.npy": (np.arange(L) % 3).astype(np.uint8), "cls": str(i % 10).encode()}
        if variable:
            extra["txt"] = b"x" * int(rng.integers(0, 1500))  # spans of 1 to 4 blocks
        w.write(sample(i), extra)
    shards = w.close()
    _manifest(root, shards, n)
    return shards


@pytest.mark.parametrize("variable", [False, True])
def test_extra_fields_fixed_or_variable_size(tmp_path, variable):
    """Samples with extra members: equal sizes give a stride index, unequal ones a sidecar of offsets; either
    way every sample is read exactly once per epoch and the extras do not leak into the ids."""
    root = str(tmp_path / "x")
    shards = _write_with_extras(root, 61, 13, variable)
    kinds = {("stride" if "stride" in sh["index"] else "sidecar") for sh in shards}
    assert kinds == ({"sidecar"} if variable else {"stride"})
    with tarfile.open(os.path.join(root, shards[0]["path"])) as tf:  # tarfile sees the extra members
        assert [t.name for t in tf.getmembers()][:3] == ["train-0000000000.cls", "train-0000000000.input_ids.npy",
                                                        "train-0000000000.roles.npy"]
    stream = _stream(root, 2, 3, 2 * -(-61 // 6), num_workers=1)
    assert sorted(stream[:61]) == list(range(61)) and sorted(stream[61:122]) == list(range(61))


def test_sidecar_index_is_verified(tmp_path):
    root = str(tmp_path / "x")
    shards = _write_with_extras(root, 30, 13, variable=True)
    side = os.path.join(root, shards[1]["index"]["path"])
    raw = bytearray(open(side, "rb").read())
    raw[8 * 3:8 * 4] = (12345 * 512).to_bytes(8, "little")  # same size: only sha256 or a read notices
    open(side, "wb").write(bytes(raw))
    with pytest.raises(DataError, match=r"shard-000001\.tar\.idx: sha256 differs"):
        build_loader(cfg(root, verify="sha256"), "train", 4, 0, 1, seed=0)
    with pytest.raises(DataError, match=r"shard-000001\.tar\.idx: the sample index does not fit its shard"):
        take(build_loader(cfg(root), "train", 30, 0, 1, seed=0), 1)
    os.remove(side)
    with pytest.raises(DataError, match=r"shard-000001\.tar\.idx: sample index listed in .* is missing"):
        build_loader(cfg(root), "train", 4, 0, 1, seed=0)


def _npy(arr):
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def test_foreign_tars_without_index_are_walked(tmp_path):
    """Shards written by another tool: GNU long names, pax headers, ustar prefixes, a directory member, extra
    members of random sizes. No index, so the reader walks the headers; it must find every sample."""
    root = str(tmp_path / "f")
    os.makedirs(os.path.join(root, "train"))
    rng = np.random.default_rng(1)
    shards, i = [], 0
    for k, fmt in enumerate((tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT)):
        path = os.path.join(root, "train", f"shard-{k:06d}.tar")
        with tarfile.open(path, "w", format=fmt) as tf:
            d = tarfile.TarInfo("somedir")
            d.type = tarfile.DIRTYPE
            tf.addfile(d)
            for _ in range(9):
                deep = "a" * 60 + "/" + "b" * 50 if fmt == tarfile.USTAR_FORMAT else "x" * 130
                name = f"{deep}/s{i:05d}" if i % 3 == 0 else f"s{i:05d}"
                for suffix, body in (("input_ids.npy", _npy(sample(i))), ("json", b"{}" * int(rng.integers(0, 900)))):
                    info = tarfile.TarInfo(f"{name}.{suffix}")
                    info.size = len(body)
                    tf.addfile(info, io.BytesIO(body))
                i += 1
        shards.append({"path": f"train/shard-{k:06d}.tar", "samples": 9, "bytes": os.path.getsize(path),
                       "sha256": file_sha256(path)})
    _manifest(root, shards, 27)
    stream = _stream(root, 1, 27, 2)
    assert sorted(stream[:27]) == list(range(27)) and sorted(stream[27:]) == list(range(27))


def test_damage_is_caught_when_read_and_only_damaged_samples_are_masked(tmp_path):
    data = make_dataset(str(tmp_path / "d"))  # 13 samples per shard, 1,024 bytes each
    path = os.path.join(data, "train", "shard-000002.tar")  # samples 26..38
    raw = bytearray(open(path, "rb").read())
    raw[5 * 1024 + 512:5 * 1024 + 518] = b"\x00NUMPY"  # sample 31's .npy magic; the tar header is intact
    raw[9 * 1024 + 124] = ord("7")  # sample 35: its size field no longer matches its header checksum
    open(path, "wb").write(bytes(raw))
    loader = build_loader(cfg(data, on_corrupt="skip"), "train", 61, 0, 1, seed=0)
    got = take(loader, 1)[0]
    assert sorted(i for i in got if i >= 0) == sorted(set(range(61)) - {31, 35}) and loader.skipped_samples == 2
    with pytest.raises(DataError, match=r"shard-000002\.tar: sample 5 \(bytes 5120-6144\) is bad: not a \.npy"):
        take(build_loader(cfg(data), "train", 61, 0, 1, seed=0), 1)
    truncated = os.path.join(data, "train", "shard-000003.tar")  # samples 39..51: keep 4 whole ones and a half
    raw = open(truncated, "rb").read()
    open(truncated, "wb").write(raw[:4 * 1024 + 700])
    loader = build_loader(cfg(data, on_corrupt="skip", verify="none"), "train", 61, 0, 1, seed=0)
    got = take(loader, 1)[0]
    assert sorted(i for i in got if i >= 0) == sorted(set(range(61)) - {31, 35} - set(range(43, 52)))


def test_coalesced_reads_cover_each_span_once_within_the_waste_bound():
    rng = np.random.default_rng(3)
    sizes = rng.integers(1, 8, 400) * 512
    gaps = rng.choice([0, 512, 4096, 1 << 20], 400)
    starts = np.cumsum(gaps + np.concatenate([[0], sizes[:-1]]))
    ends = starts + sizes
    groups = np.repeat([0, 1, 2, 3], 100)
    ranges, which = coalesce(starts.tolist(), ends.tolist(), groups.tolist())
    for k, (s, e, g) in enumerate(zip(starts, ends, groups)):
        rg, lo, hi = ranges[which[k]]
        assert rg == g and lo <= s and e <= hi  # inside its range, in its own file
    useful = sum(int(e - s) for s, e in zip(starts, ends))
    read = sum(hi - lo for _, lo, hi in ranges)
    assert useful <= read <= (1 + GAP_FRACTION) * useful
    assert all(hi - lo <= MAX_READ for _, lo, hi in ranges)
    for k in range(399):  # touching spans of one file always share a read
        if gaps[k + 1] == 0 and groups[k] == groups[k + 1] and ends[k + 1] - starts[k] <= MAX_READ:
            assert which[k] == which[k + 1]
    assert all(ranges[k][2] <= ranges[k + 1][1] or ranges[k][0] != ranges[k + 1][0] for k in range(len(ranges) - 1))


def test_a_wrong_derived_stride_never_delivers_a_wrong_sample(tmp_path):
    """No index, and a layout whose size happens to fit the stride derived for prepare's old shards (4 samples of
    1,024 bytes) though sample 1 carries an extra 1,024-byte member: read at j·1,024, sample 3 would be sample 2
    again. The key check notices, the shard is walked instead, and the epoch holds each sample once."""
    root = str(tmp_path / "w")
    os.makedirs(os.path.join(root, "train"))
    path = os.path.join(root, "train", "shard-000000.tar")
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for i in range(4):
            members = [("input_ids.npy", _npy(sample(i)))] + ([("zextra", b"z" * 300)] if i == 1 else [])
            for suffix, body in members:
                info = tarfile.TarInfo(f"train-{i:010d}.{suffix}")
                info.size = len(body)
                tf.addfile(info, io.BytesIO(body))
    _manifest(root, [{"path": "train/shard-000000.tar", "samples": 4, "bytes": os.path.getsize(path),
                      "sha256": file_sha256(path)}], 4)
    assert sorted(_stream(root, 1, 4, 1)) == [0, 1, 2, 3]
