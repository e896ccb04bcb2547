"""Synthetic sources: the exact entropy against brute-force enumeration and against the empirical NLL of samples
streamed by the loader; written shards and text; spec errors."""
import itertools
import json
import os

import numpy as np
import pytest
import torch

from mdtrain.data.config import DataConfig
from mdtrain.data.errors import DataError
from mdtrain.data.loader import build_loader
from mdtrain.data.synthetic import SyntheticSource, entropy_per_token, from_spec, write_shards, write_text

SPECS = ["synthetic:markov:vocab=5,branch=3,seed=1", "synthetic:hmm:vocab=5,states=3,branch=2,seed=2"]


@pytest.mark.parametrize("spec", SPECS)
def test_exact_entropy_matches_brute_force_enumeration(spec):
    proc = from_spec(spec)
    L = 6
    xs = np.array(list(itertools.product(range(proc.vocab), repeat=L)))
    lp = proc.log_prob(xs)
    p = np.exp(lp)
    assert abs(p.sum() - 1) < 1e-12  # log_prob is a normalized distribution over sequences
    H = -np.sum(p[p > 0] * lp[p > 0])
    assert abs(H / L - proc.entropy_per_token(L)) < 1e-12
    # H(X_1..X_3) from the enumerated marginal of the first 3 symbols = the first 3 step entropies
    q = np.bincount(np.ravel_multi_index(xs[:, :3].T, (proc.vocab,) * 3), weights=p)
    q = q[q > 0]
    assert abs(proc.step_entropies(L)[:3].sum() + np.sum(q * np.log(q))) < 1e-12


@pytest.mark.parametrize("spec", SPECS + ["synthetic:markov", "synthetic:hmm"])
def test_empirical_entropy_of_streamed_samples_matches_exact(spec):
    L, B = 48, 64
    loader = build_loader(DataConfig(train=spec, seq_len=L), "train", B, 0, 1, seed=0)
    it = iter(loader)
    x = torch.cat([next(it)["input_ids"] for _ in range(40)]).numpy()
    proc = from_spec(spec)
    assert x.min() >= 0 and x.max() < proc.vocab
    nll = -proc.log_prob(x) / L
    exact = entropy_per_token(spec, L)
    assert np.isfinite(nll).all()  # every streamed sample is possible under the process
    se = nll.std() / np.sqrt(len(nll))
    assert abs(nll.mean() - exact) < 4 * se + 1e-9, (nll.mean(), exact, se)


def test_markov_transition_frequencies_match_the_chain():
    proc = from_spec("synthetic:markov:vocab=6,branch=3")
    x = proc.sample("train", np.arange(400), 100)
    counts = np.zeros((6, 6))
    np.add.at(counts, (x[:, :-1].ravel(), x[:, 1:].ravel()), 1)
    freq = counts / counts.sum(1, keepdims=True)
    assert np.abs(freq - proc.P).max() < 0.03
    assert (counts[proc.P == 0] == 0).all()


def test_synthetic_loader_interface_resume_and_splits():
    spec = "synthetic:hmm:vocab=12,valid_samples=50"
    c = DataConfig(train=spec, seq_len=16)
    train = build_loader(c, "train", 4, 1, 2, seed=0)
    tok = train.tokenizer
    assert (train.seq_len, train.num_samples) == (16, 1 << 24)
    assert tok.vocab_size == 12 + 4 and tok.mask_id >= 12
    assert train.entropy_per_token == SyntheticSource(spec, 16, "valid").entropy == entropy_per_token(spec, 16)
    it = iter(train)
    first = [next(it) for _ in range(6)]
    assert all(b["attention_mask"].all() for b in first)
    state = train.state_dict()
    later = [next(it)["input_ids"] for _ in range(3)]
    again = build_loader(c, "train", 4, 1, 2, seed=0)
    again.load_state_dict(state)
    it2 = iter(again)
    assert all(torch.equal(a, next(it2)["input_ids"]) for a in later)
    valid = build_loader(c, "valid", 8, 0, 1, seed=0, infinite=False)
    rows = torch.cat([b["input_ids"][b["attention_mask"].bool().all(1)] for b in valid])
    assert len(valid) == 7 and rows.shape == (50, 16)
    assert not any(torch.equal(rows[0], b["input_ids"][0]) for b in first)  # held-out samples differ
    assert set(tok.decode(rows[0])) <= set(tok.alphabet)


def test_written_shards_and_text_hold_the_same_samples(tmp_path):
    spec = "synthetic:markov:vocab=8"
    out = str(tmp_path / "shards")
    m = write_shards(spec, out, seq_len=12, train_samples=30, valid_samples=10, samples_per_shard=7)
    assert m["splits"]["train"]["num_samples"] == 30 and len(m["splits"]["train"]["shards"]) == 5
    assert m["entropy_per_token"] == entropy_per_token(spec, 12)
    with open(os.path.join(out, "manifest.json")) as fh:
        assert json.load(fh)["source"] == from_spec(spec).spec
    loader = build_loader(DataConfig(train=out, seq_len=12), "valid", 5, 0, 1, seed=0, infinite=False)
    assert loader.entropy_per_token == entropy_per_token(spec, 12)
    got = torch.cat([b["input_ids"] for b in loader]).numpy()
    np.testing.assert_array_equal(got, from_spec(spec).sample("valid", np.arange(10), 12))
    text = tmp_path / "docs.txt"
    write_text(spec, str(text), num_docs=30, seq_len=12)
    lines = text.read_text().splitlines()
    proc = from_spec(spec)
    assert [proc.tokenizer.encode(s) for s in lines] == proc.sample("train", np.arange(30), 12).tolist()


def test_bad_specs():
    with pytest.raises(DataError, match="unknown synthetic source"):
        from_spec("synthetic:zipf")
    with pytest.raises(DataError, match="unknown key 'vocab_size'"):
        from_spec("synthetic:markov:vocab_size=3")
    with pytest.raises(DataError, match="branch <= vocab"):
        from_spec("synthetic:markov:vocab=3,branch=5")
    with pytest.raises(DataError, match="bad value"):
        from_spec("synthetic:markov:vocab=many")
