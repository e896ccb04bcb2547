"""Absorbing D3PM: plain softmax x_θ over all classes (mass on the mask allowed), exact per-step KL, discrete T,
plus the reconstruction term −log p_θ(x0 | x0, t = 0) from a second network pass on the clean input.

Per masked token (MDLM's ``_d3pm_loss``, written for any schedule; with α = 1 − t it is that code exactly),
with a = (α_s−α_t)/(1−α_t), b = (1−α_s)/(1−α_t), x_m = x_θ(mask):
    T · { a·[log(1 + α_t x_m/(1−α_t)) − log x_θ(x0)] + b·[log(1 + α_t x_m/(1−α_t)) − log(1 + α_s x_m/(1−α_s))] }
which is KL(q(z_s | z_t, x0) ‖ q(z_s | z_t, x_θ)) for the D3PM posterior with x_θ on the mask class.
"""
from __future__ import annotations

import torch

from mdtrain.objectives.base import MaskedObjective, valid_mask


class D3PM(MaskedObjective):
    name = "d3pm"

    def __init__(self, settings, vocab_size, mask_id):
        super().__init__(settings, vocab_size, mask_id)
        self.subs_masking = bool(settings["subs_masking"])
        self.suppress_id = mask_id if self.subs_masking else None
        self.rows_for_unmask_prob = not self.subs_masking

    def nelbo_extras(self, model_fn, x0, t):
        return {"recon_logits": model_fn(x0, self.cond(torch.zeros_like(t)))}

    def nelbo(self, logits, x0, xt, t, attention_mask=None, recon_logits=None):
        """Diffusion KL terms at (xt, t); plus the reconstruction term when ``recon_logits`` (the network's
        output on the clean x0 at t = 0) is given — the full NELBO needs both passes."""
        valid = valid_mask(x0, attention_mask)
        sel = (xt == self.mask_id) & valid
        index = torch.stack([x0, torch.full_like(x0, self.mask_id)], dim=-1)
        g, lse = self.logprob.gather_lse(logits, index, self.suppress_id)
        # The KL arithmetic is done in float64 on (B, L) tensors: 1/(1−α_s) is huge near s = 0.
        f64 = torch.float64
        zero = torch.zeros((), dtype=f64, device=lse.device)
        log_x0 = torch.where(sel, (g[..., 0] - lse).to(f64), zero)
        x_m = torch.exp(g[..., 1] - lse).to(f64)  # 0 under subs_masking

        t = t.to(f64)
        s = (t - 1.0 / self.T).clamp_min(0)
        sch = self.schedule
        a_t, mp_t, a_s, mp_s = sch.alpha(t), sch.mask_prob(t), sch.alpha(s), sch.mask_prob(s)
        coef1 = ((mp_t - mp_s) / mp_t)[:, None]
        coef2 = (mp_s / mp_t)[:, None]
        ratio_s = torch.where(mp_s > 0, a_s / mp_s.clamp_min(1e-300), 0)[:, None]  # b = 0 when α_s = 1
        log_nr = torch.log1p((a_t / mp_t)[:, None] * x_m)
        kl = coef1 * (log_nr - log_x0) + coef2 * (log_nr - torch.log1p(ratio_s * x_m))
        per_token = torch.where(sel, self.T * kl, zero).to(lse.dtype)
        zero = zero.to(lse.dtype)
        if recon_logits is not None:
            rec = self.logprob.target_logprob(recon_logits, x0, self.suppress_id)
            per_token = per_token - torch.where(valid, rec, zero)
        return per_token

    def denoiser_logprobs(self, rows):
        if self.subs_masking:
            return super().denoiser_logprobs(rows)
        return torch.log_softmax(rows.to(torch.float64), dim=-1)

    def unmask_prob(self, rows, t, s):
        """With x_m = x_θ(mask): P(reveal) = (α_s−α_t)(1−x_m) / ((1−α_t)(1−x_m) + x_m) (exact D3PM posterior)."""
        if self.subs_masking:
            return super().unmask_prob(rows, t, s)
        x_m = torch.exp(self.denoiser_logprobs(rows)[:, self.mask_id])
        mp_t, mp_s = self.schedule.mask_prob(t), self.schedule.mask_prob(s)
        return ((mp_t - mp_s) * (1 - x_m) / (mp_t * (1 - x_m) + x_m)).clamp(0, 1)
