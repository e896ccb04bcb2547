"""Float64 categorical draws and nucleus filtering.

Why float64 (Zheng et al. 2024, arXiv 2409.02908, on inaccurate categorical sampling): a Gumbel-max draw
argmax(l + g), g = −log(−log u), can only pick a class whose log-weight is within max(g) − min(g) of the winner's. float32 uniforms lie on a 2^-24 grid, so
g ≤ −log(2^-24) ≈ 16.6: classes whose weight is below ~e^-17 of the leader's are (almost) never drawn. In the
reference ddpm step the leader is the mask class (weight ≈ 1) and a token's weight is Δα·x_θ(v) ≈ 1e-3·x_θ(v), so
every token with x_θ(v) below ~1e-4 is cut: an implicit top-p that lowers the temperature and flatters gen-PPL.
float64 uniforms (2^-53 grid) push the limit to e^-36. Our samplers also never race tokens against the mask
class (reveal first, then draw the token), which removes the Δα factor.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def uniform(shape, generator: Optional[torch.Generator], device) -> torch.Tensor:
    """float64 U[0,1) drawn from ``generator`` (on its own device), returned on ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, dtype=torch.float64, device=gen_device).to(device)


def gumbel_argmax(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """argmax(logits − log(−log u)) over the last dim, in float64 whatever the inputs' dtypes: the Gumbel-max
    draw for the given uniforms (u in (0, 1); u = 0 gives noise −∞, a class that cannot win)."""
    return (logits.to(torch.float64) - torch.log(-torch.log(u.to(torch.float64)))).argmax(dim=-1)


def categorical(logits: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """One draw per row from softmax(logits) (unnormalised log-weights, −∞ allowed), by Gumbel-max in float64."""
    return gumbel_argmax(logits, uniform(logits.shape, generator, logits.device))


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
