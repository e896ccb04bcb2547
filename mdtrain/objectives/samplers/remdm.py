"""ReMDM remasking (Wang et al. 2025, "Remasking Discrete Diffusion Models with Inference-Time Scaling",
arXiv 2503.00307, §3 Eq. 5 and §4.1 schedules).

The reverse step t → s with remasking strength σ_t ∈ [0, σ_max], σ_max = min(1, (1 − α_s)/α_t):
  - a decoded token is remasked with probability σ_t;
  - a masked token is revealed with probability (α_s − (1 − σ_t)·α_t)/(1 − α_t), i.e. the ddpm probability
    (α_s − α_t)/(1 − α_t) plus σ_t·α_t/(1 − α_t) (written that way so σ = 0 is ddpm to the last bit), with its
    token drawn from x_θ as in ddpm.
The marginals of the forward process are kept (the masked fraction at s is still 1 − α_s). Schedules:
  - ``cap``: σ_t = min(η, σ_max);  ``rescale``: σ_t = η·σ_max;
  - ``conf``: σ_t^ℓ = η·softmax_ℓ(−p_ℓ)·σ_max over the decoded positions, p_ℓ the probability the token had
    when it was drawn (the paper's code: η = 1); masked tokens are revealed with the ddpm probability;
  - ``loop``: α follows a piecewise-linear path: 0 → α_on on t ∈ [1, t_on] (ddpm), α held at α_on on
    (t_off, t_on] with σ = min(η, σ_max) (tokens keep being remasked and redrawn), α_on → 1 on [0, t_off]
    (ddpm). For a time-conditioned network the time fed is the one whose α equals that path's.
Given tokens (prompt, infill, the previous window's overlap) are never remasked.
"""
from __future__ import annotations

import torch

from mdtrain.objectives.samplers.categorical import nucleus, uniform
from mdtrain.objectives.samplers.common import Net, finish, time_for_mask_prob
from mdtrain.objectives.samplers.masked import _evaluate, step_masked

SCHEDULES = ("cap", "rescale", "conf", "loop")
# the paper's OWT settings (its scripts for T = 1024, nucleus 0.9)
DEFAULT_ETA = {"cap": 0.008, "rescale": 0.015, "conf": 1.0, "loop": 0.02}


def check_remdm(objective, schedule, eta, t_on, t_off, alpha_on) -> None:
    if objective.rows_for_unmask_prob or not hasattr(objective.schedule, "mask_prob"):
        raise ValueError(f"remdm needs one masking schedule for every position; objective '{objective.name}' "
                         "reveals tokens at token-dependent rates: use ddpm")
    if schedule not in SCHEDULES:
        raise ValueError(f"remdm_schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if eta < 0 or (schedule == "rescale" and eta > 1):
        raise ValueError(f"remdm_eta must be >= 0 (<= 1 for rescale), got {eta}")
    if schedule == "loop" and not (0 < t_off < t_on < 1 and 0 < alpha_on < 1):
        raise ValueError(f"remdm loop needs 0 < remdm_t_off < remdm_t_on < 1 and 0 < remdm_alpha_on < 1 (got "
                         f"t_on={t_on}, t_off={t_off}, alpha_on={alpha_on})")


class _Rule:
    """The masked-position half of one step, in the protocol ``step_masked`` uses."""

    needs_rows = False

    def __init__(self, objective, extra: float = 0.0, prob=None):
        self.obj, self.extra, self.prob = objective, extra, prob

    def unmask_prob(self, rows, t, s):
        if self.prob is not None:  # loop: its own α path
            return torch.full_like(t, self.prob)
        p = self.obj.unmask_prob(None, t, s)
        return p if self.extra == 0 else (p + self.extra).clamp(0, 1)

    def reveal_logits(self, rows, t, s):
        return self.obj.reveal_logits(rows, t, s)


class _LoopPath:
    """α(t) of ReMDM-loop and the phase of a step."""

    def __init__(self, t_on, t_off, alpha_on):
        self.t_on, self.t_off, self.a_on = t_on, t_off, alpha_on

    def alpha(self, t: float) -> float:
        if t > self.t_on:
            return self.a_on * (1 - t) / (1 - self.t_on)
        if t > self.t_off:
            return self.a_on
        return 1 - (1 - self.a_on) * t / self.t_off

    def looping(self, t: float) -> bool:
        return self.t_off < t <= self.t_on


def denoise_remdm(objective, net: Net, x: torch.Tensor, times, generator, *, schedule: str, eta: float,
                  t_on: float, t_off: float, alpha_on: float, top_p: float, noise_removal: str) -> torch.Tensor:
    """ReMDM over ``times`` on x (B, L) in place (mask_id = free), then final noise removal."""
    mask_id, sched, dev = objective.mask_id, objective.schedule, x.device
    free = x == mask_id
    path = _LoopPath(t_on, t_off, alpha_on) if schedule == "loop" else None
    conf = torch.full(x.shape, -torch.inf, dtype=torch.float64, device=dev) if schedule == "conf" else None
    logits = None
    for i in range(len(times) - 1):
        t, s = float(times[i]), float(times[i + 1])
        decoded = (x != mask_id) & free
        t_net, sigma, rule = t, 0.0, None
        if path is None:
            tt, ss = torch.tensor([t, s], dtype=torch.float64)
            a_t, a_s = float(sched.alpha(tt)), float(sched.alpha(ss))
            s_max = min(1.0, (1 - a_s) / a_t) if a_t > 0 else 1.0
            sigma = {"cap": min(eta, s_max), "rescale": eta * s_max, "conf": eta * s_max}[schedule]
            extra = sigma * a_t / float(sched.mask_prob(tt)) if schedule != "conf" else 0.0
            rule = _Rule(objective, extra=extra)
        else:
            a_t, a_s = path.alpha(t), path.alpha(s)
            if path.looping(t):
                sigma = min(eta, (1 - a_t) / a_t, 1.0)
                rule = _Rule(objective, prob=sigma * a_t / (1 - a_t))
            else:
                rule = _Rule(objective, prob=max(0.0, (a_s - a_t) / (1 - a_t)))
            if objective.time_conditioning:
                t_net = float(time_for_mask_prob(sched, torch.tensor(1 - a_t, dtype=torch.float64)))
        active = (x == mask_id).any(1)
        if not active.any() and (sigma == 0 or not decoded.any()):
            break
        if active.any():
            before = x.clone() if conf is not None else None
            logits = _evaluate(net, x, active, t_net, logits)
            step_masked(rule, logits, x, mask_id, t, s, generator, top_p)
            if conf is not None:
                _record_confidence(objective, logits, before, x, conf, t, s, top_p)
        if sigma > 0 and decoded.any():
            b_idx, l_idx = decoded.nonzero(as_tuple=True)
            if conf is not None:
                weight = torch.softmax(-conf.masked_fill(~decoded, torch.inf), dim=1)  # decoded only
                p = (sigma * weight)[b_idx, l_idx]
            else:
                p = torch.full((b_idx.numel(),), sigma, dtype=torch.float64, device=dev)
            back = uniform(b_idx.numel(), generator, dev) < p
            x[b_idx[back], l_idx[back]] = mask_id
            if conf is not None:
                conf[b_idx[back], l_idx[back]] = -torch.inf
    t_end = float(times[-1])
    if path is not None and objective.time_conditioning:
        t_end = float(time_for_mask_prob(sched, torch.tensor(1 - path.alpha(t_end), dtype=torch.float64)))
    return finish(objective, net, x, t_end, noise_removal, top_p, generator)


def _record_confidence(objective, logits, before, x, conf, t, s, top_p):
    """ReMDM-conf's ψ: the probability (after nucleus) that each token just revealed had when it was drawn."""
    b, l = ((before == objective.mask_id) & (x != objective.mask_id)).nonzero(as_tuple=True)
    if b.numel() == 0:
        return
    tt = torch.full((b.numel(),), t, dtype=torch.float64, device=x.device)
    w = nucleus(objective.reveal_logits(logits[b, l], tt, torch.full_like(tt, s)), top_p)
    conf[b, l] = torch.softmax(w, dim=-1).gather(1, x[b, l][:, None]).squeeze(1)
