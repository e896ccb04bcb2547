"""The only place objectives read the network's logits: gathered logits + log-normaliser, and softmax expectations.

Everything is computed in float32 (float64 if the logits are float64) whatever the network's dtype, in row
chunks, with a hand-written backward, so that no full-size float32 copy of the (B, L, V) logits is ever held:
the saved tensor is the logits themselves and the gradient comes back in their dtype.

The tensor-parallel code swaps in vocab-parallel versions with :func:`set_impl` (logits sharded over V, ids
global); objectives call the public functions below and never see the difference.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

CHUNK_ELEMENTS = 1 << 26  # per-chunk float32 temporaries: 256 MiB


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dt = torch.float32
    for t in tensors:
        dt = torch.promote_types(dt, t.dtype)
    return dt


def _chunks(n_rows: int, vocab: int):
    step = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


def _rows(x: torch.Tensor, s: int, e: int, dtype: torch.dtype, suppress_id: Optional[int]) -> torch.Tensor:
    c = x[s:e].to(dtype, copy=True)
    if suppress_id is not None:
        c[:, suppress_id] = float("-inf")
    return c


class _GatherLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, index, suppress_id):
        V, K = logits.shape[-1], index.shape[-1]
        x, idx = logits.reshape(-1, V), index.reshape(-1, K)
        dtype = _compute_dtype(logits)
        lse = torch.empty(x.shape[0], dtype=dtype, device=logits.device)
        gathered = torch.empty(x.shape[0], K, dtype=dtype, device=logits.device)
        for s, e in _chunks(x.shape[0], V):
            c = _rows(x, s, e, dtype, suppress_id)
            lse[s:e] = torch.logsumexp(c, dim=-1)
            gathered[s:e] = c.gather(1, idx[s:e])
        ctx.save_for_backward(logits, index, lse)
        ctx.suppress_id = suppress_id
        return gathered.view(*index.shape), lse.view(logits.shape[:-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_gathered, g_lse):
        logits, index, lse = ctx.saved_tensors
        V, K = logits.shape[-1], index.shape[-1]
        x, idx = logits.reshape(-1, V), index.reshape(-1, K)
        dtype = lse.dtype
        grad = torch.empty(x.shape, dtype=logits.dtype, device=x.device)
        g_gathered = None if g_gathered is None else g_gathered.reshape(-1, K).to(dtype)
        g_lse = None if g_lse is None else g_lse.reshape(-1).to(dtype)
        for s, e in _chunks(x.shape[0], V):
            if g_lse is not None:  # d lse / d logits = softmax
                gr = torch.exp(_rows(x, s, e, dtype, ctx.suppress_id) - lse[s:e, None]).mul_(g_lse[s:e, None])
            else:
                gr = torch.zeros(e - s, V, dtype=dtype, device=x.device)
            if g_gathered is not None:
                gr.scatter_add_(1, idx[s:e], g_gathered[s:e])
            if ctx.suppress_id is not None:
                gr[:, ctx.suppress_id] = 0
            grad[s:e] = gr
        return grad.view(logits.shape), None, None


class _SoftmaxExpectation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, values, suppress_id):
        V = logits.shape[-1]
        x = logits.reshape(-1, V)
        dtype = _compute_dtype(logits, values)
        vals = values.to(dtype)
        out = torch.empty(x.shape[0], dtype=dtype, device=logits.device)
        for s, e in _chunks(x.shape[0], V):
            out[s:e] = torch.softmax(_rows(x, s, e, dtype, suppress_id), dim=-1) @ vals
        ctx.save_for_backward(logits, values, out)
        ctx.suppress_id = suppress_id
        return out.view(logits.shape[:-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        logits, values, out = ctx.saved_tensors
        V = logits.shape[-1]
        x = logits.reshape(-1, V)
        dtype = out.dtype
        vals, g = values.to(dtype), g.reshape(-1).to(dtype)
        grad = torch.empty(x.shape, dtype=logits.dtype, device=x.device) if ctx.needs_input_grad[0] else None
        grad_values = torch.zeros(V, dtype=dtype, device=x.device) if ctx.needs_input_grad[1] else None
        for s, e in _chunks(x.shape[0], V):
            p = torch.softmax(_rows(x, s, e, dtype, ctx.suppress_id), dim=-1)
            if grad_values is not None:
                grad_values += g[s:e] @ p
            if grad is not None:  # d E / d logit_v = p_v (values_v − E)
                grad[s:e] = p.mul_(vals[None, :] - out[s:e, None]).mul_(g[s:e, None])
        return (None if grad is None else grad.view(logits.shape),
                None if grad_values is None else grad_values.to(values.dtype), None)


def _local_gather_lse(logits, index, suppress_id=None):
    return _GatherLSE.apply(logits, index, suppress_id)


def _local_softmax_expectation(logits, values, suppress_id=None):
    return _SoftmaxExpectation.apply(logits, values, suppress_id)


_IMPL: dict[str, Callable] = {"gather_lse": _local_gather_lse, "softmax_expectation": _local_softmax_expectation}


def gather_lse(logits: torch.Tensor, index: torch.Tensor, suppress_id: Optional[int] = None):
    """(logits[..., index] as float, logsumexp(logits) over classes) for ``index`` of shape (..., K).

    With ``suppress_id`` the class is treated as having logit −∞ (MDLM's zero-masking / MD4's "no mask
    output"): excluded from the normaliser, gathered as −∞, and it receives no gradient.
    Returns ((..., K), (...)) tensors in float32 (float64 for float64 logits).
    """
    return _IMPL["gather_lse"](logits, index, suppress_id)


def target_logprob(logits: torch.Tensor, target: torch.Tensor, suppress_id: Optional[int] = None) -> torch.Tensor:
    """log softmax(logits)[target], shape of ``target``; −∞ where target == suppress_id."""
    g, lse = gather_lse(logits, target.unsqueeze(-1), suppress_id)
    return g.squeeze(-1) - lse


def softmax_expectation(logits: torch.Tensor, values: torch.Tensor, suppress_id: Optional[int] = None):
    """Σ_v softmax(logits)_v · values_v over the last axis (``values``: (V,), differentiable)."""
    return _IMPL["softmax_expectation"](logits, values, suppress_id)


def set_impl(gather_lse: Optional[Callable] = None, softmax_expectation: Optional[Callable] = None) -> dict:
    """Replace the implementations (same signatures); returns the previous ones, for :func:`use_impl`."""
    prev = dict(_IMPL)
    if gather_lse is not None:
        _IMPL["gather_lse"] = gather_lse
    if softmax_expectation is not None:
        _IMPL["softmax_expectation"] = softmax_expectation
    return prev


@contextlib.contextmanager
def use_impl(**impls):
    prev = set_impl(**impls)
    try:
        yield
    finally:
        _IMPL.clear()
        _IMPL.update(prev)
