"""Float64 categorical draws (the float32 Gumbel pitfall: Zheng et al. 2024, §4) and nucleus filtering."""
from __future__ import annotations

import math
from typing import Optional

import torch


def uniform(shape, generator: Optional[torch.Generator], device) -> torch.Tensor:
    """float64 U[0,1) drawn from ``generator`` (on its own device), returned on ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, dtype=torch.float64, device=gen_device).to(device)


def categorical(logits: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """One draw per row from softmax(logits) (unnormalised log-weights, −∞ allowed), by Gumbel-max in float64."""
    logits = logits.to(torch.float64)
    u = uniform(logits.shape, generator, logits.device)
    return (logits - torch.log(-torch.log(u))).argmax(dim=-1)


def nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of classes whose probability reaches ``top_p`` (the most likely always stays);
    the others get −∞. float64 (N, V) in and out."""
    if top_p >= 1:
        return logits
    p = torch.softmax(logits, dim=-1)
    sorted_p, order = torch.sort(p, dim=-1, descending=True)
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of the strictly more likely classes
    drop = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, order, before >= top_p)
    return logits.masked_fill(drop, -math.inf)
