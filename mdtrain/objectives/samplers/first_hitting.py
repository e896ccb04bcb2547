"""First-hitting sampler (Zheng et al. 2024, arXiv 2409.02908, §4 "first-hitting sampler", Alg. 1).

Under the absorbing forward process with a schedule shared by every position, the n masked tokens of a state at
time t unmask independently, each staying masked down to time s with probability m(s)/m(t), m = 1 − α. The first
of them unmasks at the s with (m(s)/m(t))^n = u, u ~ U(0, 1): m(s) = m(t)·u^{1/n}. Which one is uniform among
the masked positions, and its token is drawn from x_θ at that state. One network call per revealed token, no
step where nothing happens, and exact for an exact denoiser (no two tokens revealed from one evaluation).

``group`` > 1 reveals the next ``group`` first-hitting events (times drawn in turn, positions uniform without
replacement) from one evaluation: fewer calls, the same approximation as a ddpm step that reveals several
tokens. Events below ``t_min`` are not taken; masks left then get the usual final noise removal.
"""
from __future__ import annotations

import math

import torch

from mdtrain.objectives.samplers.categorical import categorical, nucleus, uniform
from mdtrain.objectives.samplers.common import Net, finish, row_chunks, time_for_mask_prob


def check_first_hitting(objective) -> None:
    if objective.rows_for_unmask_prob or not hasattr(objective.schedule, "mask_prob"):
        raise ValueError(f"first_hitting needs one masking schedule for every position; objective "
                         f"'{objective.name}' reveals tokens at token-dependent rates: use ddpm or ddpm_cache")


def denoise_first_hitting(objective, net: Net, x: torch.Tensor, generator, *, group: int, t_min: float,
                          top_p: float, noise_removal: str) -> torch.Tensor:
    """Fill x (B, L) in place (mask_id = free) by first-hitting events from t = 1 down to ``t_min``."""
    mask_id, sched, dev = objective.mask_id, objective.schedule, x.device
    B, L = x.shape
    one = torch.ones(B, dtype=torch.float64, device=dev)
    log_m = torch.log(sched.mask_prob(one))  # log m(t) of each sequence's current time
    log_m_min = math.log(max(float(sched.mask_prob(torch.tensor(t_min, dtype=torch.float64))), 1e-300))
    stopped = torch.zeros(B, dtype=torch.bool, device=dev)
    while True:
        masked = x == mask_id
        n = masked.sum(1)
        act = ((n > 0) & ~stopped).nonzero(as_tuple=True)[0]
        if act.numel() == 0:
            break
        na = n[act].to(torch.float64)
        k = torch.clamp(na, max=group)
        # the j-th next event: log m_j = log m_{j−1} + log(u_j)/(n − j) (the first of n − j exponential clocks)
        j = torch.arange(group, dtype=torch.float64, device=dev)
        u = uniform((act.numel(), group), generator, dev)
        steps = torch.log(u) / (na[:, None] - j).clamp_min(1)
        log_mj = log_m[act, None] + torch.cumsum(steps, dim=1)
        take = (j[None] < k[:, None]) & (log_mj >= log_m_min)  # a prefix of each row
        r = take.sum(1)
        stopped[act[(r < k)]] = True  # its next event falls below t_min
        go = r > 0
        if not go.any():
            continue
        ev, r, log_mj = act[go], r[go], log_mj[go]
        # the network sees the state at the first event's time (only a time-conditioned one needs that time)
        m_first = torch.exp(log_mj[:, 0])
        t = time_for_mask_prob(sched, m_first) if objective.time_conditioning else torch.ones_like(m_first)
        logits = net(x[ev], t, ev)
        # r distinct positions, uniform among the masked ones
        keys = uniform((ev.numel(), L), generator, dev).masked_fill(~masked[ev], -1.0)
        order = keys.argsort(dim=1, descending=True)[:, :int(r.max())]
        pick = torch.arange(order.shape[1], device=dev)[None] < r[:, None]
        rows, cols = pick.nonzero(as_tuple=True)
        pos = order[rows, cols]
        for c in row_chunks(rows.numel(), logits.shape[-1]):
            tc = t[rows[c]]
            w = nucleus(objective.reveal_logits(logits[rows[c], pos[c]], tc, tc), top_p)
            x[ev[rows[c]], pos[c]] = categorical(w, generator)
        log_m[ev] = log_mj.gather(1, (r - 1)[:, None]).squeeze(1)
    return finish(objective, net, x, t_min, noise_removal, top_p, generator)
