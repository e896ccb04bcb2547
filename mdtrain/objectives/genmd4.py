"""GenMD4 (md4/models/diffusion/genmd4.py): a learnable per-token-value polynomial schedule and its RLOO gradient.

α_{t,v} = 1 − (1−ε)·t^{w_v}, w = softplus(w_raw) of shape (V,), initialised to ``power_init`` (1 = linear); the
weight α′/(1−α) is exactly −w_v/t. t = t1 + (1−t1)u with t1 = ``sampling_eps``; [0, t1) is covered by an analytic
reconstruction term. Per masked token (Eq. 12 integrand, summed over v):
    ℓ = −(1/t)·[ w_{x0}·(log p_θ(x0) + 1) − Σ_v w_v p_θ(v) ]
which reduces to MD4 polyK's (K/t)·(−log p_θ(x0)) when every w_v = K. Two independent masks z¹, z² share t; the
surrogate ½(ℓ¹+ℓ²) + ½·sg(ℓ¹−ℓ²)·(log q(z¹) − log q(z²)) + recon gives the paper's unbiased gradient for w.
``nll_sum`` reports ½(ℓ¹+ℓ²) + recon, never the surrogate.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from mdtrain.objectives.base import MaskedObjective, valid_mask


class GenMD4Schedule(nn.Module):
    """Vector-valued schedule: every method returns (..., V) for t of shape (...)."""

    name = "genmd4_poly"

    def __init__(self, vocab_size: int, mask_id: int, eps: float = 1e-4, power_init: float = 1.0):
        super().__init__()
        self.eps, self.mask_id = eps, mask_id
        # softplus⁻¹(power_init); the mask entry is never read (a mask is never a clean token).
        self.w_raw = nn.Parameter(torch.full((vocab_size,), math.log(math.expm1(power_init))))

    @property
    def power(self) -> torch.Tensor:
        return F.softplus(self.w_raw)

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        return (1 - self.eps) * t[..., None] ** self.power.to(t.dtype)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1 - self.mask_prob(t)

    def dalpha(self, t: torch.Tensor) -> torch.Tensor:
        w = self.power.to(t.dtype)
        return -(1 - self.eps) * w * t[..., None] ** (w - 1)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        return -self.power.to(t.dtype) / t[..., None]


class GenMD4(MaskedObjective):
    name = "genmd4"
    reports_bits = True

    def __init__(self, settings, vocab_size, mask_id):
        eps = 1e-4 if settings["schedule_eps"] is None else settings["schedule_eps"]
        schedule = GenMD4Schedule(vocab_size, mask_id, eps=eps, power_init=settings["genmd4_power_init"])
        super().__init__(settings, vocab_size, mask_id, schedule=schedule)

    def noise_spec(self, seq_len):
        return {"t": (), "mask": (seq_len,), "mask2": (seq_len,)}

    def cond_value(self, t):
        return t

    def mask_prob(self, t, x0):
        w_x = self.schedule.power.detach().to(torch.float64)[x0]
        return (1 - self.schedule.eps) * t[:, None] ** w_x

    def diffusion_terms(self, logits, x0, xt, t, valid):
        """Per-token Eq. 12 integrand ℓ (0 where not masked and valid), float32 (B, L); differentiable in the
        logits and in w (pathwise part)."""
        sel = (xt == self.mask_id) & valid
        w = self.schedule.power
        logp = self.logprob.target_logprob(logits, x0, self.mask_id)
        zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
        logp = torch.where(sel, logp, zero)
        e_w = self.logprob.softmax_expectation(logits, w, self.mask_id)
        inv_t = (1 / t.to(torch.float64)).to(logp.dtype)[:, None]
        return torch.where(sel, -inv_t * (w[x0] * (logp + 1) - e_w), zero)

    def recon(self, x0, valid):
        """Reconstruction at t1 with p(v | masked) ∝ t1^{w_v}: −(1−ε)·t1^{w_x0}·(w_x0 ln t1 − logsumexp_v w_v ln t1)."""
        w = self.schedule.power
        log_t1 = math.log(self.sampling_eps)
        lse = torch.logsumexp(self._real(w) * log_t1, dim=0)
        wlogt_x = w[x0] * log_t1
        rec = -(1 - self.schedule.eps) * torch.exp(wlogt_x) * (wlogt_x - lse)
        return torch.where(valid, rec, torch.zeros((), dtype=rec.dtype, device=rec.device))

    def log_q(self, x0, xt, t, valid):
        """log q(z_t | x0) summed over valid positions, (B,), differentiable in w."""
        w_x = self.schedule.power[x0]
        log_t = torch.log(t.to(torch.float64)).to(w_x.dtype)[:, None]
        eps = self.schedule.eps
        log_masked = math.log1p(-eps) + w_x * log_t
        log_kept = torch.log1p(-(1 - eps) * torch.exp(w_x * log_t))
        lq = torch.where(xt == self.mask_id, log_masked, log_kept)
        return torch.where(valid, lq, torch.zeros((), dtype=lq.dtype, device=lq.device)).sum(1)

    def nelbo(self, logits, x0, xt, t, attention_mask=None):
        valid = valid_mask(x0, attention_mask)
        return self.diffusion_terms(logits, x0, xt, t, valid) + self.recon(x0, valid)

    def loss(self, model_fn, x0, attention_mask=None, generator=None, noise=None):
        noise = self._get_noise(noise, generator, x0)
        valid = valid_mask(x0, attention_mask)
        t = self.sample_time(noise["t"])
        cond = self.cond(t)
        z1, z2 = self.corrupt(x0, t, noise["mask"]), self.corrupt(x0, t, noise["mask2"])
        l1 = self.diffusion_terms(model_fn(z1, cond), x0, z1, t, valid).sum(1)
        l2 = self.diffusion_terms(model_fn(z2, cond), x0, z2, t, valid).sum(1)
        rloo = 0.5 * (l1 - l2).detach() * (self.log_q(x0, z1, t, valid) - self.log_q(x0, z2, t, valid))
        recon = self.recon(x0, valid).sum(1)
        power = self._real(self.schedule.power.detach())
        return self._finish(0.5 * (l1 + l2) + recon, valid, surrogate=rloo, rloo_sum=rloo.sum(),
                            power_min=power.min(), power_max=power.max(), power_mean=power.mean())

    def _real(self, per_class: torch.Tensor) -> torch.Tensor:
        """The entries of the real tokens (every class but the mask)."""
        return torch.cat([per_class[:self.mask_id], per_class[self.mask_id + 1:]])

    # --- sampling: the state-dependent reverse step (MD4 ships none; this is q(z_s | z_t, x0 = x_θ)) ---------
    rows_for_unmask_prob = True

    def reveal_coefficients(self, t, s):
        """c_v = (α_{s,v} − α_{t,v})/(1 − α_{t,v}) = 1 − (s/t)^{w_v}, (N, V) float64."""
        w = self.schedule.power.detach().to(torch.float64)
        return -torch.expm1(w * torch.log((s / t).clamp_min(1e-300))[:, None])

    def unmask_prob(self, rows, t, s):
        c = self.reveal_coefficients(t, s)
        return (torch.exp(self.denoiser_logprobs(rows)) * c).sum(-1).clamp(0, 1)

    def reveal_logits(self, rows, t, s):
        return self.denoiser_logprobs(rows) + torch.log(self.reveal_coefficients(t, s))
