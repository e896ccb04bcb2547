"""Vocab-parallel readers of the logits: target log-probabilities, log-normaliser and softmax expectations over
logits sharded along the vocabulary, without ever gathering the full (B, L, V) logits.

Each TP rank holds the columns [start, start + width) of the logits (``VocabShard``). The log-normaliser is
combined from per-rank logsumexps (two all-reduces of B·L numbers: max, then the sum of exponentials); a gathered
logit comes from the rank that owns its column (an all-reduce of B·L·K numbers, zeros elsewhere). The backward
needs no communication: every rank differentiates its own columns against the global normaliser, and the
gradients the replicated loss sends back are identical on all TP ranks. The suppressed class (SUBS's mask logit)
is −∞ on the rank that owns it, so it is excluded from the normaliser, gathered as −∞ and gets no gradient,
exactly as in ``mdtrain.objectives.logprob``.

``install(shard)`` swaps these in through ``logprob.set_impl``. They dispatch on the width of the logits they
receive: ``width`` columns are this rank's shard, ``vocab`` columns are full logits (another model, e.g. an AR
scorer, or gathered logits) and go to the single-device implementation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from mdtrain.objectives import logprob

CHUNK_ELEMENTS = 1 << 26  # float32 temporaries per row chunk: 256 MiB


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice of the vocabulary: columns [start, start + width) of ``vocab`` (padding excluded)."""
    vocab: int
    start: int
    width: int
    padded: int       # columns per rank including padding: ceil(vocab / tp)
    group: object     # the tensor-parallel process group
    size: int         # tensor-parallel world size

    @classmethod
    def of(cls, vocab: int, rank: int, size: int, group) -> "VocabShard":
        c = math.ceil(vocab / size)
        lo, hi = min(vocab, rank * c), min(vocab, (rank + 1) * c)
        return cls(vocab, lo, hi - lo, c, group, size)

    def local_index(self, suppress_id: Optional[int]) -> Optional[int]:
        if suppress_id is None or not self.start <= suppress_id < self.start + self.width:
            return None
        return suppress_id - self.start


def _chunks(n_rows: int, width: int):
    step = max(1, CHUNK_ELEMENTS // max(width, 1))
    for s in range(0, n_rows, step):
        yield s, min(n_rows, s + step)


def _rows(x, s, e, dtype, local_suppress):
    c = x[s:e].to(dtype, copy=True)
    if local_suppress is not None:
        c[:, local_suppress] = float("-inf")
    return c


def _global_lse(local_lse: torch.Tensor, group) -> torch.Tensor:
    """logsumexp over ranks of per-rank logsumexps (each may be −∞: no columns, or all suppressed)."""
    m = local_lse.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.exp(local_lse - m)
    dist.all_reduce(s, op=dist.ReduceOp.SUM, group=group)
    return m + torch.log(s)


def _local_lse(x, shard, dtype, sup):
    lse = torch.empty(x.shape[0], dtype=dtype, device=x.device)
    if shard.width == 0:
        return lse.fill_(float("-inf"))
    for s, e in _chunks(x.shape[0], shard.width):
        lse[s:e] = torch.logsumexp(_rows(x, s, e, dtype, sup), dim=-1)
    return lse


class _VocabParallelGatherLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, index, suppress_id, shard: VocabShard):
        W, K = logits.shape[-1], index.shape[-1]
        x, idx = logits.reshape(-1, W), index.reshape(-1, K)
        dtype = torch.promote_types(torch.float32, logits.dtype)
        sup = shard.local_index(suppress_id)
        owned = (idx >= shard.start) & (idx < shard.start + shard.width)
        lidx = (idx - shard.start).clamp(0, max(W - 1, 0))
        lse = _global_lse(_local_lse(x, shard, dtype, sup), shard.group)
        gathered = torch.zeros(x.shape[0], K, dtype=dtype, device=x.device)
        if W:
            for s, e in _chunks(x.shape[0], W):
                g = _rows(x, s, e, dtype, sup).gather(1, lidx[s:e])
                gathered[s:e] = torch.where(owned[s:e], g, torch.zeros((), dtype=dtype, device=x.device))
        dist.all_reduce(gathered, op=dist.ReduceOp.SUM, group=shard.group)  # −∞ where the owner suppressed it
        ctx.save_for_backward(logits, lidx, owned, lse)
        ctx.sup = sup
        ctx.shard = shard
        return gathered.view(*index.shape), lse.view(logits.shape[:-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_gathered, g_lse):
        logits, lidx, owned, lse = ctx.saved_tensors
        W = logits.shape[-1]
        x = logits.reshape(-1, W)
        dtype = lse.dtype
        grad = torch.zeros(x.shape, dtype=logits.dtype, device=x.device)
        if W == 0:
            return grad.view(logits.shape), None, None, None
        if g_gathered is not None:
            g_gathered = torch.where(owned, g_gathered.reshape(lidx.shape).to(dtype),
                                     torch.zeros((), dtype=dtype, device=x.device))
        g_lse = None if g_lse is None else g_lse.reshape(-1).to(dtype)
        for s, e in _chunks(x.shape[0], W):
            if g_lse is not None:  # d lse / d logit = softmax, against the global normaliser
                gr = torch.exp(_rows(x, s, e, dtype, ctx.sup) - lse[s:e, None]).mul_(g_lse[s:e, None])
            else:
                gr = torch.zeros(e - s, W, dtype=dtype, device=x.device)
            if g_gathered is not None:
                gr.scatter_add_(1, lidx[s:e], g_gathered[s:e])
            if ctx.sup is not None:
                gr[:, ctx.sup] = 0
            grad[s:e] = gr
        return grad.view(logits.shape), None, None, None


class _VocabParallelSoftmaxExpectation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, values, suppress_id, shard: VocabShard):
        W = logits.shape[-1]
        x = logits.reshape(-1, W)
        dtype = torch.promote_types(torch.promote_types(torch.float32, logits.dtype), values.dtype)
        sup = shard.local_index(suppress_id)
        vals = values[shard.start:shard.start + W].to(dtype)
        lse = _global_lse(_local_lse(x, shard, dtype, sup), shard.group)
        out = torch.zeros(x.shape[0], dtype=dtype, device=x.device)
        if W:
            for s, e in _chunks(x.shape[0], W):
                out[s:e] = torch.exp(_rows(x, s, e, dtype, sup) - lse[s:e, None]) @ vals
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=shard.group)
        ctx.save_for_backward(logits, values, out, lse)
        ctx.sup, ctx.shard = sup, shard
        return out.view(logits.shape[:-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        logits, values, out, lse = ctx.saved_tensors
        shard, W = ctx.shard, logits.shape[-1]
        x = logits.reshape(-1, W)
        dtype = out.dtype
        vals = values[shard.start:shard.start + W].to(dtype)
        g = g.reshape(-1).to(dtype)
        grad = torch.zeros(x.shape, dtype=logits.dtype, device=x.device) if ctx.needs_input_grad[0] else None
        grad_values = None
        if ctx.needs_input_grad[1]:
            grad_values = torch.zeros(values.shape[0], dtype=dtype, device=x.device)
        if W:
            for s, e in _chunks(x.shape[0], W):
                p = torch.exp(_rows(x, s, e, dtype, ctx.sup) - lse[s:e, None])
                if grad_values is not None:
                    grad_values[shard.start:shard.start + W] += g[s:e] @ p
                if grad is not None:  # d E / d logit_v = p_v (values_v − E)
                    grad[s:e] = p.mul_(vals[None, :] - out[s:e, None]).mul_(g[s:e, None])
        if grad_values is not None:
            # ``values`` is replicated (GenMD4's schedule): every rank needs the full gradient, not its columns
            dist.all_reduce(grad_values, op=dist.ReduceOp.SUM, group=shard.group)
            grad_values = grad_values.to(values.dtype)
        return (None if grad is None else grad.view(logits.shape)), grad_values, None, None


def vocab_parallel_gather_lse(logits, index, suppress_id=None, *, shard: VocabShard):
    """``logprob.gather_lse`` for vocab-sharded logits: (logits[..., index], logsumexp over all V), float32."""
    return _VocabParallelGatherLSE.apply(logits, index, suppress_id, shard)


def vocab_parallel_softmax_expectation(logits, values, suppress_id=None, *, shard: VocabShard):
    """``logprob.softmax_expectation`` for vocab-sharded logits; ``values`` is the full (V,) vector."""
    return _VocabParallelSoftmaxExpectation.apply(logits, values, suppress_id, shard)


@torch.no_grad()
def gather_vocab_logits(local: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """The full (..., V) logits on every TP rank (for sampling; never used in training)."""
    pad = shard.padded - local.shape[-1]
    padded = torch.nn.functional.pad(local, (0, pad)).contiguous()
    parts = [torch.empty_like(padded) for _ in range(shard.size)]
    dist.all_gather(parts, padded, group=shard.group)
    return torch.cat(parts, dim=-1)[..., :shard.vocab]


# ----------------------------------------------------------------------------------------------------------------
# installation into mdtrain.objectives.logprob


def _dispatch(vp: Callable, local: Callable, shard: VocabShard, what: str):
    def fn(logits, arg, suppress_id=None):
        w = logits.shape[-1]
        if w == shard.vocab:
            return local(logits, arg, suppress_id)
        if w == shard.width:
            return vp(logits, arg, suppress_id, shard=shard)
        raise ValueError(f"logprob.{what}: logits with {w} classes, but this tensor-parallel rank holds "
                         f"{shard.width} of the {shard.vocab} vocabulary columns; pass this rank's vocab shard "
                         f"or full logits")
    fn.vocab_shard = shard
    return fn


_SAVED: Optional[dict] = None


def install(shard: VocabShard) -> None:
    """Route ``logprob.gather_lse`` / ``softmax_expectation`` through the vocab-parallel versions (idempotent)."""
    global _SAVED
    base = _SAVED if _SAVED is not None else logprob.set_impl()  # set_impl() changes nothing, returns the current
    logprob.set_impl(gather_lse=_dispatch(vocab_parallel_gather_lse, base["gather_lse"], shard, "gather_lse"),
                     softmax_expectation=_dispatch(vocab_parallel_softmax_expectation, base["softmax_expectation"],
                                                   shard, "softmax_expectation"))
    _SAVED = base


def uninstall() -> None:
    """Restore the single-device implementations."""
    global _SAVED
    if _SAVED is not None:
        logprob.set_impl(**_SAVED)
        _SAVED = None


def installed_shard() -> Optional[VocabShard]:
    return getattr(logprob.set_impl()["gather_lse"], "vocab_shard", None)
