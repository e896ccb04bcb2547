"""MDLM (SUBS parameterisation) and MD4 (mean parameterisation): the same Rao-Blackwellised masked NELBO.

Per masked valid token: continuous time  −log p_θ(x0 | z_t) · (−α′/(1−α))  (= σ′/expm1(σ), 1/t under loglinear);
discrete time  T·(α_s − α_t)/(1 − α_t) · (−log p_θ), s = t − 1/T.  Unmasked tokens contribute exactly 0
(carry-over), the mask logit is suppressed (zero masking probability / no mask output class).
MD4 adds its reconstruction constant (1 − α(0))·ln(V_real) per token (= ε ln V_real); MDLM's is 0.
"""
from __future__ import annotations

import math

import torch

from mdtrain.objectives.base import MaskedObjective, valid_mask
from mdtrain.objectives.schedules import importance_sampling_weight


class SubsObjective(MaskedObjective):
    """With ``shift`` (Dream / DiffuLLaMA's shifted parameterisation): the logits at position i predict token
    i + 1, position 0 is never masked and not counted, so a causal LM's head is reused as it was trained."""

    def __init__(self, settings, vocab_size, mask_id):
        super().__init__(settings, vocab_size, mask_id)
        self.shift = bool(settings["shift"])
        self.first_target = 1 if self.shift else 0

    def corrupt(self, x0, t, u_mask):
        xt = super().corrupt(x0, t, u_mask)
        if self.shift:
            xt[:, 0] = x0[:, 0]
        return xt

    def align_logits(self, logits):
        if not self.shift:
            return logits
        return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # row 0 is a placeholder: position 0 is given

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """Positive per-masked-token weight on −log p_θ, float64 (B,): −α′/(1−α), or in discrete time
        T·(α_s − α_t)/(1 − α_t) with s = t − 1/T (which tends to the former as T → ∞)."""
        if self.T == 0:
            return -self.schedule.weight(t)
        mp_t, mp_s = self.schedule.mask_prob(t), self.schedule.mask_prob((t - 1.0 / self.T).clamp_min(0))
        return self.T * (mp_t - mp_s) / mp_t

    def recon_per_token(self) -> float:
        return 0.0

    def nelbo(self, logits, x0, xt, t, attention_mask=None):
        valid = self.targets(valid_mask(x0, attention_mask))
        sel = (xt == self.mask_id) & valid
        logp = self.logprob.target_logprob(self.align_logits(logits), x0, self.mask_id)
        logp = torch.where(sel, logp, torch.zeros((), dtype=logp.dtype, device=logp.device))  # −∞ meets no weight
        per_token = -logp * self.weight(t.to(torch.float64)).to(logp.dtype)[:, None]
        recon = self.recon_per_token()
        return per_token + recon * valid if recon else per_token


class MDLM(SubsObjective):
    """kuleshov-group/mdlm ``parameterization=subs``; T = 0 continuous (default) or T > 0 (its ``_d3pm_loss``
    with zero masking, on the schedule's own α instead of the code's α = 1 − t)."""

    name = "mdlm"

    def __init__(self, settings, vocab_size, mask_id):
        super().__init__(settings, vocab_size, mask_id)
        self.importance_sampling = bool(settings["importance_sampling"])
        if self.importance_sampling:
            self.is_weight = -importance_sampling_weight(self.schedule)

    def continuous_time(self, u):
        t = super().continuous_time(u)
        # MDLM's _sample_t: the importance-sampling transform is applied to t = ε_s + (1−ε_s)u.
        return self.schedule.importance_sampling_t(t) if self.importance_sampling else t

    def weight(self, t):
        if self.importance_sampling and self.T == 0:
            # Weight in the importance-sampled variable u (log(1−α) linear in u): a constant, f_T − f_0 > 0.
            return torch.full_like(t, self.is_weight, dtype=torch.float64)
        return super().weight(t)


class MD4(SubsObjective):
    """google-deepmind/md4 ``MD4``: ε-shifted schedules, t = u ∈ [0, 1), network conditioned on t, plus the
    reconstruction constant L·(1−α(0))·ln V. Its logged bits/token are our nats/token / ln 2."""

    name = "md4"
    reports_bits = True

    def cond_value(self, t):
        return t

    def recon_per_token(self) -> float:
        t0 = torch.zeros((), dtype=torch.float64)
        return float(self.schedule.mask_prob(t0)) * math.log(self.vocab_size - 1)
