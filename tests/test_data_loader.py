"""The streaming loader: exactly-once per epoch across DP ranks and workers, equal batch counts, exact resume
(also with another DP size), and the errors for corrupt, truncated or mismatched shards.

The datasets here hold numbered samples (sample i starts with i // 250, i % 250), so each test can say which
samples a batch holds.
"""
import json
import os

import numpy as np
import pytest
import torch

from mdtrain.data.config import DataConfig
from mdtrain.data.errors import DataError
from mdtrain.data.loader import build_loader
from mdtrain.data.shards import FORMAT, FORMAT_VERSION, ShardWriter, write_manifest
from mdtrain.data.tokenizers import BytesTokenizer

L = 8
PAD = 259


def sample(i):
    return np.array([i // 250, i % 250] + [(i * 7 + j) % 250 for j in range(L - 2)], dtype=np.uint16)


def make_dataset(root, n_train=61, n_valid=23, per_shard=13):
    """A prepared directory of numbered samples with uneven shards (the last one of each split is short)."""
    tok = BytesTokenizer()
    tok.save(os.path.join(root, "tokenizer"))
    splits = {}
    for split, n, offset in (("train", n_train, 0), ("valid", n_valid, 10_000)):
        w = ShardWriter(root, split, per_shard)
        for i in range(n):
            w.write(sample(offset + i))
        splits[split] = {"num_samples": n, "num_documents": n, "doc_tokens": n * L, "num_tokens": n * L,
                         "dropped_tokens": 0, "truncated_documents": 0, "shards": w.close()}
    write_manifest(root, {"format": FORMAT, "version": FORMAT_VERSION, "seq_len": L, "packing": "md4",
                          "dtype": "uint16", "tokenizer": "tokenizer", "vocab_size": tok.vocab_size,
                          "specials": tok.special_ids, "splits": splits})
    return root


@pytest.fixture
def data(tmp_path):
    return make_dataset(str(tmp_path / "data"))


def ids_of(batch):
    """Sample numbers of the real rows of a batch (-1 for padding rows)."""
    x, m = batch["input_ids"], batch["attention_mask"]
    assert x.dtype == torch.long and m.dtype == torch.long and x.shape == m.shape
    out = []
    for row, mask in zip(x.tolist(), m.tolist()):
        if sum(mask) == 0:
            assert set(row) == {PAD}
            out.append(-1)
        else:
            i = row[0] * 250 + row[1]
            assert mask == [1] * L and row == sample(i).tolist()
            out.append(i)
    return out


def take(loader, n):
    it = iter(loader)
    return [ids_of(next(it)) for _ in range(n)]


def cfg(data, **kw):
    return DataConfig(train=data, seq_len=L, shuffle_window=2, **kw)


def test_exactly_once_per_epoch_across_2_ranks_x_2_workers(data, monkeypatch):
    # the environment's RANK/WORLD_SIZE must not matter (webdataset's split_by_node would read them)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    dp, B, N = 2, 3, 61
    steps = 2 * -(-N // (dp * B)) + 1
    per_rank = [take(build_loader(cfg(data, num_workers=2), "train", B, r, dp, seed=5), steps) for r in range(dp)]
    stream = [i for s in range(steps) for r in range(dp) for i in per_rank[r][s]]  # global step order
    assert sorted(stream[:N]) == list(range(N))  # epoch 0: every sample exactly once
    assert sorted(stream[N:2 * N]) == list(range(N))  # epoch 1 too
    assert stream[:N] != list(range(N)) and stream[:N] != stream[N:2 * N]  # shuffled, differently per epoch
    again = take(build_loader(cfg(data, num_workers=0), "train", B, 1, dp, seed=5), steps)
    assert again == per_rank[1]  # same order for any number of workers (and seeded)
    other = take(build_loader(cfg(data), "train", B, 1, dp, seed=6), steps)
    assert other != per_rank[1]


def test_finite_loader_same_batch_count_on_every_rank_and_padding(data):
    dp, B = 4, 5
    seen = []
    counts = []
    for r in range(dp):
        loader = build_loader(cfg(data, num_workers=2), "valid", B, r, dp, seed=0, infinite=False)
        batches = [ids_of(b) for b in loader]
        counts.append(len(batches))
        assert len(batches) == len(loader) == -(-23 // (dp * B))
        seen += [i for b in batches for i in b]
        assert [ids_of(b) for b in loader] == batches  # a new pass starts from the beginning
    assert len(set(counts)) == 1
    assert sorted(i for i in seen if i >= 0) == list(range(10_000, 10_023))
    assert seen.count(-1) == counts[0] * dp * B - 23


def test_resume_gives_the_same_next_batches(data):
    for workers in (0, 2):
        c = cfg(data, num_workers=workers)
        full = take(build_loader(c, "train", 4, 1, 2, seed=1), 20)  # crosses two epoch boundaries
        first = build_loader(c, "train", 4, 1, 2, seed=1)
        it = iter(first)
        for _ in range(7):
            next(it)
        state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
        resumed = build_loader(c, "train", 4, 1, 2, seed=1)
        resumed.load_state_dict(state)
        assert take(resumed, 13) == full[7:]


def test_resume_with_another_dp_size_continues_the_epoch_exactly(data, capsys):
    old = [build_loader(cfg(data), "train", 4, r, 2, seed=0) for r in range(2)]
    consumed = [i for loader in old for b in take(loader, 3) for i in b]  # 3 steps x 2 ranks x 4
    state = old[0].state_dict()
    assert old[1].state_dict() == state  # the state is the same on every rank
    new = [build_loader(cfg(data), "train", 2, r, 3, seed=0) for r in range(3)]
    for loader in new:
        loader.load_state_dict(state, from_dp_size=2)
    assert "continues exactly" in capsys.readouterr().err
    its = [iter(loader) for loader in new]
    rest = [i for _ in range(7) for it in its for i in ids_of(next(it))]  # 37 left in epoch 0; steps of 3 x 2
    assert sorted(consumed + rest[:61 - 24]) == list(range(61))


def test_resume_into_another_stream_is_refused(data, tmp_path):
    loader = build_loader(cfg(data), "train", 4, 0, 1, seed=0)
    take(loader, 2)
    state = loader.state_dict()
    with pytest.raises(DataError, match="saved with dp_size 1, not 2"):
        build_loader(cfg(data), "train", 4, 0, 2, seed=0).load_state_dict(state, from_dp_size=2)
    with pytest.raises(DataError, match="seeds"):
        build_loader(cfg(data), "train", 4, 0, 1, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="shuffle_window"):
        build_loader(DataConfig(train=data, seq_len=L, shuffle_window=3), "train", 4, 0, 1, 0).load_state_dict(state)
    other = make_dataset(str(tmp_path / "other"), n_train=60)
    with pytest.raises(DataError, match="dataset"):
        build_loader(cfg(other), "train", 4, 0, 1, seed=0).load_state_dict(state)


def shard_path(data, split="train", k=1):
    return os.path.join(data, split, f"shard-{k:06d}.tar")


def test_truncated_shard_is_named(data):
    path = shard_path(data)
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 2 + 100])
    with pytest.raises(DataError, match=r"shard-000001\.tar: \d+ bytes, but the manifest says"):
        build_loader(cfg(data), "train", 4, 0, 1, seed=0)
    loader = build_loader(cfg(data, verify="none"), "train", 61, 0, 1, seed=0)
    with pytest.raises(DataError, match=r"shard-000001\.tar: (corrupt or truncated|holds \d+ samples)"):
        take(loader, 1)


def test_corrupt_shard_error_or_skip(data):
    path = shard_path(data, k=2)
    raw = bytearray(open(path, "rb").read())
    raw[1024 * 3 + 10: 1024 * 3 + 60] = b"\xff" * 50  # same size: only a checksum or a read notices
    open(path, "wb").write(bytes(raw))
    with pytest.raises(DataError, match=r"shard-000002\.tar: sha256 differs"):
        build_loader(cfg(data, verify="sha256"), "train", 4, 0, 1, seed=0)
    with pytest.raises(DataError, match=r"shard-000002\.tar"):  # raised in a DataLoader worker process
        take(build_loader(cfg(data, num_workers=1), "train", 61, 0, 1, seed=0), 1)
    loader = build_loader(cfg(data, on_corrupt="skip"), "train", 61, 0, 1, seed=0)
    ids = take(loader, 1)[0]
    good = [i for i in ids if i >= 0]
    assert len(ids) == 61 and loader.skipped_samples == 61 - len(good) > 0  # masked rows, same batch shape
    assert len(set(good)) == len(good) and set(range(61)) - set(range(26, 39)) <= set(good)  # shard 2 is 26..38


def test_manifest_mismatches_are_named(data, tmp_path):
    with pytest.raises(DataError, match="seq_len 8, but data.seq_len is 16"):
        build_loader(DataConfig(train=data, seq_len=16), "train", 4, 0, 1, seed=0)
    os.remove(shard_path(data, "valid", 0))
    with pytest.raises(DataError, match=r"valid/shard-000000\.tar: shard listed in .*manifest.json is missing"):
        build_loader(cfg(data), "valid", 4, 0, 1, seed=0)
    mpath = os.path.join(data, "manifest.json")
    m = json.load(open(mpath))
    m["splits"]["train"]["num_samples"] = 70
    json.dump(m, open(mpath, "w"))
    with pytest.raises(DataError, match=r"manifest.json: split 'train' lists 70 samples but its shards add up to 61"):
        build_loader(cfg(data), "train", 4, 0, 1, seed=0)
    m["splits"]["train"]["num_samples"] = 61
    m["splits"]["train"]["shards"][0]["samples"] = 14
    m["splits"]["train"]["shards"][1]["samples"] = 12
    json.dump(m, open(mpath, "w"))
    with pytest.raises(DataError, match=r"shard-000000\.tar: holds more than the 14|shard-00000[01]\.tar: holds"):
        take(build_loader(cfg(data), "train", 61, 0, 1, seed=0), 1)
    with pytest.raises(DataError, match="holds no manifest.json, so it is not a prepared dataset. Make one with "
                                        "`mdtrain prepare"):
        build_loader(cfg(str(tmp_path)), "train", 4, 0, 1, seed=0)
    no_valid = make_dataset(str(tmp_path / "nv"), n_valid=0)
    with pytest.raises(DataError, match="valid split has no samples"):
        build_loader(cfg(no_valid), "valid", 4, 0, 1, seed=0)


def test_pad_packing_attention_mask(tmp_path):
    from mdtrain.data.prepare import prepare

    p = tmp_path / "docs.txt"
    p.write_text("a\nbb\nccc\n" + "d" * 40 + "\n")
    prepare([str(p)], "bytes", 12, str(tmp_path / "out"), val_fraction=0.0, packing="pad", doc_per="line",
            quiet=True)
    loader = build_loader(DataConfig(train=str(tmp_path / "out"), seq_len=12), "train", 4, 0, 1, seed=0,
                          infinite=False)
    (batch,) = list(loader)
    x, m = batch["input_ids"], batch["attention_mask"]
    assert torch.equal(m, (x != loader.tokenizer.pad_id).long()) and loader.entropy_per_token is None
    assert sorted(m.sum(1).tolist()) == [3, 4, 5, 12]
    texts = sorted(loader.tokenizer.decode(row) for row in x)
    assert texts == ["a", "bb", "ccc", "d" * 10]


def _rank_fn(rank, world, data):
    loader = build_loader(cfg(data), "train", 5, rank, world, seed=2)
    return [i for b in take(loader, 7) for i in b]


def test_real_process_group_two_ranks(data):
    from mdtrain.testing import run_distributed

    a, b = run_distributed(_rank_fn, 2, data)
    stream = [i for s in range(7) for i in (a[5 * s:5 * s + 5] + b[5 * s:5 * s + 5])]
    assert sorted(stream[:61]) == list(range(61))
