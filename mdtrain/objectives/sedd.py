"""SEDD absorbing score entropy (MDLM's ``parameterization=sedd``).

The network's output is a log-score: log s_θ(y) = logits_y − log expm1(σ) − log(V−1) for y ≠ mask. At a masked
token, with r = 1/expm1(σ) (the true ratio q(x0)/q(mask)), the score entropy is
    pos − neg + const = Σ_{y≠m} s_θ(y) − r·log s_θ(x0) + r(log r − 1)
                      = r·[expm1(a) − a − log p_θ(x0)],   a = logsumexp_{y≠m}(logits) − log(V−1),
where p_θ = softmax over y ≠ mask; the right-hand form is what we compute (no large cancelling terms). Weighted
by σ′(t) (DWDSE), i.e. by −α′/(1−α) on the bracket. Unmasked tokens contribute 0. Time conditioning is required.
"""
from __future__ import annotations

import math

import torch

from mdtrain.objectives.base import MaskedObjective, valid_mask


class SEDD(MaskedObjective):
    name = "sedd"

    def nelbo(self, logits, x0, xt, t, attention_mask=None):
        valid = valid_mask(x0, attention_mask)
        sel = (xt == self.mask_id) & valid
        g, lse = self.logprob.gather_lse(logits, x0.unsqueeze(-1), self.mask_id)
        zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
        logp = torch.where(sel, g.squeeze(-1) - lse, zero)
        a = torch.where(sel, lse - math.log(self.vocab_size - 1), zero)
        bracket = torch.expm1(a) - a - logp
        w = -self.schedule.weight(t.to(torch.float64))  # σ′ · r = σ′/expm1(σ)
        return torch.where(sel, bracket * w.to(lse.dtype)[:, None], zero)

    def log_score(self, rows, sigma):
        out = rows.to(torch.float64) - torch.log(torch.expm1(sigma.to(torch.float64)))[:, None] \
            - math.log(self.vocab_size - 1)
        out[:, self.mask_id] = -math.inf
        return out
