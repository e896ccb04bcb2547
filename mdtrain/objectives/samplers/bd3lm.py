"""Block-by-block sampling for bd3lm (Arriola et al. 2025, Sec. 3): blocks left to right, each denoised by
MDLM's exact absorbing posterior conditioned on the clean blocks before it, to any length.

With a KV cache (``model_fn.new_kv_cache()``, the DiT's) the clean blocks' keys and values are computed once,
when a block is finished, attending to the cache and to themselves — the block-causal rows of the training mask —
and every denoising step runs the block alone against the cache: exact, not an approximation. Past the model
length the context slides block by block: a block sees the ``seq_len / block_size − 1`` blocks before it
(the reference's sliding window); positions stay absolute (RoPE only sees their differences). Without a cache the
same function is recomputed from the whole history under the banded block-causal mask, so both give the same
samples for the same generator (up to float rounding of the logits).

Per block: a uniform grid of ``steps`` from t = 1 to ``t_min``, reveal probability (α_s − α_t)/(1 − α_t), the
token from x_θ after nucleus filtering (float64 categoricals); ``ddpm_cache`` re-runs the network only when the
block changed (exact without time conditioning); masks left at the end are filled greedily (or ancestrally).
With ``eos_id`` a sequence stops at its first generated EOS: the rest of its row is EOS and ``lengths`` says where
it ends; finished sequences leave the batch (and the cache).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from mdtrain.objectives.bd3lm import block_causal_mask
from mdtrain.objectives.samplers.categorical import categorical, nucleus, uniform


class _Blocks:
    """The network calls of one batch: with a KV cache or from the whole history."""

    def __init__(self, objective, model_fn, x, seq_len: int, use_cache: bool, stats):
        self.obj, self.fn, self.x, self.stats = objective, model_fn, x, stats
        self.b = objective.block_size
        self.window = seq_len // self.b  # blocks a query may see, its own included
        self.cache = model_fn.new_kv_cache() if use_cache else None
        self.active = torch.arange(x.shape[0], device=x.device)

    def _cond(self, n: int, length: int, t_noisy: float, noisy_from: int):
        obj = self.obj
        if not obj.time_conditioning:
            return obj.cond(torch.zeros(n, dtype=torch.float64, device=self.x.device))
        t = torch.zeros(n, length, dtype=torch.float64, device=self.x.device)
        t[:, noisy_from:] = t_noisy
        return obj.cond(t)

    def logits(self, k: int, blk: torch.Tensor, t: float) -> torch.Tensor:
        """Logits (n_active, b, V) of noisy block k (tokens ``blk``) at time t."""
        n, b = blk.shape
        self.stats.nfe += 1
        self.stats.per_sample[self.active] += 1
        if self.cache is not None:
            return self.fn(blk, self._cond(n, b, t, 0), kv_cache=self.cache)
        hist = self.x[self.active, :k * b]
        inp = torch.cat([hist, blk], 1)
        mask = block_causal_mask(inp.shape[1], b, self.window, device=inp.device)[None]
        pos = torch.arange(inp.shape[1], device=inp.device)
        return self.fn(inp, self._cond(n, inp.shape[1], t, k * b), mask, positions=pos,
                       logits_for=slice(k * b, None))

    def commit(self, k: int, blk: torch.Tensor) -> None:
        """Block k is final: add its keys and values to the cache (nothing to do without one)."""
        if self.cache is None:
            return
        self.fn(blk, self._cond(blk.shape[0], blk.shape[1], 0.0, blk.shape[1]), kv_cache=self.cache, store_kv=True,
                logits_for=slice(0, 0))
        self.cache.keep_last((self.window - 1) * self.b)

    def keep(self, rows: torch.Tensor) -> None:
        """Only the active sequences ``rows`` (bool over the active ones) go on."""
        idx = rows.nonzero(as_tuple=True)[0]
        self.active = self.active[idx]
        if self.cache is not None:
            self.cache = self.cache.index_select(idx)


def _denoise(net: _Blocks, k: int, blk: torch.Tensor, times, generator, *, reuse: bool, top_p: float,
             noise_removal: str) -> torch.Tensor:
    obj, mask_id = net.obj, net.obj.mask_id
    logits = None
    for i in range(len(times) - 1):
        t, s = float(times[i]), float(times[i + 1])
        masked = blk == mask_id
        if not masked.any():
            return blk
        if logits is None or not reuse:
            logits = net.logits(k, blk, t)
        b_idx, l_idx = masked.nonzero(as_tuple=True)
        n = b_idx.numel()
        tt = torch.full((n,), t, dtype=torch.float64, device=blk.device)
        ss = torch.full((n,), s, dtype=torch.float64, device=blk.device)
        rows = logits[b_idx, l_idx] if obj.rows_for_unmask_prob else None
        go = uniform(n, generator, blk.device) < obj.unmask_prob(rows, tt, ss)
        if go.any():
            gb, gl = b_idx[go], l_idx[go]
            w = nucleus(obj.reveal_logits(logits[gb, gl], tt[go], ss[go]), top_p)
            blk[gb, gl] = categorical(w, generator)
            logits = None  # the block changed: the next step needs the network again
    left = blk == mask_id
    if left.any():
        if logits is None:
            logits = net.logits(k, blk, float(times[-1]))
        b_idx, l_idx = left.nonzero(as_tuple=True)
        w = obj.denoiser_logprobs(logits[b_idx, l_idx])
        w[:, mask_id] = -math.inf
        blk[b_idx, l_idx] = w.argmax(-1) if noise_removal == "greedy" else categorical(nucleus(w, top_p), generator)
    return blk


@torch.no_grad()
def sample_blocks(objective, model_fn, template: torch.Tensor, seq_len: int, steps: int, generator, *,
                  reuse_logits: bool, top_p: float = 1.0, t_min: float = 1e-5, noise_removal: str = "greedy",
                  eos_id: Optional[int] = None, kv_cache: Optional[bool] = None, stats=None):
    """Fill the mask_id positions of ``template`` (B, N), any N, block by block; returns (tokens (B, N),
    lengths (B,), info). ``seq_len`` is the model length (the context window); ``steps`` per block; ``kv_cache``
    None uses one when ``model_fn`` offers ``new_kv_cache``."""
    b = objective.block_size
    if seq_len % b:
        raise ValueError(f"bd3lm sampling: objective.block_size={b} must divide the model length {seq_len}")
    if noise_removal not in ("greedy", "ancestral"):
        raise ValueError(f"bd3lm commits every block before the next: sample.noise_removal must be greedy or "
                         f"ancestral, got {noise_removal!r}")
    B, N = template.shape
    if objective.ignore_bos and bool((template[:, 0] == objective.mask_id).any()):
        raise ValueError("bd3lm was trained with the first token as context (objective.ignore_bos): give it "
                         "(bos_id= or a prefix)")
    n_blocks = -(-N // b)
    x = torch.full((B, n_blocks * b), objective.mask_id, dtype=torch.long, device=template.device)
    x[:, :N] = template
    free = x == objective.mask_id
    use_cache = hasattr(model_fn, "new_kv_cache") if kv_cache is None else kv_cache
    if use_cache and not hasattr(model_fn, "new_kv_cache"):
        raise ValueError("kv_cache=True needs a model_fn with new_kv_cache (the DiT's, through make_model_fn)")
    net = _Blocks(objective, model_fn, x, seq_len, use_cache, stats)
    times = torch.linspace(1.0, t_min, steps + 1, dtype=torch.float64)
    lengths = torch.full((B,), N, dtype=torch.long, device=x.device)
    for k in range(n_blocks):
        sl = slice(k * b, (k + 1) * b)
        blk = x[net.active, sl].clone()
        blk = _denoise(net, k, blk, times, generator, reuse=reuse_logits and not objective.time_conditioning,
                       top_p=top_p, noise_removal=noise_removal)
        x[net.active, sl] = blk
        if eos_id is not None:
            hit = (blk == eos_id) & free[net.active, sl]
            done = hit.any(1)
            if done.any():
                rows = net.active[done]
                first = hit[done].float().argmax(1)  # the first EOS of each finished row
                lengths[rows] = (k * b + first + 1).clamp(max=N)
                cols = torch.arange(x.shape[1], device=x.device)[None]
                tail = cols >= lengths[rows][:, None]
                x[rows] = torch.where(tail, torch.full_like(x[rows], eos_id), x[rows])
                net.keep(~done)
                if net.active.numel() == 0:
                    break
        if k < n_blocks - 1:
            net.commit(k, x[net.active, sl])
    return x[:, :N], lengths, {"kv_cache": use_cache, "block_size": b}
