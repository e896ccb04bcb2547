"""Reverse processes of the masked family: ddpm / ddpm_cache / MD4 ancestral (exact posterior), analytic (SEDD
τ-leaping), final noise removal, semi-autoregressive windows.

One step t → s at a masked position is drawn in two stages, which is the same distribution as the reference's
single categorical over V+1 classes but touches the network's logits only for the positions that change:
  1. reveal with probability P (ddpm: (α_s−α_t)/(1−α_t) under q(z_s | z_t, x0 = x_θ); analytic: expm1(Δσ)·Σ_y s_θ(y));
  2. a revealed position takes y ~ x_θ (ddpm) or ∝ s_θ(y) (analytic), after nucleus filtering, in float64.
Unmasked tokens never change (carry-over), so given prefix / infill tokens stay. ``ddpm_cache`` keeps each
sequence's last network output and re-runs the network only on the sequences whose tokens changed since — exact
when the network does not see t (objective.time_conditioning false); otherwise it evaluates every step like ddpm.
"""
from __future__ import annotations

import math

import torch

from mdtrain.objectives.samplers.categorical import categorical, nucleus, uniform
from mdtrain.objectives.samplers.common import Net, Stats, fill_masks, row_chunks

__all__ = ["Stats", "time_grid", "step_masked", "denoise_window", "sample_windows"]


def time_grid(steps: int, t_min: float, grid: str) -> torch.Tensor:
    """steps + 1 float64 times from 1 down to t_min (uniform), or mapped by MD4's u ↦ cos(π/2·(1−u)) (cosine)."""
    u = torch.linspace(1.0, t_min, steps + 1, dtype=torch.float64)
    return torch.cos(math.pi / 2 * (1 - u)) if grid == "cosine" else u


class _DDPM:
    """The exact absorbing posterior of the objective's parameterisation."""

    def __init__(self, objective):
        self.obj = objective
        self.needs_rows = objective.rows_for_unmask_prob

    def unmask_prob(self, rows, t, s):
        return self.obj.unmask_prob(rows, t, s)

    def reveal_logits(self, rows, t, s):
        return self.obj.reveal_logits(rows, t, s)


class _Analytic:
    """SEDD's Tweedie τ-leaping for absorbing diffusion (MDLM ``_analytic_update``), restricted to masked positions:
    reveal y with weight expm1(σ_t − σ_s)·s_θ(y), stay masked with the rest."""

    needs_rows = True

    def __init__(self, objective):
        self.obj = objective
        self.sigma = objective.schedule.sigma

    def unmask_prob(self, rows, t, s):
        sig_t = self.sigma(t)
        total = torch.exp(torch.logsumexp(self.obj.log_score(rows, sig_t), dim=-1))
        return (torch.expm1(sig_t - self.sigma(s)) * total).clamp(0, 1)

    def reveal_logits(self, rows, t, s):
        return self.obj.log_score(rows, self.sigma(t))


def _evaluate(net: Net, x, need, t: float, logits):
    """Run the network on the sequences in ``need`` at time t; store their logits in the per-sequence buffer."""
    idx = need.nonzero(as_tuple=True)[0]
    full = idx.numel() == x.shape[0]
    out = net(x, t) if full else net(x[idx], t, idx)
    if full:
        return out
    if logits is None:
        logits = torch.empty(*x.shape, out.shape[-1], dtype=out.dtype, device=out.device)
    logits[idx] = out
    return logits


def step_masked(rule, logits, x, mask_id, t, s, generator, top_p) -> torch.Tensor:
    """One reverse step t → s in place on x's masked positions; returns the bool (B,) of sequences that changed.
    ``rule`` gives unmask_prob (rows, t, s) and reveal_logits (rows, t, s), with ``needs_rows``."""
    b_idx, l_idx = (x == mask_id).nonzero(as_tuple=True)
    n = b_idx.numel()
    tt = torch.full((n,), t, dtype=torch.float64, device=x.device)
    ss = torch.full((n,), s, dtype=torch.float64, device=x.device)
    if rule.needs_rows:
        p = torch.empty(n, dtype=torch.float64, device=x.device)
        for c in row_chunks(n, logits.shape[-1]):
            p[c] = rule.unmask_prob(logits[b_idx[c], l_idx[c]], tt[c], ss[c])
    else:
        p = rule.unmask_prob(None, tt, ss)
    go = uniform(n, generator, x.device) < p
    changed = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    if go.any():
        gb, gl, tg, sg = b_idx[go], l_idx[go], tt[go], ss[go]
        for c in row_chunks(gb.numel(), logits.shape[-1]):
            w = nucleus(rule.reveal_logits(logits[gb[c], gl[c]], tg[c], sg[c]), top_p)
            x[gb[c], gl[c]] = categorical(w, generator)
        changed[gb] = True
    return changed


def step_rule(objective, rule: str):
    return _Analytic(objective) if rule == "analytic" else _DDPM(objective)


def denoise_window(objective, net: Net, x, times, generator, *, rule: str, cached: bool, top_p: float,
                   noise_removal: str) -> torch.Tensor:
    """Run the reverse process over ``times`` on x (B, L) in place (mask_id = free), then fill leftovers."""
    mask_id = objective.mask_id
    srule = step_rule(objective, rule)
    reuse = cached and not objective.time_conditioning
    logits = None
    fresh = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)  # logits[b] computed on the current x[b]
    for i in range(len(times) - 1):
        t, s = float(times[i]), float(times[i + 1])
        active = (x == mask_id).any(1)
        if not active.any():
            break
        need = active & ~fresh if reuse else active
        if need.any():
            logits = _evaluate(net, x, need, t, logits)
            fresh |= need
        changed = step_masked(srule, logits, x, mask_id, t, s, generator, top_p)
        fresh = fresh & ~changed if reuse else torch.zeros_like(fresh)

    left = x == mask_id
    if noise_removal == "none" or not left.any():
        return x
    seqs = left.any(1)
    need = seqs & ~fresh if reuse else seqs
    if need.any():
        logits = _evaluate(net, x, need, float(times[-1]), logits)
    return fill_masks(objective, logits, x, left, noise_removal, top_p, generator)


def sample_windows(net: Net, template: torch.Tensor, seq_len: int, stride_length: int, num_strides: int,
                   denoise) -> torch.Tensor:
    """``template`` (B, seq_len + num_strides·stride_length): given tokens, mask_id where free. Windows of the
    model length ``seq_len``; window k covers [k·S, k·S + seq_len) and starts from the previous window's last
    seq_len − S tokens (MDLM's semi-AR ``sample_subs_guidance``, with any sampler and infill). ``denoise(x)``
    fills one window in place; ``net.given`` is set to the window's fixed positions first (guidance)."""
    mask_id = net.obj.mask_id
    x_all = template.clone()
    prev = None
    for k in range(num_strides + 1):
        a = k * stride_length
        x = x_all[:, a:a + seq_len].clone()
        if prev is not None:
            x[:, :seq_len - stride_length] = prev[:, stride_length:]
        net.given = x != mask_id
        x = denoise(x)
        x_all[:, a:a + seq_len] = x
        prev = x
    return x_all
