"""BD3-LM, block diffusion (Arriola et al., "Block Diffusion: Interpolating Between Autoregressive and Diffusion
Language Models", ICLR 2025): masked diffusion inside blocks of ``block_size`` tokens, blocks left to right.

The likelihood factorises over blocks, log p(x) = Σ_k log p_θ(x^k | x^{<k}), and each factor gets MDLM's
Rao-Blackwellised NELBO (the paper's Sec. 3): block k at its own noise level t_k; per masked token of the block
−log p_θ(x0 | z^k_t, x^{<k}) · (−α′(t_k)/(1 − α(t_k))). All blocks are trained in one pass (its vectorised
training algorithm) on the 2L input x_t ⊕ x_0 under its attention mask (:func:`block_diffusion_mask`):

* block diagonal: a noisy block attends to itself, a clean block to itself;
* offset block causal: noisy block k attends to the clean blocks < k;
* block causal: clean block k attends to the clean blocks ≤ k (the keys a KV cache holds at sampling time).

Both halves carry the positions 0..L−1 (RoPE). Block size L is MDLM; block size 1 with the first token kept as
context (``ignore_bos``) is the AR likelihood of the same network, each token predicted at its own (masked)
position from the clean prefix — the paper's shift. The NELBO is in nats per scored token.

Clipped ("variance-reduced") schedules (the paper's Sec. 5): training draws t ~ U[β, ω] (``objective.clip``), optionally with
each block's masked fraction kept inside [β, ω] (``objective.resample``, the reference code's rejection
resampling, here drawn exactly from the truncated binomial). That is a training surrogate, not a bound: evaluation
(gradients off, or ``objective.eval()``) always draws t on the full interval, so reported numbers are NELBOs.
With block size 1 (loglinear, no time conditioning) evaluation uses t = 1 — every token masked, weight 1 — which
is the exact NLL, as the paper reports it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from mdtrain.objectives.base import valid_mask
from mdtrain.objectives.subs import SubsObjective


def block_diffusion_mask(length: int, block_size: int, device=None) -> torch.Tensor:
    """The (2L, 2L) bool training mask over x_t ⊕ x_0 (True = query may attend to key)."""
    idx = torch.arange(2 * length, device=device)
    clean = idx >= length
    block = (idx % length) // block_size
    q_clean, k_clean = clean[:, None], clean[None, :]
    q_blk, k_blk = block[:, None], block[None, :]
    same = q_blk == k_blk
    # a key in x_0 is seen by the noisy blocks after it and by the clean blocks at or after it; a key in x_t only
    # by its own noisy block
    to_clean = k_clean & ((~q_clean & (k_blk < q_blk)) | (q_clean & (k_blk <= q_blk)))
    to_noisy = ~k_clean & ~q_clean & same
    return to_clean | to_noisy


def block_causal_mask(n_tokens: int, block_size: int, window_blocks: int = 0, first_block: int = 0,
                      device=None) -> torch.Tensor:
    """(n, n) bool: token i attends to token j when j's block is at or before i's and, with ``window_blocks``
    > 0, fewer than ``window_blocks`` blocks back. Tokens are blocks ``first_block``, ``first_block`` + 1, ...
    This is the x_0 part of :func:`block_diffusion_mask` (and, for a noisy last block, its noisy rows): what
    block-by-block sampling computes without a KV cache."""
    blk = torch.arange(n_tokens, device=device) // block_size + first_block
    back = blk[:, None] - blk[None, :]
    allowed = back >= 0
    if window_blocks > 0:
        allowed &= back < window_blocks
    return allowed


def truncated_binomial(n: int, p: torch.Tensor, lo: int, hi: int, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws from Binomial(n, p) conditioned on lo ≤ k ≤ hi (float64 p and u of the same shape):
    what resampling until the count falls in [lo, hi] gives, from one uniform each."""
    k = torch.arange(n + 1, dtype=torch.float64, device=p.device)
    p = p.to(torch.float64).clamp(1e-12, 1 - 1e-12)[..., None]
    logc = math.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
    logpmf = logc + k * torch.log(p) + (n - k) * torch.log1p(-p)
    logpmf = logpmf.masked_fill((k < lo) | (k > hi), -math.inf)
    cdf = torch.cumsum(torch.softmax(logpmf, dim=-1), dim=-1)
    return (cdf < u.to(torch.float64)[..., None]).sum(-1).clamp(lo, hi)


class BD3LM(SubsObjective):
    """Block diffusion with the SUBS parameterisation (``objective.name=bd3lm``); settings ``block_size``,
    ``clip`` ([β, ω] or empty), ``resample`` and ``ignore_bos`` on top of MDLM's."""

    name = "bd3lm"

    def __init__(self, settings, vocab_size, mask_id):
        super().__init__(settings, vocab_size, mask_id)
        self.block_size = int(settings["block_size"])
        clip = list(settings.get("clip") or [])
        self.clip = (float(clip[0]), float(clip[1])) if clip else None
        self.resample = bool(settings.get("resample", False))
        self.ignore_bos = bool(settings.get("ignore_bos", True))
        self.first_target = 1 if self.ignore_bos else 0  # the trainer counts the tokens after the context
        if self.block_size < 1:
            raise ValueError(f"bd3lm needs objective.block_size >= 1, got {self.block_size}")
        self._masks: dict = {}

    # --- shapes and noise ----------------------------------------------------------------------------------
    def n_blocks(self, seq_len: int) -> int:
        if seq_len % self.block_size:
            raise ValueError(f"objective.block_size={self.block_size} must divide the sequence length {seq_len} "
                             "(data.seq_len)")
        return seq_len // self.block_size

    def noise_spec(self, seq_len: int) -> dict:
        nb = self.n_blocks(seq_len)
        spec = {"t": (nb,), "mask": (seq_len,)}
        if self.resample:
            spec["count"] = (nb,)
        return spec

    def _clipped(self) -> bool:
        return self.clip is not None and self.training and torch.is_grad_enabled()

    def block_times(self, u: torch.Tensor) -> torch.Tensor:
        """t (B, n_blocks) float64 from the block uniforms. Block j's uniforms (stratified over the batch) are
        rotated by j/n_blocks so that one sample's blocks fall in different strata."""
        nb = u.shape[1]
        u = torch.frac(u + torch.arange(nb, dtype=u.dtype, device=u.device) / nb)
        if self._clipped():
            lo, hi = self.clip
            return lo + (hi - lo) * u
        if (self.block_size == 1 and not (self.training and torch.is_grad_enabled()) and not self.time_conditioning
                and self.schedule.name == "loglinear"):
            return torch.ones_like(u)  # exact NLL: all masked, weight 1
        return self.sample_time(u)

    def corrupt_blocks(self, x0: torch.Tensor, t: torch.Tensor, noise: dict) -> torch.Tensor:
        """z_t: every block masked at its own rate; at t ≥ 1 everything is masked."""
        b = self.block_size
        t_tok = t.repeat_interleave(b, dim=1)
        if self.resample and self._clipped():
            lo, hi = self.clip
            count = truncated_binomial(b, self.schedule.mask_prob(t), math.ceil(lo * b - 1e-9),
                                       math.floor(hi * b + 1e-9), noise["count"])
            u = noise["mask"].view(x0.shape[0], -1, b)
            rank = u.argsort(-1).argsort(-1)  # the `count` smallest uniforms of a block are masked
            masked = (rank < count[..., None]).view_as(x0)
        else:
            masked = noise["mask"] < self.schedule.mask_prob(t_tok)
        masked = masked | (t_tok >= 1)
        xt = torch.where(masked, torch.full_like(x0, self.mask_id), x0)
        if self.ignore_bos:
            xt[:, 0] = x0[:, 0]
        return xt

    # --- the network's inputs ------------------------------------------------------------------------------
    def training_mask(self, length: int, device) -> torch.Tensor:
        key = (length, str(device))
        if key not in self._masks:
            if len(self._masks) > 8:
                self._masks.clear()
            self._masks[key] = block_diffusion_mask(length, self.block_size, device)
        return self._masks[key]

    def model_inputs(self, xt: torch.Tensor, x0: torch.Tensor, valid: Optional[torch.Tensor], t: torch.Tensor):
        """(x_in (B, 2L), cond, attention mask (1 or B, 2L, 2L), positions (2L,)) for the vectorised pass."""
        B, L = x0.shape
        mask = self.training_mask(L, x0.device)[None]
        if valid is not None and not bool(valid.all()):  # padded keys are invisible in both halves
            keys = torch.cat([valid, valid], 1)
            mask = mask & keys[:, None, :]
        pos = torch.arange(L, device=x0.device).repeat(2)
        if self.time_conditioning:  # per token: a noisy block's own level, clean tokens at t = 0
            t_tok = t.repeat_interleave(self.block_size, dim=1)
            cond = torch.cat([self.cond(t_tok), self.cond(torch.zeros_like(t_tok))], 1)
        else:
            cond = self.cond(torch.zeros(B, dtype=torch.float64, device=x0.device))
        return torch.cat([xt, x0], 1), cond, mask, pos

    # --- the loss ------------------------------------------------------------------------------------------
    def scored(self, x0: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """The tokens the NELBO counts: valid ones, minus the first (context) with ``ignore_bos``."""
        valid = valid_mask(x0, attention_mask).clone()
        if self.ignore_bos:
            valid[:, 0] = False
        return valid

    def loss(self, model_fn, x0, attention_mask=None, generator=None, noise=None):
        L = x0.shape[1]
        noise = self._get_noise(noise, generator, x0)
        valid = valid_mask(x0, attention_mask)
        t = self.block_times(noise["t"])
        xt = self.corrupt_blocks(x0, t, noise)
        x_in, cond, mask, pos = self.model_inputs(xt, x0, valid, t)
        logits = model_fn(x_in, cond, mask, positions=pos, logits_for=slice(0, L))
        scored = self.scored(x0, attention_mask)
        per_token = self.nelbo(logits, x0, xt, t, scored)
        return self._finish(per_token, scored, masked_tokens=((xt == self.mask_id) & scored).sum())

    def nelbo(self, logits, x0, xt, t, attention_mask=None):
        """Per-token NELBO (B, L) in nats from the logits at the noisy half; ``t`` per sequence (B,), per block
        (B, n_blocks) or per token (B, L). 0 at unmasked and invalid positions."""
        B, L = x0.shape
        t = t.to(torch.float64)
        if t.dim() == 1:
            t = t[:, None].expand(B, L)
        elif t.shape[1] != L:
            t = t.repeat_interleave(L // t.shape[1], dim=1)
        valid = valid_mask(x0, attention_mask)
        sel = (xt == self.mask_id) & valid
        logp = self.logprob.target_logprob(logits, x0, self.mask_id)
        logp = torch.where(sel, logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
        return -logp * self.weight(t).to(logp.dtype)
