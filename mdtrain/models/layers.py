"""Building blocks shared by every backbone: block-style variants (MDLM / MD4), fp32 LayerNorm, time embedding,
rotary embeddings, MLPs, adaLN modulation and residual-branch dropout."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class Variant:
    """Everything that differs between MDLM's DiT (kuleshov-group/mdlm models/dit.py) and MD4's transformer (google-deepmind/md4
    networks/transformer.py)."""
    name: str
    norm_affine: bool      # LayerNorm with a learnable scale (MDLM) or parameter-free (MD4); never a bias
    glu: bool              # MLP: GELU-tanh 4x (MDLM) or w2(sigmoid(w1 x) * w3 x) with hidden 8d/3 (MD4)
    bias: bool             # biases on the MLP and the output head (MDLM); q/k/v/o never have one
    cond_act: str          # activation applied to the time embedding before every modulation Linear
    time_scale: float      # the network embeds cond * time_scale (MD4 embeds t * 1000; MDLM embeds sigma)
    channel_dropout: bool  # MD4: channel-wise dropout on residual branches, plus attention and embedding dropout

    def mlp_hidden(self, d: int) -> int:
        return 32 * math.ceil(2 * 4 * d / 3 / 32) if self.glu else 4 * d

    def act(self, c: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(c) if self.cond_act == "sigmoid" else F.silu(c)


VARIANTS = {
    "mdlm": Variant("mdlm", norm_affine=True, glu=False, bias=True, cond_act="silu", time_scale=1.0,
                    channel_dropout=False),
    "md4": Variant("md4", norm_affine=False, glu=True, bias=False, cond_act="sigmoid", time_scale=1000.0,
                   channel_dropout=True),
}


class LayerNorm(nn.Module):
    """Bias-free LayerNorm computed in fp32 with autocast off; optional scale.

    Returns the input's dtype: fp32 under autocast, where the residual stream stays fp32 (as in MDLM's DiT), and bf16
    when the parameters and activations are bf16 without autocast (FSDP's param_dtype=bf16).
    """

    def __init__(self, d: int, affine: bool = True, eps: float = 1e-5):
        super().__init__()
        self.d, self.eps = d, eps
        self.weight = nn.Parameter(torch.ones(d)) if affine else None

    def reset_parameters(self):
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            w = None if self.weight is None else self.weight.float()
            return F.layer_norm(x.float(), (self.d,), w, None, self.eps).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def branch_dropout(x: torch.Tensor, p: float, training: bool, channelwise: bool) -> torch.Tensor:
    """Dropout on a residual branch; MD4 drops whole channels per sequence (mask (B, 1, d), like Dropout1d)."""
    if not training or p == 0.0:
        return x
    if not channelwise:
        return F.dropout(x, p, True)
    keep = torch.empty(x.shape[0], 1, x.shape[-1], device=x.device, dtype=x.dtype).bernoulli_(1 - p)
    return x * keep / (1 - p)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the scalar time conditioning -> Linear -> SiLU -> Linear.

    mdlm (MDLM's TimestepEmbedder): 256 features [cos, sin], frequencies exp(-ln(1e4) k / 128), Linear(256, c), Linear(c, c).
    md4 (MD4's CondEmbedding): c features [sin, cos] of t*1000, frequencies exp(-ln(1e4) k / (c/2 - 1)), Linear(c, 4c),
    Linear(4c, c).
    """

    def __init__(self, cond_dim: int, variant: Variant):
        super().__init__()
        self.variant = variant
        if variant.name == "md4":
            self.n_freq, hidden = cond_dim, 4 * cond_dim
        else:
            self.n_freq, hidden = 256, cond_dim
        self.fc1 = nn.Linear(self.n_freq, hidden)
        self.fc2 = nn.Linear(hidden, cond_dim)

    def features(self, t: torch.Tensor) -> torch.Tensor:
        half = self.n_freq // 2
        denom = half - 1 if self.variant.name == "md4" else half
        k = torch.arange(half, device=t.device, dtype=torch.float32)
        freqs = torch.exp(-math.log(10000.0) * k / denom)
        args = (t.float() * self.variant.time_scale)[:, None] * freqs[None]
        if self.variant.name == "md4":
            return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(self.features(t).to(self.fc1.weight.dtype))))


class MLP(nn.Module):
    """GELU-tanh MLP (fc1 -> gelu -> fc2) or, for GLU variants, fc2(sigmoid(gate(x)) * fc1(x)).

    fc1 and gate are the column-parallel inputs, fc2 the row-parallel output under tensor parallelism.
    """

    def __init__(self, d: int, hidden: int, glu: bool, bias: bool):
        super().__init__()
        self.glu = glu
        self.fc1 = nn.Linear(d, hidden, bias=bias)
        self.gate = nn.Linear(d, hidden, bias=bias) if glu else None
        self.fc2 = nn.Linear(hidden, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.glu:
            return self.fc2(torch.sigmoid(self.gate(x)) * self.fc1(x))
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


_ROPE_CACHE: dict = {}


def rotary_tables(length: int, head_dim: int, device: torch.device, base: float = 10000.0):
    """cos/sin tables (length, head_dim) in fp32, rotate-half (GPT-NeoX) layout, cached per (length, dim, device)."""
    key = (length, head_dim, str(device), base)
    hit = _ROPE_CACHE.get(key)
    if hit is not None:
        return hit
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    ang = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv_freq[None]
    ang = torch.cat([ang, ang], dim=-1)
    out = (ang.cos(), ang.sin())
    if device.type != "meta":
        if len(_ROPE_CACHE) > 32:
            _ROPE_CACHE.clear()
        _ROPE_CACHE[key] = out
    return out


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, L, H, hd) by the tables (L, hd), in x's dtype (as MDLM's flash-attn rotary does)."""
    cos = cos[None, :, None, :].to(x.dtype)
    sin = sin[None, :, None, :].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin
