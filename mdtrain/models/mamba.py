"""Bidirectional Mamba (MDLM's DiMamba idea: a forward and a reversed scan added, adaLN-Zero time conditioning),
built on Mamba-2 mixers (scalar decay per head, the SSD "state space duality" algorithm).

The scan runs on mamba-ssm's Triton SSD kernel (``mamba_chunk_scan_combined``) when it imports and the tensors are
on CUDA; otherwise on ``ssd_scan_torch``, a chunked pure-PyTorch implementation of the same recurrence

    h_t = exp(dt_t * A) h_{t-1} + dt_t * x_t B_t^T,      y_t = h_t C_t        (per head; D x_t added outside)

Like Caduceus' BiMamba (Schiff et al. 2024; MDLM's models/dimamba.py) the two directions share ``in_proj`` and ``out_proj``; each has its own
conv1d, dt_bias, A_log, D and gated-RMSNorm weight. Padded positions (mask False) are made invisible to both
directions: their conv inputs are zero and their dt is zero, so the state passes through them unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mdtrain.models.backbone import Backbone, ModelDims, per_position
from mdtrain.models.init import Init, apply_plan, ones, torch_linear
from mdtrain.models.layers import LayerNorm, branch_dropout, modulate

EXPAND = 2          # d_inner = EXPAND * d_model (Mamba default)
D_CONV = 4          # depthwise causal conv width (Mamba default)
KERNEL_CHUNK = 256  # chunk size of the Triton kernel (Mamba-2 default)
TORCH_CHUNK = 64    # chunk size of the PyTorch path (smaller intra-chunk matrices suit CPUs)


_UNSET = object()
_KERNEL = _UNSET


def ssd_kernel():
    """mamba-ssm's Triton SSD scan, or None when it does not import (its CUDA extensions are not needed).
    Memoised in a module global, which compiled code can read without a graph break."""
    global _KERNEL
    if _KERNEL is _UNSET:
        try:
            from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
            _KERNEL = mamba_chunk_scan_combined
        except Exception:  # ImportError, or a package whose compiled parts fail to load
            _KERNEL = None
    return _KERNEL


def resolve_backend(backend: str) -> str:
    """``auto`` / ``triton`` / ``torch`` -> ``triton`` or ``torch`` for this machine (``triton`` must import)."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"unknown mamba backend {backend!r} (auto, triton, torch)")
    if backend == "triton" and ssd_kernel() is None:
        raise RuntimeError("model.mamba_backend=triton but mamba_ssm.ops.triton.ssd_combined does not import; "
                           "install the [gpu] extra on a CUDA machine or use model.mamba_backend=auto")
    return "triton" if backend != "torch" and ssd_kernel() is not None else "torch"


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T, T) with out[i, j] = a[j+1] + ... + a[i] for i >= j and -inf above the diagonal.

    Summed directly rather than as a difference of cumulative sums, which loses digits once those grow large.
    """
    t = a.shape[-1]
    strict = torch.ones(t, t, dtype=torch.bool, device=a.device).tril(-1)
    s = torch.cumsum(a[..., :, None].expand(*a.shape, t).masked_fill(~strict, 0.0), dim=-2)
    return s.masked_fill(~torch.ones_like(strict).tril(), -math.inf)


def ssd_scan_torch(x, dt, A, B, C, chunk: int = TORCH_CHUNK):
    """The selective scan above, chunked (intra-chunk quadratic form + inter-chunk state recurrence), computed
    in fp32 (fp64 for fp64 inputs).

    x (b, l, h, p), dt (b, l, h) >= 0, A (h,) < 0, B and C (b, l, g, n) with g dividing h. Returns y like x.
    """
    out_dtype = x.dtype
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.autocast(x.device.type, enabled=False):
        x, dt, A, B, C = (t.to(work) for t in (x, dt, A, B, C))
        b, length, h, p = x.shape
        g = B.shape[2]
        if g != h:
            B, C = B.repeat_interleave(h // g, dim=2), C.repeat_interleave(h // g, dim=2)
        chunk = min(chunk, length)
        pad = (-length) % chunk
        if pad:  # dt = 0 and x = 0 on the padding: no decay, no input
            x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
        nc = x.shape[1] // chunk
        x, dt, B, C = (t.reshape(b, nc, chunk, *t.shape[2:]) for t in (x, dt, B, C))
        a = (dt * A).permute(0, 3, 1, 2)                      # (b, h, c, q) log-decay per step
        a_cum = torch.cumsum(a, dim=-1)
        xdt = x * dt[..., None]                               # (b, c, q, h, p)
        # within each chunk: y_l = sum_{s <= l} (C_l . B_s) exp(a_{s+1} + ... + a_l) dt_s x_s
        decay = torch.exp(_segsum(a)).permute(0, 2, 1, 3, 4)  # (b, c, h, l, s)
        cb = torch.einsum("bclhn,bcshn->bchls", C, B)
        y = torch.einsum("bchls,bcshp->bclhp", cb * decay, xdt)
        # state at the end of each chunk from that chunk's inputs alone
        to_end = torch.exp(a_cum[..., -1:] - a_cum)           # (b, h, c, q)
        states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, to_end, xdt)
        # carry states across chunks: state entering chunk z = sum_{c < z} decay(c -> z) states_c
        states = torch.cat([torch.zeros_like(states[:, :1]), states], dim=1)
        chunk_decay = torch.exp(_segsum(F.pad(a_cum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
        states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)[:, :-1]
        y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, torch.exp(a_cum))
        y = y.reshape(b, nc * chunk, h, p)[:, :length]
    return y.to(out_dtype)


def ssd_scan(x, dt, A, B, C, backend: str = "auto"):
    """Dispatch: the Triton kernel when ``backend`` allows it, it imports and x is on CUDA, else ``ssd_scan_torch``."""
    kernel = ssd_kernel() if backend != "torch" and x.is_cuda else None
    if kernel is None:
        return ssd_scan_torch(x, dt, A, B, C)
    return kernel(x.contiguous(), dt.float().contiguous(), A.float(), B.to(x.dtype).contiguous(),
                  C.to(x.dtype).contiguous(), KERNEL_CHUNK)


class SSMDirection(nn.Module):
    """One scan direction's own parameters: depthwise causal conv, dt bias, decay A, skip D, gated-norm weight."""

    def __init__(self, d_inner: int, n_heads: int, d_state: int):
        super().__init__()
        self.d_inner, self.n_heads, self.d_state = d_inner, n_heads, d_state
        conv_dim = d_inner + 2 * d_state
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, D_CONV, groups=conv_dim, padding=D_CONV - 1)
        self.dt_bias = nn.Parameter(torch.empty(n_heads))
        self.A_log = nn.Parameter(torch.empty(n_heads))
        self.D = nn.Parameter(torch.empty(n_heads))
        self.norm_weight = nn.Parameter(torch.empty(d_inner))
        self.reset_parameters()

    def init_plan(self) -> dict:
        """Mamba-2's init: dt log-uniform in [1e-3, 0.1] (stored as softplus^-1), A uniform in [1, 16], D = 1, the
        gated norm's weight 1; the depthwise conv as PyTorch's default (U(+-1/sqrt(kernel)))."""
        conv = torch_linear(self.conv1d.kernel_size[0])  # fan_in of a depthwise conv: 1 channel x kernel
        return {"conv1d.weight": conv, "conv1d.bias": conv, "dt_bias": Init("mamba_dt", 1e-3, 0.1),
                "A_log": Init("log_of_uniform", 1.0, 16.0), "D": ones(), "norm_weight": ones()}

    def reset_parameters(self):
        apply_plan(self, self.init_plan())

    def forward(self, xbc: torch.Tensor, dt: torch.Tensor, mask: torch.Tensor | None, backend: str):
        """xbc (b, l, d_inner + 2n) and raw dt (b, l, h), in scan order. Returns y (b, l, d_inner) before gating."""
        b, length, _ = xbc.shape
        xbc = F.silu(self.conv1d(xbc.transpose(1, 2))[..., :length].transpose(1, 2))
        x, B, C = xbc.split([self.d_inner, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        if mask is not None:
            dt = dt * mask[..., None]
        A = -torch.exp(self.A_log.float())
        x = x.reshape(b, length, self.n_heads, -1)
        y = ssd_scan(x, dt, A, B[:, :, None], C[:, :, None], backend)
        y = y + x * self.D.to(x.dtype)[:, None]
        return y.reshape(b, length, self.d_inner)

    def gate_norm(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Mamba-2's gated RMSNorm (gate before norm): rmsnorm(y * silu(z)) * weight, in fp32."""
        with torch.autocast(y.device.type, enabled=False):
            y = y.float() * F.silu(z.float())
            return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5) * self.norm_weight.float()


class BiMamba(nn.Module):
    """Forward and reversed Mamba-2 scans of the same projections, added, then one shared ``out_proj``."""

    def __init__(self, d: int, head_dim: int, d_state: int, backend: str):
        super().__init__()
        d_inner = EXPAND * d
        if d_inner % head_dim:
            raise ValueError(f"dimamba: d_inner={d_inner} is not divisible by the SSM head dim {head_dim}")
        self.d_inner, self.d_state, self.n_heads = d_inner, d_state, d_inner // head_dim
        self.backend = resolve_backend(backend)
        self.in_proj = nn.Linear(d, 2 * d_inner + 2 * d_state + self.n_heads, bias=False)  # [z, xBC, dt]
        self.fwd = SSMDirection(d_inner, self.n_heads, d_state)
        self.rev = SSMDirection(d_inner, self.n_heads, d_state)
        self.out_proj = nn.Linear(d_inner, d, bias=False)

    def forward(self, u: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        z, xbc, dt = self.in_proj(u).split([self.d_inner, self.d_inner + 2 * self.d_state, self.n_heads], dim=-1)
        maskf = None
        if mask is not None:
            maskf = mask.to(xbc.dtype)
            xbc = xbc * maskf[..., None]
        flip = lambda t: None if t is None else t.flip(1)  # noqa: E731
        y_fwd = self.fwd(xbc, dt, maskf, self.backend)
        y_rev = self.rev(flip(xbc), flip(dt), flip(maskf), self.backend).flip(1)
        y = self.fwd.gate_norm(y_fwd, z) + self.rev.gate_norm(y_rev, z)  # fp32
        return self.out_proj(y.to(z.dtype))


class MambaBlock(nn.Module):
    """x + gate * dropout(BiMamba(modulate(norm(x), shift, scale))), with (shift, scale, gate) from adaLN-Zero."""

    def __init__(self, dims: ModelDims):
        super().__init__()
        d, v = dims.d_model, dims.variant
        self.variant, self.dropout = v, dims.dropout
        self.norm = LayerNorm(d, v.norm_affine)
        self.mixer = BiMamba(d, dims.head_dim, dims.mamba_d_state, dims.mamba_backend)
        self.adaLN_modulation = nn.Linear(dims.cond_dim, 3 * d)

    def forward(self, x, c, ctx=None, mask=None):
        shift, scale, gate = per_position(self.adaLN_modulation(c)).chunk(3, dim=-1)
        out = self.mixer(modulate(self.norm(x), shift, scale), mask)
        return x + gate * branch_dropout(out, self.dropout, self.training, self.variant.channel_dropout)


class DiMamba(Backbone):
    """Bidirectional Mamba backbone with adaLN-Zero time conditioning (no attention, no positional embedding)."""

    def __init__(self, dims: ModelDims, vocab_size: int):
        super().__init__(dims, vocab_size, conditioned=True)
        self.blocks = nn.ModuleList(MambaBlock(dims) for _ in range(dims.n_layers))
        self.init_weights()
