"""AdamW with no-decay parameter groups, and the LR schedules (constant-with-warmup, cosine, warmup-stable-decay).

LR schedules are pure functions of the step, so resuming needs no scheduler state beyond the step itself.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from mdtrain.configtools import ConfigError


def matches_components(name: str, pattern: str) -> bool:
    """Whether ``pattern`` is a run of whole dotted components of the parameter ``name``: 'embed' matches
    'embed.weight' and 'blocks.0.embed.bias', not 'time_embed.mlp.0.weight'; 'blocks.0' matches 'blocks.0.x'."""
    return f".{pattern}." in f".{name}."


def param_groups(model: nn.Module, weight_decay: float, no_decay: list[str]) -> list[dict]:
    """Two groups: decayed, and exempt ('1d' in ``no_decay``: every 1-D param; other entries: whole dotted name
    components, see :func:`matches_components`)."""
    decay, skip = [], []
    exempt_1d = "1d" in no_decay
    names = [s for s in no_decay if s and s != "1d"]
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = (exempt_1d and p.ndim < 2) or any(matches_components(name, s) for s in names)
        (skip if exempt else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if skip:
        groups.append({"params": skip, "weight_decay": 0.0})
    return groups


def make_adamw(model: nn.Module, ocfg) -> torch.optim.Optimizer:
    # foreach=False keeps the update order per tensor identical across engines (bit-exact comparisons).
    return torch.optim.AdamW(param_groups(model, ocfg.weight_decay, ocfg.no_decay), lr=ocfg.lr,
                             betas=tuple(ocfg.betas), eps=ocfg.eps, weight_decay=ocfg.weight_decay, foreach=False)


def lr_at(step: int, total_steps: int, ocfg) -> float:
    """Learning rate used for optimizer step ``step`` (0-based) of a run of ``total_steps`` steps."""
    peak, warm = ocfg.lr, ocfg.warmup_steps
    if warm > 0 and step < warm:
        return peak * step / warm  # as transformers.get_constant_schedule_with_warmup (MDLM): 0 at step 0
    floor = peak * ocfg.min_lr_ratio
    if ocfg.schedule == "constant_warmup":
        return peak
    if ocfg.schedule == "cosine":  # MD4: cosine from the end of warmup to min_lr at the last step
        span = max(1, total_steps - warm)
        frac = min(1.0, (step - warm) / span)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * frac))
    if ocfg.schedule == "wsd":  # warmup, stable, then linear decay over the last decay_fraction of the run
        decay_steps = max(1, int(round(total_steps * ocfg.decay_fraction)))
        start = total_steps - decay_steps
        if step < start:
            return peak
        frac = min(1.0, (step - start + 1) / decay_steps)
        return peak + (floor - peak) * frac
    raise ConfigError(f"optim.schedule: unknown LR schedule '{ocfg.schedule}'")
