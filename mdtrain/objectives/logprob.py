"""The only place objectives read the network's logits: gathered logits + log-normaliser, and softmax expectations.

Everything is computed in float32 (float64 if the logits are float64) whatever the network's dtype, in row
chunks, with a hand-written backward, so that no full-size float32 copy of the (B, L, V) logits is ever held:
the saved tensor is the logits themselves and the gradient comes back in their dtype.

Each objective reads through its own :class:`LogitsReader` (``objective.logprob``). The default reads logits that
hold the whole vocabulary. A tensor-parallel model's objective gets a reader of one rank's vocabulary columns
(:class:`VocabPart`): the same loops, restricted to the columns this rank owns, with the partial normalisers and
gathered values combined by the collectives the parallel code hands in. The backward needs no communication:
every rank differentiates its own columns against the global normaliser. Nothing here is process-global, so two
models in one process (an AR scorer beside a tensor-parallel model) never interfere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

CHUNK_ELEMENTS = 1 << 26  # per-chunk float32 temporaries: 256 MiB


@dataclass(frozen=True)
class VocabPart:
    """Columns [start, start + width) of a ``vocab``-class output, and how to combine over the ranks that hold the
    other columns: ``all_reduce_max`` / ``all_reduce_sum`` reduce a tensor in place over those ranks."""
    vocab: int
    start: int
    width: int
    all_reduce_max: Callable[[torch.Tensor], None]
    all_reduce_sum: Callable[[torch.Tensor], None]

    def local_index(self, class_id: Optional[int]) -> Optional[int]:
        if class_id is None or not self.start <= class_id < self.start + self.width:
            return None
        return class_id - self.start


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dt = torch.float32
    for t in tensors:
        dt = torch.promote_types(dt, t.dtype)
    return dt


def _chunks(n_rows: int, width: int):
    step = max(1, CHUNK_ELEMENTS // max(width, 1))
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


def _rows(x: torch.Tensor, s: int, e: int, dtype: torch.dtype, suppress: Optional[int]) -> torch.Tensor:
    c = x[s:e].to(dtype, copy=True)
    if suppress is not None:
        c[:, suppress] = float("-inf")
    return c


def _local_lse(x: torch.Tensor, dtype: torch.dtype, suppress: Optional[int]) -> torch.Tensor:
    lse = torch.empty(x.shape[0], dtype=dtype, device=x.device)
    if x.shape[1] == 0:  # a rank that owns no columns
        return lse.fill_(float("-inf"))
    for s, e in _chunks(x.shape[0], x.shape[1]):
        lse[s:e] = torch.logsumexp(_rows(x, s, e, dtype, suppress), dim=-1)
    return lse


def _combine_lse(local: torch.Tensor, part: VocabPart) -> torch.Tensor:
    """logsumexp over ranks of per-rank logsumexps (each may be −∞: no columns, or all suppressed)."""
    m = local.clone()
    part.all_reduce_max(m)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.exp(local - m)
    part.all_reduce_sum(s)
    return m + torch.log(s)


class _GatherLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, index, suppress_id, part: Optional[VocabPart]):
        W, K = logits.shape[-1], index.shape[-1]
        x, idx = logits.reshape(-1, W), index.reshape(-1, K)
        dtype = _compute_dtype(logits)
        owned = None
        sup = suppress_id
        if part is not None:
            sup = part.local_index(suppress_id)
            owned = (idx >= part.start) & (idx < part.start + part.width)
            idx = (idx - part.start).clamp(0, max(W - 1, 0))
        lse = _local_lse(x, dtype, sup)
        gathered = torch.zeros(x.shape[0], K, dtype=dtype, device=logits.device)
        for s, e in (_chunks(x.shape[0], W) if W else ()):
            g = _rows(x, s, e, dtype, sup).gather(1, idx[s:e])
            gathered[s:e] = g if owned is None else torch.where(owned[s:e], g, torch.zeros((), dtype=dtype,
                                                                                             device=g.device))
        if part is not None:
            lse = _combine_lse(lse, part)
            part.all_reduce_sum(gathered)  # −∞ where the owner suppressed the class, its value elsewhere
        ctx.save_for_backward(logits, idx, owned, lse)
        ctx.suppress = sup
        return gathered.view(*index.shape), lse.view(logits.shape[:-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_gathered, g_lse):
        logits, idx, owned, lse = ctx.saved_tensors
        W = logits.shape[-1]
        x = logits.reshape(-1, W)
        dtype = lse.dtype
        grad = torch.empty(x.shape, dtype=logits.dtype, device=x.device)
        if W == 0:
            return grad.view(logits.shape), None, None, None
        if g_gathered is not None:
            g_gathered = g_gathered.reshape(idx.shape).to(dtype)
            if owned is not None:  # a class another rank owns sends its gradient there
                g_gathered = torch.where(owned, g_gathered, torch.zeros((), dtype=dtype, device=x.device))
        g_lse = None if g_lse is None else g_lse.reshape(-1).to(dtype)
        for s, e in _chunks(x.shape[0], W):
            if g_lse is not None:  # d lse / d logits = softmax (against the global normaliser)
                gr = torch.exp(_rows(x, s, e, dtype, ctx.suppress) - lse[s:e, None]).mul_(g_lse[s:e, None])
            else:
                gr = torch.zeros(e - s, W, dtype=dtype, device=x.device)
            if g_gathered is not None:
                gr.scatter_add_(1, idx[s:e], g_gathered[s:e])
            if ctx.suppress is not None:
                gr[:, ctx.suppress] = 0
            grad[s:e] = gr
        return grad.view(logits.shape), None, None, None


class _SoftmaxExpectation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, values, suppress_id, part: Optional[VocabPart]):
        W = logits.shape[-1]
        x = logits.reshape(-1, W)
        dtype = _compute_dtype(logits, values)
        start = 0 if part is None else part.start
        sup = suppress_id if part is None else part.local_index(suppress_id)
        vals = values[start:start + W].to(dtype)
        out = torch.zeros(x.shape[0], dtype=dtype, device=logits.device)
        lse = None
        if part is None:
            for s, e in _chunks(x.shape[0], W):
                out[s:e] = torch.softmax(_rows(x, s, e, dtype, sup), dim=-1) @ vals
        else:  # softmax against the normaliser of all ranks' columns, then the ranks' partial sums add up
            lse = _combine_lse(_local_lse(x, dtype, sup), part)
            for s, e in (_chunks(x.shape[0], W) if W else ()):
                out[s:e] = torch.exp(_rows(x, s, e, dtype, sup) - lse[s:e, None]) @ vals
            part.all_reduce_sum(out)
        ctx.save_for_backward(logits, values, out, lse)
        ctx.suppress, ctx.part = sup, part
        return out.view(logits.shape[:-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        logits, values, out, lse = ctx.saved_tensors
        part, W = ctx.part, logits.shape[-1]
        x = logits.reshape(-1, W)
        dtype = out.dtype
        start = 0 if part is None else part.start
        vals, g = values[start:start + W].to(dtype), g.reshape(-1).to(dtype)
        grad = torch.empty(x.shape, dtype=logits.dtype, device=x.device) if ctx.needs_input_grad[0] else None
        grad_values = torch.zeros(values.shape[0], dtype=dtype, device=x.device) if ctx.needs_input_grad[1] else None
        for s, e in (_chunks(x.shape[0], W) if W else ()):
            rows = _rows(x, s, e, dtype, ctx.suppress)
            p = torch.softmax(rows, dim=-1) if lse is None else torch.exp(rows - lse[s:e, None])
            if grad_values is not None:
                grad_values[start:start + W] += g[s:e] @ p
            if grad is not None:  # d E / d logit_v = p_v (values_v − E)
                grad[s:e] = p.mul_(vals[None, :] - out[s:e, None]).mul_(g[s:e, None])
        if grad is not None and W == 0:
            grad.zero_()
        if grad_values is not None:
            if part is not None:  # ``values`` is replicated (GenMD4's schedule): every rank needs the full gradient
                part.all_reduce_sum(grad_values)
            grad_values = grad_values.to(values.dtype)
        return (None if grad is None else grad.view(logits.shape)), grad_values, None, None


class LogitsReader:
    """Reads log-probabilities from logits over the whole vocabulary (``part=None``) or over one tensor-parallel
    rank's columns (``part``). Logits that hold the whole vocabulary are read locally by either reader (samplers
    and scorers gather them)."""

    def __init__(self, part: Optional[VocabPart] = None):
        self.part = part

    def __deepcopy__(self, memo):  # stateless; a copied objective reads the same columns over the same group
        return self

    def _part_for(self, logits: torch.Tensor, what: str) -> Optional[VocabPart]:
        part, w = self.part, logits.shape[-1]
        if part is None or w == part.vocab:
            return None
        if w == part.width:
            return part
        raise ValueError(f"logprob.{what}: logits with {w} classes, but this tensor-parallel rank holds "
                         f"{part.width} of the {part.vocab} vocabulary columns; pass this rank's columns or the "
                         f"full logits")

    def gather_lse(self, logits: torch.Tensor, index: torch.Tensor, suppress_id: Optional[int] = None):
        """(logits[..., index] as float, logsumexp(logits) over classes) for ``index`` of shape (..., K).

        With ``suppress_id`` the class is treated as having logit −∞ (MDLM's zero-masking / MD4's "no mask
        output"): excluded from the normaliser, gathered as −∞, and it receives no gradient.
        Returns ((..., K), (...)) tensors in float32 (float64 for float64 logits).
        """
        return _GatherLSE.apply(logits, index, suppress_id, self._part_for(logits, "gather_lse"))

    def target_logprob(self, logits: torch.Tensor, target: torch.Tensor,
                       suppress_id: Optional[int] = None) -> torch.Tensor:
        """log softmax(logits)[target], shape of ``target``; −∞ where target == suppress_id."""
        g, lse = self.gather_lse(logits, target.unsqueeze(-1), suppress_id)
        return g.squeeze(-1) - lse

    def softmax_expectation(self, logits: torch.Tensor, values: torch.Tensor, suppress_id: Optional[int] = None):
        """Σ_v softmax(logits)_v · values_v over the last axis (``values``: (V,), differentiable)."""
        return _SoftmaxExpectation.apply(logits, values, suppress_id, self._part_for(logits, "softmax_expectation"))


LOCAL = LogitsReader()

# the whole-vocabulary reader as plain functions
gather_lse = LOCAL.gather_lse
target_logprob = LOCAL.target_logprob
softmax_expectation = LOCAL.softmax_expectation
