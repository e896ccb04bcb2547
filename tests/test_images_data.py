"""`mdtrain prepare --images`: PNG/JPEG folders, CIFAR python batches and .npy arrays -> pixel-token shards.

Expected tokens are rebuilt here from the source pixels with the explicit raster formula
token[(y·W + x)·C + c] = image[y, x, c]; shards are read back with the standard library's tarfile. The CIFAR
batches are written byte by byte the way Python 2's cPickle wrote the originals (opcodes emitted by this file,
not by pickle), and the payload tests check that nothing in a hostile pickle ever runs.
"""
import io
import json
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest
from PIL import Image

from mdtrain.cli import main as cli_main
from mdtrain.data.config import DataConfig
from mdtrain.data.errors import DataError
from mdtrain.data.images import MASK_ID, prepare_images, read_split_labels
from mdtrain.data.loader import build_loader
from mdtrain.data.safe_pickle import UnsafePickleError, load_plain_pickle


def raster_tokens(img: np.ndarray) -> np.ndarray:
    h, w, c = img.shape
    out = np.empty(h * w * c, dtype=np.int64)
    for y in range(h):
        for x in range(w):
            for ch in range(c):
                out[(y * w + x) * c + ch] = img[y, x, ch]
    return out


def read_split(out, split):
    """(manifest, samples (N, L) int64) via tarfile, in shard order."""
    m = json.load(open(os.path.join(out, "manifest.json")))
    rows = []
    for sh in m["splits"][split]["shards"]:
        with tarfile.open(os.path.join(out, sh["path"])) as tf:
            rows += [np.load(io.BytesIO(tf.extractfile(t).read())) for t in tf.getmembers() if t.isfile()]
    return m, (np.stack(rows).astype(np.int64) if rows else np.zeros((0, m["seq_len"]), np.int64))


def labels_of(out, split):
    return np.load(os.path.join(out, split, "labels.npy"))


def photo_patches(size=32, limit=None):
    """32x32 RGB patches of Grace Hopper's portrait (matplotlib's sample data: a real photograph)."""
    import matplotlib.cbook as cbook
    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
        arr = np.asarray(im.convert("RGB"))
    patches = [arr[y:y + size, x:x + size] for y in range(0, arr.shape[0] - size + 1, size)
               for x in range(0, arr.shape[1] - size + 1, size)]
    return patches[:limit]


# ---------------------------------------------------------------------------------------------------------------------
# folders of PNG / JPEG files


def test_folder_of_photo_patches_in_class_folders_round_trips_in_raster_order(tmp_path):
    patches = photo_patches(limit=60)
    src = tmp_path / "photos"
    expected = {}  # raster tokens (bytes) -> class name
    for i, p in enumerate(patches):
        cls = ["zebra", "apple", "mango"][i % 3]  # sorted: apple=0, mango=1, zebra=2
        (src / cls).mkdir(parents=True, exist_ok=True)
        path = src / cls / f"{i:03d}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(p).save(path, quality=95)
        with Image.open(path) as im:  # a JPEG is lossy: what Pillow decodes is what must be stored
            expected[raster_tokens(np.asarray(im)).tobytes()] = cls
    out = str(tmp_path / "out")
    m = prepare_images([str(src)], out, val_fraction=0.25, samples_per_shard=16, quiet=True)
    assert m["image"] == {"shape": [32, 32, 3], "num_classes": 3, "class_names": ["apple", "mango", "zebra"],
                          "source": "folder"}
    assert m["seq_len"] == 3072 and m["vocab_size"] == 257 and m["specials"]["mask"] == MASK_ID
    seen = []
    for split in ("train", "valid"):
        _, rows = read_split(out, split)
        labels = labels_of(out, split)
        assert len(rows) == len(labels) == m["splits"][split]["num_samples"] > 0
        for r, lab in zip(rows, labels):
            assert r.max() < 256
            assert m["image"]["class_names"][lab] == expected[r.tobytes()]
            seen.append(r.tobytes())
    assert sorted(seen) == sorted(expected)  # every image exactly once
    # the write order is shuffled: shards are not class-sorted like the folders
    train_labels = labels_of(out, "train")
    assert len(set(train_labels[:16].tolist())) > 1

    # the loader hands out each row with its own label, also through the shuffled train order
    loader = build_loader(DataConfig(train=out, seq_len=3072), "train", 8, 0, 1, seed=3, infinite=True)
    it = iter(loader)
    for _ in range(4):
        b = next(it)
        for r, lab in zip(b["input_ids"].numpy(), b["labels"].numpy()):
            assert m["image"]["class_names"][lab] == expected[r.astype(np.int64).tobytes()]


def test_hash_split_is_deterministic_and_a_flat_folder_has_no_labels(tmp_path):
    src = tmp_path / "flat"
    src.mkdir()
    for i, p in enumerate(photo_patches(limit=24)):
        Image.fromarray(p).save(src / f"{i}.png")
    a = prepare_images([str(src)], str(tmp_path / "a"), val_fraction=0.3, seed=5, quiet=True)
    b = prepare_images([str(src)], str(tmp_path / "b"), val_fraction=0.3, seed=5, quiet=True)
    digests = [[s["sha256"] for s in m["splits"]["valid"]["shards"]] for m in (a, b)]
    assert digests[0] == digests[1]
    assert a["image"]["num_classes"] == 0 and "labels" not in a["splits"]["train"]
    assert 0 < a["splits"]["valid"]["num_samples"] < 24
    loader = build_loader(DataConfig(train=str(tmp_path / "a"), seq_len=3072), "valid", 4, 0, 1, seed=0,
                          infinite=False)
    batch = next(iter(loader))
    assert "labels" not in batch and bool(batch["attention_mask"].all())


def test_bad_images_are_errors_naming_the_file_or_skipped_and_counted(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    good = photo_patches(limit=6)
    for i, p in enumerate(good):
        Image.fromarray(p).save(src / f"good{i}.png")
    full = (src / "good0.png").read_bytes()
    (src / "truncated.png").write_bytes(full[: len(full) // 2])
    Image.fromarray(good[0][:16]).save(src / "small.png")
    Image.fromarray(np.dstack([good[1], np.full((32, 32), 255, np.uint8)]), mode="RGBA").save(src / "alpha.png")
    (src / "notanimage.jpg").write_bytes(b"this is text, not a JPEG")
    for name, why in (("truncated.png", "cannot decode"), ("small.png", "32x16 pixels"),
                      ("alpha.png", "mode RGBA"), ("notanimage.jpg", "cannot decode")):
        sub = tmp_path / f"only_{name}"
        sub.mkdir()
        for i in range(2):
            Image.fromarray(good[i]).save(sub / f"a{i}.png")  # sorted first: they fix the expected size
        (sub / name).write_bytes((src / name).read_bytes())
        with pytest.raises(DataError, match=rf"{name}: .*{why}.*--on-corrupt skip"):
            prepare_images([str(sub)], str(tmp_path / f"out_{name}"), image_size="32x32x3", quiet=True)
        assert not os.path.exists(tmp_path / f"out_{name}" / "manifest.json")
    m = prepare_images([str(src)], str(tmp_path / "skip"), image_size="32x32", on_corrupt="skip", val_fraction=0,
                       quiet=True)
    assert m["skipped_images"] == 4 and len(m["skipped_examples"]) == 4
    _, rows = read_split(str(tmp_path / "skip"), "train")
    assert sorted(r.tobytes() for r in rows) == sorted(raster_tokens(p).tobytes() for p in good)


def test_cli_prepare_images_and_text_needs_a_tokenizer(tmp_path, capsys):
    src = tmp_path / "g"
    src.mkdir()
    for i, p in enumerate(photo_patches(size=8, limit=10)):
        Image.fromarray(p[:, :, 0]).save(src / f"{i}.png")  # grayscale: mode L, one channel
    out = str(tmp_path / "out")
    assert cli_main(["prepare", "--images", "--input", str(src), "--out", out, "--val-fraction", "0"]) == 0
    assert "8x8x1 = 64 pixel tokens per image" in capsys.readouterr().out
    assert cli_main(["prepare", "--images", "--input", str(src), "--out", str(tmp_path / "o2"),
                     "--seq-len", "100"]) == 1
    assert "--seq-len 100 does not match" in capsys.readouterr().err
    assert cli_main(["prepare", "--input", str(src), "--out", str(tmp_path / "o3")]) == 1
    assert "text needs --tokenizer and --seq-len" in capsys.readouterr().err
    assert cli_main(["prepare", "--images", "--tokenizer", "bytes", "--input", str(src),
                     "--out", str(tmp_path / "o4")]) == 1
    assert "leave --tokenizer out" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# CIFAR python batches


class Py2Pickle:
    """Emit protocol-2 opcodes as Python 2's cPickle did for CIFAR's dicts (str = SHORT_BINSTRING/BINSTRING, numpy
    1.x arrays through numpy.core.multiarray._reconstruct + BUILD). No memo opcodes (they are optional)."""

    def __init__(self):
        self.b = bytearray(b"\x80\x02")

    def str_(self, s: bytes):
        self.b += (b"U" + bytes([len(s)]) if len(s) < 256 else b"T" + struct.pack("<i", len(s))) + s

    def int_(self, v: int):
        self.b += b"J" + struct.pack("<i", v)

    def tuple_(self, items):
        self.b += b"("
        for v in items:
            self.obj(v)
        self.b += b"t"

    def array(self, a: np.ndarray):
        self.b += b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
        self.b += b"K\x00\x85"   # (0,)
        self.str_(b"b")
        self.b += b"\x87R"      # TUPLE3 REDUCE
        self.b += b"(K\x01"     # state = (1, shape, dtype, is_fortran, raw)
        self.tuple_(list(a.shape))
        self.b += b"cnumpy\ndtype\n"
        self.str_(a.dtype.str[1:].encode())
        self.b += b"K\x00K\x01\x87R"
        self.b += b"(K\x03" + b"U\x01" + a.dtype.str[:1].encode() + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        self.b += b"\x89"
        self.str_(a.tobytes())
        self.b += b"tb"

    def obj(self, v):
        if isinstance(v, bytes):
            self.str_(v)
        elif isinstance(v, bool):
            self.b += b"\x88" if v else b"\x89"
        elif isinstance(v, int):
            self.int_(v)
        elif isinstance(v, list):
            self.b += b"]("
            for x in v:
                self.obj(x)
            self.b += b"e"
        elif isinstance(v, tuple):
            self.tuple_(v)
        elif isinstance(v, np.ndarray):
            self.array(v)
        elif isinstance(v, dict):
            self.b += b"}("
            for k, x in v.items():
                self.obj(k)
                self.obj(x)
            self.b += b"u"
        else:
            raise TypeError(type(v))

    def dumps(self, v) -> bytes:
        self.obj(v)
        return bytes(self.b + b".")


def cifar_batch(rng, n, label_key=b"labels"):
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).tolist()
    return {b"batch_label": b"training batch 1 of 5", label_key: labels, b"data": data,
            b"filenames": [f"img_{i}.png".encode() for i in range(n)]}


def test_cifar_python_batches_official_split_labels_and_channel_interleaving(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    batches = {"data_batch_1": cifar_batch(rng, 7), "data_batch_2": cifar_batch(rng, 5),
               "test_batch": cifar_batch(rng, 6)}
    for name, b in batches.items():
        (d / name).write_bytes(Py2Pickle().dumps(b))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (d / "batches.meta").write_bytes(Py2Pickle().dumps({b"label_names": names, b"num_cases_per_batch": 10000,
                                                        b"num_vis": 3072}))
    out = str(tmp_path / "out")
    m = prepare_images([str(d)], out, val_fraction=0.5, quiet=True)  # the official split wins over the fraction
    assert m["image"]["class_names"] == [n.decode() for n in names] and m["image"]["num_classes"] == 10
    for split, sources in (("train", ["data_batch_1", "data_batch_2"]), ("valid", ["test_batch"])):
        want = {}
        for s in sources:
            for row, lab in zip(batches[s][b"data"], batches[s][b"labels"]):
                tok = np.empty(3072, np.int64)  # CIFAR rows: 1024 R, 1024 G, 1024 B, each row-major
                for c in range(3):
                    for y in range(32):
                        for x in range(32):
                            tok[(y * 32 + x) * 3 + c] = row[c * 1024 + y * 32 + x]
                want[tok.tobytes()] = lab
        _, rows = read_split(out, split)
        labels = read_split_labels(out, m, split)
        assert len(rows) == len(want)
        assert {r.tobytes(): int(lab) for r, lab in zip(rows, labels)} == want

    # CIFAR-100's layout: train / test / meta with fine labels; "train" is recognised only beside its meta file
    d100 = tmp_path / "cifar-100-python"
    d100.mkdir()
    (d100 / "train").write_bytes(Py2Pickle().dumps(cifar_batch(rng, 4, b"fine_labels")))
    (d100 / "test").write_bytes(Py2Pickle().dumps(cifar_batch(rng, 2, b"fine_labels")))
    (d100 / "meta").write_bytes(Py2Pickle().dumps({b"fine_label_names": [b"c%d" % i for i in range(100)]}))
    m = prepare_images([str(d100)], str(tmp_path / "out100"), quiet=True)
    assert m["image"]["num_classes"] == 100 and m["image"]["class_names"][99] == "c99"
    assert (m["splits"]["train"]["num_samples"], m["splits"]["valid"]["num_samples"]) == (4, 2)


def test_python3_pickles_of_numpy_arrays_load_like_pickle_itself():
    rng = np.random.default_rng(1)
    value = {b"data": rng.integers(0, 256, (3, 5), dtype=np.uint8), "f": rng.standard_normal((2, 2)),
             "big": np.arange(6, dtype=">i4").reshape(3, 2, order="F"), "labels": [1, 2, 3], "t": (1.5, None, b"x")}
    for protocol in (2, 4, 5):
        raw = pickle.dumps(value, protocol=protocol)
        ours, theirs = load_plain_pickle(raw), pickle.loads(raw)  # our own, harmless data: safe to compare
        assert ours.keys() == theirs.keys()
        for k in theirs:
            if isinstance(theirs[k], np.ndarray):
                same_type = ours[k].dtype.newbyteorder("=") == theirs[k].dtype.newbyteorder("=")  # numpy may swap
                assert same_type and np.array_equal(ours[k], theirs[k]), (protocol, k)
            else:
                assert ours[k] == theirs[k]


class _Payload:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


def test_a_code_executing_pickle_is_refused_naming_the_file_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    (d / "batches.meta").write_bytes(Py2Pickle().dumps({b"label_names": [b"a"]}))
    payloads = {
        "protocol 0 os.system": f"cos\nsystem\n(S'touch {marker}'\ntR.".encode(),
        "reduce inside the dict": pickle.dumps({b"data": _Payload(f"touch {marker}"), b"labels": []}, protocol=2),
        "builtins.eval": pickle.dumps({b"x": _Eval(f"open('{marker}', 'w')")}, protocol=4),
        "object array": pickle.dumps({b"data": np.array([_Payload(f"touch {marker}")], dtype=object)}, protocol=2),
    }
    for what, raw in payloads.items():
        (d / "data_batch_1").write_bytes(raw)
        with pytest.raises(DataError, match=r"data_batch_1: refused to unpickle") as e:
            prepare_images([str(d)], str(tmp_path / "out"), quiet=True)
        assert not marker.exists(), f"{what}: the payload ran"
        assert "system" in str(e.value) or "eval" in str(e.value), (what, str(e.value))
    with pytest.raises(UnsafePickleError, match="kind 'O'.* not a plain numeric type"):
        load_plain_pickle(pickle.dumps(np.array([1, "a"], dtype=object), protocol=4))
    (d / "data_batch_1").write_bytes(Py2Pickle().dumps(cifar_batch(np.random.default_rng(0), 3))[:500])
    with pytest.raises(DataError, match="data_batch_1: not a readable CIFAR python batch"):
        prepare_images([str(d)], str(tmp_path / "out2"), quiet=True)
    assert not marker.exists()


class _Eval:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return eval, (self.code,)


# ---------------------------------------------------------------------------------------------------------------------
# .npy arrays


def test_npy_arrays_with_labels_grayscale_and_refused_object_arrays(tmp_path):
    rng = np.random.default_rng(2)
    imgs = rng.integers(0, 256, (9, 4, 6, 3), dtype=np.uint8)
    np.save(tmp_path / "part1.npy", imgs[:5])
    np.save(tmp_path / "part2.npy", imgs[5:])
    labels = rng.integers(0, 4, 9)
    np.save(tmp_path / "part1.labels.npy", labels[:5])
    np.save(tmp_path / "part2.labels.npy", labels[5:])
    out = str(tmp_path / "out")
    m = prepare_images([str(tmp_path / "part1.npy"), str(tmp_path / "part2.npy")], out, val_fraction=0, quiet=True)
    assert m["image"]["shape"] == [4, 6, 3] and m["image"]["num_classes"] == int(labels.max()) + 1
    _, rows = read_split(out, "train")
    got = {r.tobytes(): int(lab) for r, lab in zip(rows, labels_of(out, "train"))}
    assert got == {raster_tokens(im).tobytes(): int(lab) for im, lab in zip(imgs, labels)}

    gray = rng.integers(0, 256, (3, 5, 5), dtype=np.uint8)
    np.save(tmp_path / "gray.npy", gray)
    m = prepare_images([str(tmp_path / "gray.npy")], str(tmp_path / "g"), val_fraction=0, quiet=True)
    assert m["image"]["shape"] == [5, 5, 1] and m["seq_len"] == 25

    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"objects\.npy: not a readable \.npy array"):
        prepare_images([str(tmp_path / "objects.npy")], str(tmp_path / "o"), quiet=True)
    np.save(tmp_path / "floats.npy", np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(DataError, match=r"floats\.npy: expected uint8 images"):
        prepare_images([str(tmp_path / "floats.npy")], str(tmp_path / "f"), quiet=True)
    with pytest.raises(DataError, match="inputs mix image sources"):
        prepare_images([str(tmp_path / "gray.npy"), str(tmp_path)],
                       str(tmp_path / "mix"), quiet=True)
