"""An explicit joint distribution over V^L (small V, L) and its exact denoisers, for checking objectives and samplers.

With the exact posterior p(x0^l | unmasked part of z_t) as the network, the continuous-time masked NELBO equals
−log p(x) in expectation, the discrete-time one lies above, the AR loss equals it exactly, and every sampler
should reproduce p. ``tests/test_objectives_exact.py`` and ``tests/test_samplers.py`` rely on this.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional

import torch

NEG = -1e4  # "impossible" logit: finite, so no −∞ − −∞ anywhere


class ExactJoint:
    """p over all sequences of ``length`` tokens in 0..n_tokens−1; ids ≥ n_tokens are special (mask, BOS)."""

    def __init__(self, probs: torch.Tensor, n_tokens: int, length: int, vocab_size: int, mask_id: int,
                 bos_id: Optional[int] = None):
        self.n_tokens, self.length, self.vocab_size = n_tokens, length, vocab_size
        self.mask_id, self.bos_id = mask_id, bos_id
        self.seqs = torch.tensor(list(itertools.product(range(n_tokens), repeat=length)), dtype=torch.long)
        self.p = (probs / probs.sum()).to(torch.float64)
        self.device = None  # tokens live where the caller's generator is
        self._onehot = torch.nn.functional.one_hot(self.seqs, n_tokens).to(torch.float64)  # (N, L, n)
        self._table = None

    @classmethod
    def random(cls, n_tokens: int, length: int, seed: int, skew: float = 3.0, **kw) -> "ExactJoint":
        """Random, strongly non-uniform (hence correlated) weights u^skew, u ~ U(0,1), plus a floor."""
        g = torch.Generator().manual_seed(seed)
        probs = torch.rand(n_tokens ** length, generator=g, dtype=torch.float64) ** skew
        return cls(probs + 0.01 * float(probs.mean()), n_tokens, length, **kw)

    @classmethod
    def markov(cls, transition: torch.Tensor, length: int, **kw) -> "ExactJoint":
        """A stationary Markov chain's windows: p(x) = π(x_1) Π P(x_i, x_{i+1})."""
        P = transition.double() / transition.double().sum(1, keepdim=True)
        evals, evecs = torch.linalg.eig(P.T)
        pi = evecs[:, torch.argmin((evals - 1).abs())].real
        pi = pi / pi.sum()
        n = P.shape[0]
        seqs = list(itertools.product(range(n), repeat=length))
        probs = torch.tensor([float(pi[s[0]]) * math.prod(float(P[a, b]) for a, b in zip(s, s[1:])) for s in seqs])
        return cls(probs, n, length, **kw)

    def index(self, x: torch.Tensor) -> torch.Tensor:
        """Row of each sequence in ``seqs`` (x: (B, L) of real tokens)."""
        weights = self.n_tokens ** torch.arange(self.length - 1, -1, -1)
        return (x.cpu() * weights).sum(-1)

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        return -torch.log(self.p[self.index(x)])

    def entropy(self) -> float:
        return float(-(self.p * torch.log(self.p)).sum())

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self.seqs[torch.multinomial(self.p, n, replacement=True, generator=generator)]

    def empirical(self, x: torch.Tensor) -> torch.Tensor:
        return torch.bincount(self.index(x), minlength=len(self.p)).double() / x.shape[0]

    def tv(self, x: torch.Tensor, target: Optional[torch.Tensor] = None) -> float:
        """Total-variation distance between the samples' empirical distribution and p (or ``target``)."""
        return 0.5 * float((self.empirical(x) - (self.p if target is None else target)).abs().sum())

    def denoiser(self, x: torch.Tensor, cond: Optional[torch.Tensor] = None, offset: float = 0.0) -> torch.Tensor:
        """Logits (B, L, vocab): log p(x0^l = v | the unmasked tokens of x) at every position (+ ``offset`` on the
        real tokens, e.g. log(V−1) for SEDD's log-score); special classes get a huge negative logit.
        Looked up in a table over all (n_tokens + 1)^L partially masked states, built once."""
        if self._table is None:
            self._table = self._posterior(self._all_states())
        digits = torch.where(x == self.mask_id, self.n_tokens, x).cpu()
        state = (digits * (self.n_tokens + 1) ** torch.arange(self.length - 1, -1, -1)).sum(-1)
        out = self._table[state].clone()
        out[..., :self.n_tokens] += offset
        return out.to(x.device)

    def _all_states(self) -> torch.Tensor:
        states = torch.tensor(list(itertools.product(range(self.n_tokens + 1), repeat=self.length)))
        return torch.where(states == self.n_tokens, self.mask_id, states)

    def _posterior(self, x: torch.Tensor) -> torch.Tensor:
        seen = x != self.mask_id
        consistent = ((self.seqs[None] == x[:, None]) | ~seen[:, None]).all(-1)  # (B, N)
        w = consistent.double() * self.p[None]
        post = (w @ self._onehot.flatten(1)).view(*x.shape, self.n_tokens) / w.sum(1)[:, None, None]
        out = torch.full((*x.shape, self.vocab_size), NEG, dtype=torch.float64)
        out[..., :self.n_tokens] = torch.log(post).clamp_min(NEG)
        return out

    def ar_logits(self, x: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Causal logits (B, n, vocab) for x = [BOS, x_1, ..., x_{n−1}]: position i predicts x_{i+1}."""
        xc = x.cpu()
        B, n = xc.shape
        out = torch.full((B, n, self.vocab_size), NEG, dtype=torch.float64)
        for i in range(min(n, self.length)):
            ok = (self.seqs[None, :, :i] == xc[:, None, 1:i + 1]).all(-1)  # (B, N): prefix matches
            w = ok.double() * self.p[None]
            nxt = (w @ self._onehot[:, i].contiguous()) / w.sum(1, keepdim=True)
            out[:, i, :self.n_tokens] = torch.log(nxt).clamp_min(NEG)
        return out.to(x.device)


class CachedAR:
    """``ar_logits`` behind the KV-cache protocol ``decode_step(tokens_new, cache) -> (logits, cache)``; the
    "cache" is the tokens seen so far. Counts its calls."""

    def __init__(self, joint: ExactJoint):
        self.joint, self.calls, self.decode_calls = joint, 0, 0

    def __call__(self, x, cond=None):
        self.calls += 1
        return self.joint.ar_logits(x, cond)

    def decode_step(self, tokens_new, cache=None):
        self.decode_calls += 1
        seen = tokens_new if cache is None else torch.cat([cache, tokens_new], 1)
        return self.joint.ar_logits(seen)[:, -tokens_new.shape[1]:], seen
