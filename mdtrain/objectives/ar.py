"""Autoregressive baseline: shifted next-token cross-entropy on a causal backbone (an exact likelihood).

The model reads x[:, :-1] and predicts x[:, 1:]; the first token of each sequence (BOS) is context, never a
target; the mask logit is suppressed (MDLM's AR sets it to −1000). ``cond`` is zeros.
"""
from __future__ import annotations

import torch

from mdtrain.objectives.base import Objective, valid_mask


class AR(Objective):
    name = "ar"
    causal = True
    first_target = 1
    schedule = None

    def cond(self, t):
        return torch.zeros(t.shape, dtype=torch.float32, device=t.device)

    def token_nll(self, logits, x0, attention_mask=None):
        """−log p(x_{i+1} | x_{≤i}) for logits computed on x0[:, :-1]; (B, L−1), 0 where the target is invalid."""
        valid = valid_mask(x0, attention_mask)[:, 1:]
        logp = self.logprob.target_logprob(logits, x0[:, 1:], self.mask_id)
        return torch.where(valid, -logp, torch.zeros((), dtype=logp.dtype, device=logp.device)), valid

    def loss(self, model_fn, x0, attention_mask=None, generator=None, noise=None):
        inp = x0[:, :-1]
        logits = model_fn(inp, self.cond(torch.zeros(x0.shape[0], device=x0.device)))
        nll, valid = self.token_nll(logits, x0, attention_mask)
        return self._finish(nll, valid)
