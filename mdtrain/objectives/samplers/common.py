"""What the masked samplers share: the network as they call it (time conditioning, classifier-free guidance,
evaluation counts), the inverse of a schedule, final noise removal and row chunking."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from mdtrain.objectives.logprob import CHUNK_ELEMENTS
from mdtrain.objectives.samplers.categorical import categorical, nucleus


@dataclass
class Stats:
    batch_size: int
    device: torch.device
    nfe: int = 0  # network evaluations (each on the sub-batch that needed one; a guided call counts 2)
    per_sample: torch.Tensor = field(init=False)  # network evaluations of each sequence

    def __post_init__(self):
        self.per_sample = torch.zeros(self.batch_size, dtype=torch.long, device=self.device)


class Net:
    """``model_fn`` as the samplers call it: ``net(x, t, idx)`` -> logits for the rows ``idx`` of the batch
    (None = all rows), at time ``t`` (a float or a float64 tensor of one time per row), laid out so that row i
    predicts position i (``objective.align_logits``: the shifted parameterisation).

    Classifier-free guidance with the prompt as the condition (Nie et al. 2025, LLaDA, App. B.3; Ho & Salimans
    2022): with scale w > 0 the unconditional pass sees the same tokens with the prompt (``given``: the
    positions fixed when the window started — prefix, infill tokens, the previous window's overlap) masked, and
    the logits are u + (1 + w)·(c − u). Both passes run as one call on a doubled batch; it counts as 2
    evaluations.
    """

    def __init__(self, objective, model_fn, stats: Stats, guidance: float = 0.0):
        self.obj, self.fn, self.stats, self.w = objective, model_fn, stats, float(guidance)
        self.given: Optional[torch.Tensor] = None  # (B, L) bool, set per window

    def __call__(self, x: torch.Tensor, t, idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        cond = self._cond(x, t)
        if self.w:
            given = self.given if idx is None else self.given[idx]
            uncond_x = x.masked_fill(given, self.obj.mask_id)
            c, u = self.fn(torch.cat([x, uncond_x]), torch.cat([cond, cond])).chunk(2)
            self._count(idx, 2)
            return self.obj.align_logits(u + (1 + self.w) * (c - u))
        self._count(idx, 1)
        return self.obj.align_logits(self.fn(x, cond))

    def call_with(self, x: torch.Tensor, t, idx, fn):
        """``fn(x, cond)`` in place of ``model_fn`` (calls through the KV-cache protocol), counted the same; no
        guidance."""
        self._count(idx, 1)
        return fn(x, self._cond(x, t))

    def _cond(self, x, t):
        tt = t if torch.is_tensor(t) else torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device)
        return self.obj.cond(tt)

    def _count(self, idx, cost: int):
        self.stats.nfe += cost
        if idx is None:
            self.stats.per_sample += cost
        else:
            self.stats.per_sample[idx] += cost


def time_for_mask_prob(schedule, target: torch.Tensor, iters: int = 64) -> torch.Tensor:
    """t ∈ [0, 1] with ``schedule.mask_prob(t) = target`` (float64, elementwise), by bisection (mask_prob is
    increasing); a target outside [mask_prob(0), mask_prob(1)] gives the nearest end. 64 halvings resolve t to
    2^-64, below float64's spacing."""
    lo = torch.zeros_like(target, dtype=torch.float64)
    hi = torch.ones_like(lo)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        below = schedule.mask_prob(mid) < target
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return hi


def time_at_mask_fraction(objective, frac: torch.Tensor) -> torch.Tensor:
    """The time whose forward masking probability equals ``frac`` (what a time-conditioned network expects for a
    state with that fraction of masks); samplers without a time grid use it. Per-token schedules (genmd4, d3pm
    with mass on the mask) have no single inverse: t = frac there."""
    frac = frac.to(torch.float64)
    if not objective.time_conditioning or objective.rows_for_unmask_prob:
        return frac
    return time_for_mask_prob(objective.schedule, frac)


def row_chunks(n: int, vocab: int):
    """Slices of ≤ CHUNK_ELEMENTS / vocab rows: bounds the float64 copies of (rows, V) logits."""
    step = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    for a in range(0, n, step):
        yield slice(a, min(n, a + step))


def fill_masks(objective, logits: torch.Tensor, x: torch.Tensor, left: torch.Tensor, noise_removal: str,
               top_p: float, generator) -> torch.Tensor:
    """Final noise removal in place: masks at ``left`` take argmax x_θ (greedy) or a draw from it (ancestral)."""
    b_idx, l_idx = left.nonzero(as_tuple=True)
    for c in row_chunks(b_idx.numel(), logits.shape[-1]):
        w = objective.denoiser_logprobs(logits[b_idx[c], l_idx[c]])
        w[:, objective.mask_id] = -math.inf
        if noise_removal == "greedy":
            tok = w.argmax(-1)
        else:
            tok = categorical(nucleus(w, top_p), generator)
        x[b_idx[c], l_idx[c]] = tok
    return x


def finish(objective, net: Net, x: torch.Tensor, t_end, noise_removal: str, top_p: float, generator):
    """Noise removal for samplers that keep no logits buffer: one evaluation of the sequences with masks left."""
    left = x == objective.mask_id
    if noise_removal == "none" or not left.any():
        return x
    idx = left.any(1).nonzero(as_tuple=True)[0]
    t = t_end[idx] if torch.is_tensor(t_end) else t_end
    logits = net(x[idx], t, idx)
    sub = x[idx]
    fill_masks(objective, logits, sub, left[idx], noise_removal, top_p, generator)
    x[idx] = sub
    return x
