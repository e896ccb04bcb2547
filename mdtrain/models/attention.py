"""One attention function: flash-attn when importable and the inputs suit it, else scaled_dot_product_attention.

Layout is flash-attn's (B, L, H, hd). ``causal`` is bottom-right aligned when the query is shorter than the keys
(query i sits at key position Lk - Lq + i), which is what KV-cache decoding needs and what flash-attn does.
``key_padding_mask`` (B, Lk) is True at real tokens; padded keys are never attended to. Outputs at padded query
positions are unspecified (zeros with flash-attn, a finite value with SDPA).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


_UNSET = object()
_FLASH = _UNSET


def flash_attn_module():
    """The flash_attn module, or None when it does not import (CPU machines, or built without CUDA). Memoised in a
    module global, which compiled code can read without a graph break."""
    global _FLASH
    if _FLASH is _UNSET:
        try:
            import flash_attn
            from flash_attn import flash_attn_func, flash_attn_varlen_func  # noqa: F401
            _FLASH = flash_attn
        except Exception:  # ImportError, or a CUDA extension that fails to load
            _FLASH = None
    return _FLASH


def resolve_backend(backend: str) -> str:
    """``auto`` / ``flash`` / ``sdpa`` -> ``flash`` or ``sdpa`` for this machine (``flash`` must import)."""
    if backend not in ("auto", "flash", "sdpa"):
        raise ValueError(f"unknown attention backend {backend!r} (auto, flash, sdpa)")
    if backend == "flash" and flash_attn_module() is None:
        raise RuntimeError("model.attention=flash but flash-attn does not import on this machine; install the "
                           "[gpu] extra on a CUDA machine or use model.attention=auto (falls back to SDPA)")
    return "flash" if backend != "sdpa" and flash_attn_module() is not None else "sdpa"


def _flash_eligible(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              key_padding_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
              backend: str = "auto") -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v over (B, L, H, hd) tensors; returns (B, Lq, H, hd).

    ``backend`` flash or auto uses flash-attn when it imports and q is a CUDA bf16/fp16 tensor, else SDPA.
    """
    if backend != "sdpa" and _flash_eligible(q) and flash_attn_module() is not None:
        return _flash(q, k, v, causal, key_padding_mask, dropout_p)
    return _sdpa(q, k, v, causal, key_padding_mask, dropout_p)


def _sdpa(q, k, v, causal, key_padding_mask, dropout_p):
    lq, lk = q.shape[1], k.shape[1]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, hd)
    mask = None
    if key_padding_mask is not None or (causal and lq != lk):
        rows = torch.arange(lq, device=q.device)[:, None] + (lk - lq)
        cols = torch.arange(lk, device=q.device)[None, :]
        allowed = cols <= rows if causal else torch.ones(lq, lk, dtype=torch.bool, device=q.device)
        if key_padding_mask is not None:
            # a query may always see its own position: keeps fully padded rows (left pads under a causal mask)
            # finite without changing any real token's output, since a real query's own key is real
            allowed = (allowed & key_padding_mask[:, None, None, :].bool()) | (cols == rows)
        mask = allowed if allowed.dim() == 4 else allowed[None, None]
        causal = False
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)
    return out.transpose(1, 2)


def _flash(q, k, v, causal, key_padding_mask, dropout_p):
    from flash_attn import flash_attn_func, flash_attn_varlen_func
    if key_padding_mask is None:
        return flash_attn_func(q, k, v, dropout_p=dropout_p, causal=causal)
    b, lq, h, d = q.shape
    if k.shape[1] != lq:
        raise ValueError("a key padding mask with a KV cache is not supported")
    mask = key_padding_mask.bool().reshape(-1)
    idx = mask.nonzero().squeeze(1)
    seqlens = key_padding_mask.bool().sum(-1, dtype=torch.int32)
    cu = F.pad(seqlens.cumsum(0, dtype=torch.int32), (1, 0))
    max_len = int(seqlens.max())
    pick = lambda t: t.reshape(b * lq, *t.shape[2:]).index_select(0, idx)  # noqa: E731
    out = flash_attn_varlen_func(pick(q), pick(k), pick(v), cu, cu, max_len, max_len, dropout_p=dropout_p,
                                 causal=causal)
    full = torch.zeros(b * lq, h, d, device=q.device, dtype=out.dtype)
    full.index_copy_(0, idx, out)
    return full.view(b, lq, h, d)
