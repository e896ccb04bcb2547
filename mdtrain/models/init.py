"""Keyed initialisation: a parameter's initial values are a pure function of (seed, parameter name, element index).

Each backbone describes how every parameter starts (``init_plan()``: name -> ``Init``, the same distributions as
PyTorch's / Flax's initialisers that MDLM and MD4 use). The values come from a counter-based generator: element
``i`` of parameter ``name`` is drawn from a 32-bit integer hash of (``param_key(seed, name)``, ``i``), turned into
a uniform in (0, 1) and then into the distribution by its inverse CDF. So any piece of any parameter (one
tensor-parallel rank's rows, an FSDP row block, a ZeRO-3 flat partition) is computed on its own, in time and
memory proportional to the piece, and the assembled weights are identical whatever the engine, world size or
tensor-parallel size (``mdtrain/parallel/meta_init.py`` does the cutting). Nothing here imports torch.distributed.

Floating-point transforms run in float64 over blocks whose length is a multiple of 64 and below torch's
intra-op grain, so every element takes the same (vectorised) kernel path however a tensor is cut; values are
rounded to the parameter's dtype at the end.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch

M32 = 0xFFFFFFFF
BLOCK = 16384          # elements per float64 transform (a multiple of 64, below at::internal::GRAIN_SIZE)
HASH_CHUNK = 1 << 16   # elements per integer-hash pass (its int64 temporaries stay in cache)


@dataclass(frozen=True)
class Init:
    """One parameter's initial distribution.

    ``kind``: ``uniform`` on [a, b); ``normal`` (mean a, std); ``trunc_normal`` (mean 0, std, truncated to
    [a, b], as ``nn.init.trunc_normal_``); ``const`` (every element a); ``log_of_uniform`` = log U(a, b) (Mamba's
    A_log); ``mamba_dt`` = softplus^-1 of dt, dt log-uniform in [a, b] clamped below at 1e-4 (Mamba's dt_bias).
    """
    kind: str
    a: float = 0.0
    b: float = 0.0
    std: float = 0.0

    def __post_init__(self):
        if self.kind not in ("uniform", "normal", "trunc_normal", "const", "log_of_uniform", "mamba_dt"):
            raise ValueError(f"unknown init kind {self.kind!r}")

    @property
    def random(self) -> bool:
        return self.kind != "const"


@dataclass(frozen=True)
class DeferredInit:
    """What a model built on the meta device needs to be initialised later, piece by piece: the seed and its
    ``init_plan`` (single-device parameter names)."""
    seed: int
    plan: Dict[str, Init]


def zeros() -> Init:
    return Init("const", 0.0)


def ones() -> Init:
    return Init("const", 1.0)


def uniform(bound: float) -> Init:
    return Init("uniform", -bound, bound)


def torch_linear(fan_in: int) -> Init:
    """PyTorch's default for Linear / Conv weights and biases: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in))."""
    return uniform(1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0)


def lecun_trunc_normal(fan_in: int, scale: float = 1.0) -> Init:
    """Flax's variance_scaling(scale, fan_in, truncated_normal): std corrected for the truncation to +-2 std."""
    std = math.sqrt(scale / fan_in) / 0.87962566103423978
    return Init("trunc_normal", -2 * std, 2 * std, std)


def param_key(seed: int, name: str) -> int:
    """63-bit key of one parameter (stable across platforms and Python versions)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(int(seed).to_bytes(16, "little", signed=True))
    h.update(name.encode())
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


# ----------------------------------------------------------------------------------------------------------------
# the counter-based generator (int64 arithmetic that never overflows: every product stays below 2**63)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit xorshift-multiply integer hash (the shape of Wellons' "lowbias32"; both multipliers below 2**31,
    so x * c < 2**63 for x < 2**32 and the int64 products never overflow)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x1B873593) & M32
    return x ^ (x >> 16)


def keyed_uniform(key: int, index: torch.Tensor) -> torch.Tensor:
    """Uniform (0, 1) float64 values for int64 element indices ``index`` (>= 0) of the parameter keyed ``key``."""
    k0, k1 = key & M32, (key >> 32) & M32
    h = _mix32((index & M32) ^ k0)
    h = _mix32(h ^ (index >> 32) ^ k1)
    return (h.to(torch.float64) + 0.5) * (1.0 / 4294967296.0)


def _transform(init: Init, u: torch.Tensor) -> torch.Tensor:
    if init.kind == "uniform":
        return init.a + (init.b - init.a) * u
    if init.kind == "normal":
        return init.a + init.std * math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)
    if init.kind == "trunc_normal":  # inverse CDF on [Phi(a/std), Phi(b/std)], as nn.init.trunc_normal_
        lo = 0.5 * (1.0 + math.erf(init.a / init.std / math.sqrt(2.0)))
        hi = 0.5 * (1.0 + math.erf(init.b / init.std / math.sqrt(2.0)))
        x = torch.erfinv(2.0 * (lo + (hi - lo) * u) - 1.0) * (init.std * math.sqrt(2.0))
        return x.clamp(init.a, init.b)
    if init.kind == "log_of_uniform":
        return torch.log(init.a + (init.b - init.a) * u)
    if init.kind == "mamba_dt":
        dt = torch.exp(u * (math.log(init.b) - math.log(init.a)) + math.log(init.a)).clamp(min=1e-4)
        return dt + torch.log(-torch.expm1(-dt))
    raise ValueError(init.kind)


def keyed_values(init: Init, key: int, index: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The initial values of the elements ``index`` (1-D int64, flat indices into the full single-device tensor;
    a negative index is padding and gets 0) of a parameter with distribution ``init`` and key ``key``."""
    n = index.numel()
    out = torch.empty(n, dtype=dtype, device=index.device)
    if init.kind == "const":
        out.fill_(init.a)
    else:
        pad = index < 0
        has_pad = bool(pad.any())
        for s in range(0, n, HASH_CHUNK):
            idx = index[s:s + HASH_CHUNK]
            u = keyed_uniform(key, idx.clamp(min=0) if has_pad else idx)
            if init.kind == "uniform":  # exact arithmetic: no kernel-path question
                out[s:s + idx.numel()] = u.mul_(init.b - init.a).add_(init.a)
                continue
            m = u.numel()
            if m % 64:  # whole vector blocks: no element takes a scalar tail path
                u = torch.cat([u, u.new_full((64 - m % 64,), 0.5)])
            for b in range(0, m, BLOCK):
                v = _transform(init, u[b:b + BLOCK])
                out[s + b:s + min(m, b + BLOCK)] = v[:min(m, b + BLOCK) - b]
        if has_pad:
            out[pad] = 0
    return out


@torch.no_grad()
def init_full_(param: torch.Tensor, init: Init, key: int) -> None:
    """Fill a whole single-device tensor in place with its keyed initial values."""
    flat = param.view(-1)
    n = flat.numel()
    for s in range(0, n, HASH_CHUNK):
        idx = torch.arange(s, min(n, s + HASH_CHUNK), dtype=torch.int64, device=param.device)
        flat[s:s + idx.numel()] = keyed_values(init, key, idx, dtype=param.dtype)


@torch.no_grad()
def apply_plan(module: torch.nn.Module, plan: Dict[str, Init], seed: Optional[int] = None) -> int:
    """Initialise every parameter of a single-device ``module`` from ``plan`` (which must name them all).

    ``seed`` None draws one from torch's global generator (so ``torch.manual_seed`` still decides the weights).
    Parameters on the meta device are left alone (deferred init fills them later). Returns the seed used."""
    params = dict(module.named_parameters())
    if all(p.device.type == "meta" for p in params.values()):
        return -1 if seed is None else seed  # nothing to fill yet: leave torch's generator alone
    if seed is None:
        seed = int(torch.randint(0, 2 ** 62, (1,), device="cpu"))
    missing = sorted(set(params) - set(plan))
    if missing:
        raise KeyError(f"{type(module).__name__}.init_plan() does not cover {missing[:5]}")
    for name, p in params.items():
        if p.device.type != "meta":
            init_full_(p, plan[name], param_key(seed, name))
    return seed
