"""`mdtrain prepare`: input formats, packing modes, manifest counts and checksums, bad-input errors.

The expected samples are rebuilt here from the documents with plain Python (bytes tokenizer), and the shards are
read back with the standard library's tarfile, independently of mdtrain's reader.
"""
import collections
import gzip
import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pytest

from mdtrain.cli import main as cli_main
from mdtrain.data.errors import DataError
from mdtrain.data.prepare import prepare

BYTES = {"mask": 256, "bos": 257, "eos": 258, "pad": 259}
DOCS = [f"document {i}: " + "lorem ipsum dolor sit amet, ünïcödé 漢字 " * (1 + i % 7) for i in range(40)]


def read_split(out, split):
    """All samples of a split, in shard order, via tarfile (not mdtrain's reader)."""
    m = json.load(open(os.path.join(out, "manifest.json")))
    rows = []
    for sh in m["splits"][split]["shards"]:
        with tarfile.open(os.path.join(out, sh["path"])) as tf:
            members = [t for t in tf.getmembers() if t.isfile()]
            assert len(members) == sh["samples"]
            rows += [np.load(io.BytesIO(tf.extractfile(t).read())) for t in members]
    return m, (np.stack(rows).astype(np.int64) if rows else np.zeros((0, m["seq_len"]), np.int64))


def expected_stream(docs):
    out = []
    for d in docs:
        out += list(d.encode("utf-8")) + [BYTES["eos"]]
    return np.array(out)


def write_inputs(tmp_path, fmt, docs=DOCS):
    """The same documents in each input format; returns (inputs, doc_per)."""
    if fmt == "file":
        d = tmp_path / "docs"
        d.mkdir()
        for i, doc in enumerate(docs):
            (d / f"{i:03d}.txt").write_text(doc, encoding="utf-8")
        return [str(d)], "file"
    if fmt == "line":
        p = tmp_path / "docs.txt.gz"
        with gzip.open(p, "wt", encoding="utf-8") as fh:
            fh.write("\n\n".join(docs) + "\n")  # blank lines are not documents
        return [str(p)], "line"
    if fmt == "jsonl":
        p = tmp_path / "docs.jsonl"
        p.write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
        return [str(p)], "file"
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        p = tmp_path / "docs.parquet"
        pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), p, row_group_size=7)
        return [str(p)], "file"
    raise AssertionError(fmt)


@pytest.mark.parametrize("fmt", ["file", "line", "jsonl", "parquet"])
def test_each_input_format_round_trips_md4_packing(tmp_path, fmt):
    inputs, doc_per = write_inputs(tmp_path, fmt)
    out = str(tmp_path / "out")
    m = prepare(inputs, "bytes", 64, out, val_fraction=0.0, packing="md4", doc_per=doc_per, samples_per_shard=16,
                quiet=True)
    _, rows = read_split(out, "train")
    stream = expected_stream(DOCS)
    n = len(stream) // 64
    np.testing.assert_array_equal(rows, stream[: n * 64].reshape(n, 64))
    s = m["splits"]["train"]
    assert (s["num_samples"], s["num_tokens"], s["num_documents"]) == (n, n * 64, len(DOCS))
    assert s["dropped_tokens"] == len(stream) - n * 64 and s["doc_tokens"] == len(stream) - len(DOCS)
    assert m["splits"]["valid"]["num_samples"] == 0 and m["splits"]["valid"]["shards"] == []


def test_mdlm_packing_frames_every_chunk_with_bos_eos(tmp_path):
    inputs, doc_per = write_inputs(tmp_path, "jsonl")
    out = str(tmp_path / "out")
    prepare(inputs, "bytes", 32, out, val_fraction=0.0, packing="mdlm", quiet=True)
    _, rows = read_split(out, "train")
    stream = expected_stream(DOCS)
    n = len(stream) // 30
    assert rows.shape == (n, 32)
    assert (rows[:, 0] == BYTES["bos"]).all() and (rows[:, -1] == BYTES["eos"]).all()
    np.testing.assert_array_equal(rows[:, 1:-1], stream[: n * 30].reshape(n, 30))


def test_pad_packing_one_document_per_sample(tmp_path):
    docs = ["short", "a" * 100, "ü" * 11]  # 5, 100 and 22 bytes: only the second is cut to seq_len - 2
    inputs, _ = write_inputs(tmp_path, "jsonl", docs)
    out = str(tmp_path / "out")
    m = prepare(inputs, "bytes", 24, out, val_fraction=0.0, packing="pad", quiet=True)
    _, rows = read_split(out, "train")
    for row, doc in zip(rows, docs):
        body = list(doc.encode())[:22]
        want = [BYTES["bos"]] + body + [BYTES["eos"]] + [BYTES["pad"]] * (22 - len(body))
        assert row.tolist() == want
    s = m["splits"]["train"]
    assert (s["num_samples"], s["truncated_documents"], s["dropped_tokens"]) == (3, 1, 100 - 22)
    assert s["num_tokens"] == int((rows != BYTES["pad"]).sum())


def test_manifest_counts_checksums_and_deterministic_split(tmp_path):
    docs = DOCS + DOCS[:5]  # duplicates must land in the same split
    inputs, _ = write_inputs(tmp_path, "jsonl", docs)
    out = str(tmp_path / "out")
    m = prepare(inputs, "bytes", 48, out, val_fraction=0.3, packing="pad", samples_per_shard=7, seed=3, quiet=True)
    bodies = {}
    for split in ("train", "valid"):
        s = m["splits"][split]
        _, rows = read_split(out, split)
        assert s["num_samples"] == len(rows) == sum(sh["samples"] for sh in s["shards"]) == s["num_documents"]
        assert s["num_tokens"] == int((rows != BYTES["pad"]).sum())
        assert all(sh["samples"] == 7 for sh in s["shards"][:-1])
        for sh in s["shards"]:
            data = open(os.path.join(out, sh["path"]), "rb").read()
            assert sh["sha256"] == hashlib.sha256(data).hexdigest() and sh["bytes"] == len(data)
        bodies[split] = collections.Counter(bytes(r[1:list(r).index(BYTES["eos"])].tolist()) for r in rows)
    prefix = [d.encode()[:46] for d in docs]
    assert bodies["train"] + bodies["valid"] == collections.Counter(prefix)  # each document once, one per sample
    assert 0 < m["splits"]["valid"]["num_documents"] < len(docs)
    for d in DOCS[:5]:  # both copies of a duplicated document land in the same split
        assert sorted([bodies["train"][d.encode()[:46]], bodies["valid"][d.encode()[:46]]]) == [0, 2]
    assert m["tokenizer"] == "tokenizer" and m["vocab_size"] == 260 and m["specials"] == BYTES
    assert m["seq_len"] == 48 and m["packing"] == "pad" and m["dtype"] == "uint16"
    # same seed, same split; another seed, another split
    m2 = prepare(inputs, "bytes", 48, str(tmp_path / "again"), val_fraction=0.3, packing="pad", samples_per_shard=7,
                 seed=3, quiet=True)
    assert m2["splits"] == m["splits"]
    m3 = prepare(inputs, "bytes", 48, str(tmp_path / "other"), val_fraction=0.3, packing="pad", seed=4, quiet=True)
    assert m3["splits"]["valid"]["num_documents"] != m["splits"]["valid"]["num_documents"] or \
        m3["splits"]["valid"]["shards"] != m["splits"]["valid"]["shards"]


def test_parallel_workers_give_identical_shards_and_sentencepiece_round_trip(tmp_path):
    inputs, doc_per = write_inputs(tmp_path, "file")
    kw = dict(val_fraction=0.2, packing="mdlm", doc_per=doc_per, samples_per_shard=8, quiet=True)
    a = prepare(inputs, "sentencepiece:train:400", 40, str(tmp_path / "a"), workers=1, **kw)
    b = prepare(inputs, "sentencepiece:train:400", 40, str(tmp_path / "b"), workers=2, **kw)
    assert a["splits"] == b["splits"]  # same shards, byte for byte (sha256)
    from mdtrain.data.tokenizers import load_tokenizer

    tok = load_tokenizer(str(tmp_path / "a" / "tokenizer"))
    _, rows = read_split(str(tmp_path / "a"), "train")
    text = tok.decode(rows[:, 1:-1].reshape(-1), skip_special=False)
    docs = text.split("<eos>")
    assert len(docs) > 3 and all(d in DOCS for d in docs[:-1])  # whole documents between EOS, in order


def test_cli_prepare_writes_a_loadable_dataset(tmp_path, capsys):
    inputs, _ = write_inputs(tmp_path, "jsonl")
    out = str(tmp_path / "out")
    rc = cli_main(["prepare", "--input", *inputs, "--tokenizer", "bytes", "--seq-len", "32", "--out", out,
                   "--val-fraction", "0.25", "--packing", "md4", "--samples-per-shard", "10"])
    assert rc == 0
    assert "prepared" in capsys.readouterr().out
    from mdtrain.data.loader import build_loader
    from mdtrain.data.config import DataConfig

    loader = build_loader(DataConfig(train=out, seq_len=32), "valid", 4, 0, 1, seed=0, infinite=False)
    m = json.load(open(os.path.join(out, "manifest.json")))
    assert loader.num_samples == m["splits"]["valid"]["num_samples"] > 0
    rc = cli_main(["prepare", "--input", *inputs, "--tokenizer", "bytes", "--seq-len", "32", "--out", out])
    assert rc == 1 and "already holds a prepared dataset" in capsys.readouterr().err


def test_bad_inputs_name_the_file(tmp_path):
    def run(paths, **kw):
        return prepare([str(p) for p in paths], "bytes", 16, str(tmp_path / f"out{len(os.listdir(tmp_path))}"),
                       quiet=True, **kw)

    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(DataError, match=r"empty\.txt: empty input"):
        run([empty])
    with pytest.raises(DataError, match="no files matching"):
        (tmp_path / "emptydir").mkdir()
        run([tmp_path / "emptydir"])
    with pytest.raises(DataError, match="missing.txt: no such file"):
        run([tmp_path / "missing.txt"])
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("first line\nsecond line caf".encode() + "é\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt: not valid UTF-8 at line 2"):
        run([bad], doc_per="line")
    with pytest.raises(DataError, match=r"latin1\.txt: not valid UTF-8 at line 2"):
        run([bad], doc_per="file")
    nofield = tmp_path / "x.jsonl"
    nofield.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"x\.jsonl: line 2 has no field 'text'"):
        run([nofield])
    broken = tmp_path / "y.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=r"y\.jsonl: line 2 is not valid JSON"):
        run([broken])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a"]}), tmp_path / "z.parquet")
    with pytest.raises(DataError, match=r"z\.parquet: Parquet file has no column 'text'"):
        run([tmp_path / "z.parquet"])
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"junk\.parquet: not a readable Parquet"):
        run([tmp_path / "junk.parquet"])
    (tmp_path / "ok.txt").write_text("fine")
    with pytest.raises(DataError, match="--seq-len 2 is too short for --packing mdlm"):
        prepare([str(tmp_path / "ok.txt")], "bytes", 2, str(tmp_path / "short"), quiet=True)
    # an empty file found inside a directory (like __init__.py) is skipped, not an error
    d = tmp_path / "pkg"
    d.mkdir()
    (d / "__init__.py").write_text("")
    (d / "mod.py").write_text("x = 1\n" * 50)
    m = run([d], val_fraction=0.0)
    assert m["splits"]["train"]["num_documents"] == 1
