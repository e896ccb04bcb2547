"""Left-to-right sampling for the ar objective, with the model's KV cache when it has one.

KV-cache protocol: ``model_fn.decode_step(tokens_new [B, k], cache) -> (logits [B, k, V], cache)``, ``cache=None``
starting fresh (``Transformer.decode_step`` implements it). Without it the whole prefix is recomputed each step.
Both paths consume the generator identically, so they give the same tokens for the same logits.
"""
from __future__ import annotations

import math

import torch

from mdtrain.objectives.samplers.categorical import categorical, nucleus


def sample_ar(objective, model_fn, template: torch.Tensor, generator, *, top_p: float, stats) -> torch.Tensor:
    """``template`` (B, L): given tokens (position 0 at least — BOS), mask_id where free."""
    x = template.clone()
    free = x == objective.mask_id
    if free[:, 0].any():
        raise ValueError("ar sampling needs the first token of every sequence (BOS): pass bos_id= or a prefix")
    free_cols = free.any(0).nonzero()
    if free_cols.numel() == 0:
        return x
    B, L = x.shape
    n0 = int(free_cols[0])
    cond = objective.cond(torch.zeros(B, device=x.device))
    decode = getattr(model_fn, "decode_step", None)

    def run(fn, *args):
        stats.nfe += 1
        stats.per_sample += 1
        return fn(*args)

    if decode is not None:
        logits, cache = run(decode, x[:, :n0], None)
        last = logits[:, -1]
    for i in range(n0, L):
        if decode is None:
            last = run(model_fn, x[:, :i], cond)[:, -1]
        w = last.to(torch.float64, copy=True)
        w[:, objective.mask_id] = -math.inf
        tok = categorical(nucleus(torch.log_softmax(w, dim=-1), top_p), generator)
        x[:, i] = torch.where(free[:, i], tok, x[:, i])
        if decode is not None and i < L - 1:
            logits, cache = run(decode, x[:, i:i + 1], cache)
            last = logits[:, -1]
    return x
