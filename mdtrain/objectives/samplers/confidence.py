"""Confidence-based parallel decoding in semi-autoregressive blocks: LLaDA's low-confidence remasking (Nie et al.
2025, "Large Language Diffusion Models", §2.4 and App. B, Alg. 5) and Fast-dLLM's threshold rule (Wu et al.
2025, "Fast-dLLM", §3.3, Eq. 4).

The free positions are cut into blocks of ``block_length`` from the first free one (0 = one block); blocks are
decoded left to right. At every step each masked position of the current block gets a candidate x̂ (argmax of
x_θ, or a draw from x_θ^{1/temperature}) and a confidence c = x_θ(x̂) (``remasking=random``: c ~ U(0, 1)), then
  - ``llada``: the k most confident candidates are kept and the rest stay masked (remasked), with the block's
    masks spread evenly over its share of ``steps`` (LLaDA's ``get_num_transfer_tokens``);
  - ``fast_dllm``: every candidate with c ≥ ``threshold`` is kept, and at least the most confident one; the number
    of steps adapts (``steps`` unused).
Neither is an exact sampler of p_θ: they trade fidelity for calls. With temperature 0 both are deterministic.

``prefix_cache`` (off by default) is Fast-dLLM's approximate prefix KV cache (§3.2): at the start of a block the
network runs on the whole window and the keys/values of the positions before the block are kept; the block's
later steps run the network on the block and what follows only, attending to that cache. It is approximate for
a bidirectional backbone — the cached prefix was computed while the block was still masked and is not updated
as the block fills in (and a time-conditioned network keeps the prefix at the block's first time). It needs the
backbone's KV-cache hook (``model_fn.new_kv_cache``; the DiT has it).
"""
from __future__ import annotations

import math

import torch

from mdtrain.objectives.samplers.categorical import categorical, nucleus, uniform
from mdtrain.objectives.samplers.common import Net, time_at_mask_fraction

REMASKING = ("low_confidence", "random")


def clean_logprobs(objective, rows: torch.Tensor) -> torch.Tensor:
    """log x_θ over the real tokens (mask class −∞, renormalised), float64 (N, V)."""
    w = objective.denoiser_logprobs(rows)
    w[:, objective.mask_id] = -math.inf
    return torch.log_softmax(w, dim=-1)


def blocks_of(free: torch.Tensor, block_length: int) -> list[tuple[int, int]]:
    """[start, end) blocks covering the window from the first free column (none if nothing is free)."""
    cols = free.any(0).nonzero(as_tuple=True)[0]
    if cols.numel() == 0:
        return []
    start, L = int(cols[0]), free.shape[1]
    size = block_length if block_length > 0 else L - start
    return [(a, min(a + size, L)) for a in range(start, L, size)]


def transfer_counts(masks: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, steps) tokens to reveal per step: masks // steps each, the remainder one more on the first steps."""
    i = torch.arange(steps, device=masks.device)[None]
    return masks[:, None] // steps + (i < (masks % steps)[:, None]).long()


def denoise_confidence(objective, net: Net, x: torch.Tensor, generator, *, rule: str, steps: int,
                       block_length: int, remasking: str, temperature: float, threshold: float, top_p: float,
                       prefix_cache: bool) -> torch.Tensor:
    """Fill x (B, L) in place (mask_id = free) block by block."""
    mask_id, dev = objective.mask_id, x.device
    B, L = x.shape
    blocks = blocks_of(x == mask_id, block_length)
    if rule == "llada" and steps < len(blocks):
        raise ValueError(f"llada needs at least one step per block: steps={steps} < {len(blocks)} blocks of "
                         f"block_length={block_length}; raise steps or block_length")
    cols = torch.arange(L, device=dev)
    for b, (a, e) in enumerate(blocks):
        in_block = (cols >= a) & (cols < e)
        n_steps = steps // len(blocks) + (b < steps % len(blocks))
        counts = transfer_counts(((x == mask_id) & in_block).sum(1), n_steps) if rule == "llada" else None
        cache = _PrefixCache(net, a) if prefix_cache else None
        i = 0
        while True:
            masked = (x == mask_id) & in_block
            rows = masked.any(1)
            if counts is not None:
                if i >= n_steps:
                    break
                rows &= counts[:, i] > 0
            i += 1
            if not rows.any():
                if counts is None or not masked.any():
                    break
                continue
            idx = rows.nonzero(as_tuple=True)[0]
            xs = x[idx]
            t = time_at_mask_fraction(objective, (xs == mask_id).double().mean(1))
            logits = cache(xs, t, idx) if cache is not None else net(xs, t, idx)
            cand = masked[idx]
            bi, li = cand.nonzero(as_tuple=True)
            off = L - logits.shape[1]  # the cache returns the logits of positions a.. only
            logp = clean_logprobs(objective, logits[bi, li - off])
            if temperature > 0:
                guess = categorical(nucleus(logp / temperature, top_p), generator)
            else:
                guess = logp.argmax(-1)
            if remasking == "low_confidence":
                c = logp.gather(1, guess[:, None]).squeeze(1).exp()
            else:
                c = uniform(bi.numel(), generator, dev)
            conf = torch.full(cand.shape, -math.inf, dtype=torch.float64, device=dev)
            conf[bi, li] = c
            order = conf.argsort(dim=1, descending=True, stable=True)  # ties: the leftmost first
            rank = torch.empty_like(order).scatter_(1, order, cols.expand_as(order))
            if counts is not None:
                keep = (rank < counts[idx, i - 1][:, None]) & cand
            else:
                keep = ((conf >= threshold) | (rank == 0)) & cand
            new = xs.clone()
            new[bi, li] = guess
            x[idx] = torch.where(keep, new, xs)
    return x


class _PrefixCache:
    """Fast-dLLM's prefix cache for one block starting at column ``a`` (approximate; see the module doc), through
    the backbone's KV-cache protocol: ``model_fn.new_kv_cache()``, ``model_fn(x, cond, kv_cache=c, store_kv=True)``
    (keys/values of every position appended to c), ``c.truncate(n)``, ``c.index_select(rows)``, and
    ``model_fn(x_tail, cond, kv_cache=c)`` (the tail attends to the cached tokens and to itself; positions continue
    after the cache)."""

    def __init__(self, net: Net, a: int):
        if not hasattr(net.fn, "new_kv_cache"):
            raise ValueError("prefix_cache=true needs a backbone with the KV-cache hook (model_fn.new_kv_cache: the "
                             "DiT has it); this model_fn has none: set prefix_cache=false")
        self.net, self.a, self.kv, self.rows = net, a, None, None

    def __call__(self, xs, t, idx):
        net, a, fn = self.net, self.a, self.net.fn
        if a == 0:  # nothing before the block: the plain call
            return net(xs, t, idx)
        if self.kv is None:  # the block's first step: the full window, keeping the prefix's keys and values
            cache = fn.new_kv_cache()
            out = net.call_with(xs, t, idx, lambda x, c: fn(x, c, kv_cache=cache, store_kv=True))
            self.kv, self.rows = cache.truncate(a), idx
            return out
        kv = self.kv if idx.numel() == self.rows.numel() else self.kv.index_select(torch.searchsorted(self.rows, idx))
        return net.call_with(xs[:, a:], t, idx, lambda x, c: fn(x, c, kv_cache=kv))
