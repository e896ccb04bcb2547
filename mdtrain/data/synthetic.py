"""Synthetic token sources whose exact entropy is known, for checking that a model's NLL / NELBO never
falls below the data's entropy (that would be a leak) and approaches it as it trains.

Spec: ``synthetic:NAME[:k=v,...]``, e.g. ``synthetic:markov:vocab=32,branch=4`` or ``synthetic:hmm:states=8``.

* ``markov``  a random sparse first-order Markov chain: each symbol has ``branch`` successors with Dirichlet(
  ``alpha``) probabilities (one of them the next symbol, so the chain is irreducible); X_1 is uniform.
* ``hmm``     a random unifilar hidden Markov model: ``states`` hidden states, each emitting one of ``branch``
  symbols with Dirichlet(``alpha``) probabilities; the emitted symbol decides the next state; starts in state 0.
  The observed sequence is in general not Markov of any low order (a model must infer the hidden state
  from context), yet its entropy is exact (the state path is a function of the symbols).
Common keys: ``vocab`` (alphabet size), ``seed`` (the process), ``samples`` (train samples per epoch),
``valid_samples``.

For both, H(X_1..X_L) = sum_t H(X_t | X_<t) is computed exactly by propagating the state distribution, and
``entropy_per_token(L)`` = H(X_1..X_L) / L in nats is the lower bound of any model's NLL per token on samples of
length L. Samples are a pure function of (seed, split, sample index), so the source streams without storage.
"""
from __future__ import annotations

import abc
import hashlib
import os
from typing import Optional

import numpy as np

from mdtrain.data.errors import DataError
from mdtrain.data.tokenizers import AlphabetTokenizer

_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_DEFAULTS = {
    "markov": {"vocab": 32, "branch": 4, "alpha": 1.0, "seed": 0, "samples": 1 << 24, "valid_samples": 2048},
    "hmm": {"vocab": 32, "states": 8, "branch": 4, "alpha": 1.0, "seed": 0, "samples": 1 << 24,
            "valid_samples": 2048},
}
_SPLIT_CODE = {"train": 1, "valid": 2}


def alphabet(vocab: int) -> str:
    """Printable symbols for ``vocab`` ids: letters and digits, then CJK characters beyond 62."""
    return _LETTERS[:vocab] if vocab <= len(_LETTERS) else "".join(chr(0x4E00 + i) for i in range(vocab))


def _entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in nats along the last axis (0 log 0 = 0), in float64."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.sum(np.where(p > 0, p * np.log(p), 0.0), axis=-1)


def _sparse_rows(rng, rows: int, vocab: int, branch: int, alpha: float, forced=None) -> np.ndarray:
    """rows x vocab stochastic matrix; each row has ``branch`` non-zeros (``forced[i]`` among them)."""
    m = np.zeros((rows, vocab))
    for i in range(rows):
        support = rng.choice(vocab, size=branch, replace=False)
        if forced is not None and forced[i] not in support:
            support[0] = forced[i]
        m[i, support] = rng.dirichlet(np.full(branch, alpha))
    return m


class _Sampler:
    """Inverse-CDF sampling from the rows of a sparse stochastic matrix, over each row's support only
    (O(branch) per token, whatever the vocabulary): ``draw(rows, u)`` with u in [0, 1)."""

    def __init__(self, m: np.ndarray):
        width = int((m > 0).sum(1).max())
        self.support = np.argsort(m <= 0, axis=1, kind="stable")[:, :width]  # non-zero columns first, in order
        p = np.take_along_axis(m, self.support, axis=1)
        self.cum = np.cumsum(p, axis=1)
        # zero-probability entries are never chosen, and float rounding at the top of a row cannot run past
        # its last non-zero entry
        last = width - 1 - np.argmax(p[:, ::-1] > 0, axis=1)
        for i, j in enumerate(last):
            self.cum[i, j:] = np.inf

    def draw(self, rows: np.ndarray, u: np.ndarray) -> np.ndarray:
        k = (self.cum[rows] <= u[:, None]).sum(1)
        return self.support[rows, k]


class _Process(abc.ABC):
    """Common part: spec parsing, tokenizer, per-sample uniforms."""

    name = ""

    def __init__(self, params: dict):
        p = dict(_DEFAULTS[self.name])
        for k, v in params.items():
            if k not in p:
                raise DataError(f"synthetic:{self.name}: unknown key {k!r}; valid keys: {sorted(p)}")
            p[k] = type(p[k])(v)
        self.params = p
        self.vocab, self.branch, self.alpha, self.seed = p["vocab"], p["branch"], p["alpha"], p["seed"]
        if not 1 <= self.branch <= self.vocab:
            raise DataError(f"synthetic:{self.name}: need 1 <= branch <= vocab, got branch={self.branch}, "
                            f"vocab={self.vocab}")
        self.tokenizer = AlphabetTokenizer(alphabet(self.vocab), spec=self.spec)

    @property
    def spec(self) -> str:
        return f"synthetic:{self.name}:" + ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))

    def uniforms(self, split: str, ids: np.ndarray, seq_len: int) -> np.ndarray:
        return np.stack([np.random.default_rng([self.seed, _SPLIT_CODE[split], int(i)]).random(seq_len)
                         for i in ids]) if len(ids) else np.zeros((0, seq_len))

    def sample(self, split: str, ids: np.ndarray, seq_len: int) -> np.ndarray:
        """Samples number ``ids`` of ``split``: int64[len(ids), seq_len] (each a pure function of its id)."""
        return self._generate(self.uniforms(split, np.asarray(ids), seq_len))

    def entropy_per_token(self, seq_len: int) -> float:
        """H(X_1..X_L) / L in nats: the lowest NLL per token any model can reach on samples of length L."""
        return float(np.mean(self.step_entropies(seq_len)))

    @abc.abstractmethod
    def _generate(self, u: np.ndarray) -> np.ndarray:
        """Samples driven by uniforms ``u[n, L]`` (inverse-CDF sampling, one uniform per token)."""

    @abc.abstractmethod
    def step_entropies(self, seq_len: int) -> np.ndarray:
        """H(X_t | X_<t) in nats for t = 1..L (float64); their sum is H(X_1..X_L)."""

    @abc.abstractmethod
    def log_prob(self, x: np.ndarray) -> np.ndarray:
        """Exact log p(x_1..x_L) in nats of each row of ``x`` (float64)."""


class MarkovChain(_Process):
    name = "markov"

    def __init__(self, params: dict):
        super().__init__(params)
        rng = np.random.default_rng([self.seed, 0])
        V = self.vocab
        self.P = _sparse_rows(rng, V, V, self.branch, self.alpha, forced=(np.arange(V) + 1) % V)
        self.init = np.full(V, 1.0 / V)
        self._next, self._first = _Sampler(self.P), _Sampler(self.init[None, :])

    def _generate(self, u):
        n, L = u.shape
        x = np.empty((n, L), dtype=np.int64)
        if L == 0:
            return x
        x[:, 0] = self._first.draw(np.zeros(n, dtype=np.int64), u[:, 0])
        for t in range(1, L):
            x[:, t] = self._next.draw(x[:, t - 1], u[:, t])
        return x

    def step_entropies(self, seq_len):
        h_row, p = _entropy(self.P), self.init.copy()  # p: the marginal of the previous symbol
        out = np.empty(seq_len)
        for t in range(seq_len):
            if t == 0:
                out[t] = _entropy(p)
            else:
                out[t] = p @ h_row
                p = p @ self.P
        return out

    def log_prob(self, x):
        x = np.asarray(x)
        with np.errstate(divide="ignore"):
            return np.log(self.init[x[:, 0]]) + np.log(self.P[x[:, :-1], x[:, 1:]]).sum(1)


class UnifilarHMM(_Process):
    name = "hmm"

    def __init__(self, params: dict):
        super().__init__(params)
        self.states = self.params["states"]
        if self.states < 1:
            raise DataError(f"synthetic:hmm: states must be >= 1, got {self.states}")
        rng = np.random.default_rng([self.seed, 0])
        S, V = self.states, self.vocab
        self.E = _sparse_rows(rng, S, V, self.branch, self.alpha)  # emission probabilities per state
        self.next = rng.integers(0, S, size=(S, V))  # next state after emitting a symbol
        self.T = np.zeros((S, S))  # state transition probabilities
        for s in range(S):
            np.add.at(self.T[s], self.next[s], self.E[s])
        self._emit = _Sampler(self.E)

    def _generate(self, u):
        n, L = u.shape
        x = np.empty((n, L), dtype=np.int64)
        s = np.zeros(n, dtype=np.int64)
        for t in range(L):
            x[:, t] = self._emit.draw(s, u[:, t])
            s = self.next[s, x[:, t]]
        return x

    def step_entropies(self, seq_len):
        h_state, q = _entropy(self.E), np.eye(self.states)[0]  # q: the distribution of the current state
        out = np.empty(seq_len)
        for t in range(seq_len):
            out[t] = q @ h_state
            q = q @ self.T
        return out

    def log_prob(self, x):
        x = np.asarray(x)
        s = np.zeros(len(x), dtype=np.int64)
        lp = np.zeros(len(x))
        with np.errstate(divide="ignore"):
            for t in range(x.shape[1]):
                lp += np.log(self.E[s, x[:, t]])
                s = self.next[s, x[:, t]]
        return lp


PROCESSES = {"markov": MarkovChain, "hmm": UnifilarHMM}


def from_spec(spec: str) -> _Process:
    """The process of ``synthetic:NAME[:k=v,...]``."""
    parts = spec.split(":", 2)
    if len(parts) < 2 or parts[0] != "synthetic" or parts[1] not in PROCESSES:
        raise DataError(f"unknown synthetic source {spec!r}; expected synthetic:NAME[:k=v,...] with NAME in "
                        f"{sorted(PROCESSES)}")
    params = {}
    for item in filter(None, (parts[2] if len(parts) > 2 else "").split(",")):
        k, eq, v = item.partition("=")
        if not eq:
            raise DataError(f"{spec!r}: expected k=v, got {item!r}")
        params[k.strip()] = v.strip()
    try:
        return PROCESSES[parts[1]](params)
    except ValueError as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{spec!r}: bad value ({e})") from None


def entropy_per_token(spec: str, seq_len: int) -> float:
    """Exact entropy per token in nats of samples of length ``seq_len`` from ``spec``."""
    return from_spec(spec).entropy_per_token(seq_len)


class SyntheticSource:
    """One split of a synthetic process as a loader source: sample ``i`` of an epoch is the process's sample
    ``i`` of that split, so the stream is deterministic and needs no storage (same interface as ShardSource)."""

    def __init__(self, spec: str, seq_len: int, split: str):
        self.process = from_spec(spec)
        self.tokenizer = self.process.tokenizer
        self.seq_len, self.split = seq_len, split
        self.num_samples = self.process.params["samples" if split == "train" else "valid_samples"]
        self.fingerprint = hashlib.sha256(f"{self.process.spec}|{seq_len}".encode()).hexdigest()[:16]
        self.chunk_positions = 256  # no windows to read: small chunks spread generation over the workers
        self.entropy = self.process.entropy_per_token(seq_len)

    def rows(self, positions: np.ndarray):
        ids = self.process.sample(self.split, np.asarray(positions) % self.num_samples, self.seq_len)
        return ids, np.ones(len(ids), dtype=bool)


def write_shards(spec: str, out: str, seq_len: int, train_samples: Optional[int] = None,
                 valid_samples: Optional[int] = None, samples_per_shard: int = 1024) -> dict:
    """Write a synthetic source as a prepared directory (the same samples the on-the-fly source streams)."""
    from mdtrain.data.shards import FORMAT, FORMAT_VERSION, SPLITS, ShardWriter, sample_dtype, write_manifest

    proc = from_spec(spec)
    counts = {"train": train_samples if train_samples is not None else proc.params["samples"],
              "valid": valid_samples if valid_samples is not None else proc.params["valid_samples"]}
    tok = proc.tokenizer
    tok.save(os.path.join(out, "tokenizer"))
    dtype = sample_dtype(tok.vocab_size)
    splits = {}
    for split in SPLITS:
        writer = ShardWriter(out, split, samples_per_shard)
        for lo in range(0, counts[split], 1024):
            for row in proc.sample(split, np.arange(lo, min(lo + 1024, counts[split])), seq_len):
                writer.write(row.astype(dtype))
        shards = writer.close()
        splits[split] = {"num_samples": counts[split], "num_documents": counts[split],
                         "doc_tokens": counts[split] * seq_len, "num_tokens": counts[split] * seq_len,
                         "dropped_tokens": 0, "truncated_documents": 0, "shards": shards}
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "seq_len": seq_len, "packing": "none",
                "dtype": dtype.name, "tokenizer": "tokenizer", "tokenizer_spec": tok.spec,
                "vocab_size": tok.vocab_size, "specials": tok.special_ids, "source": proc.spec,
                "entropy_per_token": proc.entropy_per_token(seq_len), "splits": splits}
    write_manifest(out, manifest)
    return manifest


def write_text(spec: str, path: str, num_docs: int, seq_len: int, split: str = "train") -> None:
    """Write ``num_docs`` samples as text, one document per line in the source's alphabet."""
    proc = from_spec(spec)
    with open(path, "w", encoding="utf-8") as fh:
        for lo in range(0, num_docs, 1024):
            for row in proc.sample(split, np.arange(lo, min(lo + 1024, num_docs)), seq_len):
                fh.write(proc.tokenizer.decode(row) + "\n")
