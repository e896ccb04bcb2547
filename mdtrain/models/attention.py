"""One attention function over flash-attn, flex attention and scaled_dot_product_attention, and the attention
patterns the backbones accept.

Layout is flash-attn's (B, L, H, hd). Who may attend to whom is said in one of three ways:

* nothing: every key (``causal=False``) or a causal mask (``causal=True``), bottom-right aligned when the query is
  shorter than the keys (query i sits at key position Lk - Lq + i), which is what KV-cache decoding needs;
* ``key_padding_mask`` (B, Lk), True at real tokens: padded keys are never attended to (outputs at padded query
  positions are unspecified: zeros with flash-attn, a finite value with SDPA);
* ``mask``, an :class:`AttentionMask` (built once per forward from a bool (B or 1, Lq, Lk) tensor, True = may
  attend, and shared by every layer): any pattern, e.g. block diffusion's block-diagonal + offset block-causal
  mask or the per-document mask of packed samples. It replaces ``causal``. A query that may attend to no key gets
  a zero output on every kernel.

Kernels (``model.attention``): ``auto`` takes flash-attn for unmasked / padded attention on CUDA bf16/fp16 and
flex attention (compiled) for general masks on CUDA, else SDPA; ``flash`` requires flash-attn (general masks still
go to flex or SDPA, which flash-attn cannot express); ``flex`` uses flex attention for every call (on CPU its eager
reference implementation, which materialises the scores, forward only: for checking, not speed); ``sdpa`` always
SDPA. Every kernel computes the same function; attention dropout (MD4) and CPU backward passes run on SDPA.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flash", "sdpa", "flex")

_UNSET = object()
_FLASH = _UNSET
_FLEX = _UNSET
_FLEX_COMPILED = None


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


def flex_attention_module():
    """``torch.nn.attention.flex_attention`` (torch >= 2.5), or None."""
    global _FLEX
    if _FLEX is _UNSET:
        try:
            from torch.nn.attention import flex_attention as mod
            mod.flex_attention, mod.create_block_mask  # noqa: B018
            _FLEX = mod
        except Exception:
            _FLEX = None
    return _FLEX


def _flex_kernel(on_cuda: bool):
    """flex_attention compiled once per process on CUDA (its fused kernel only exists compiled); eager elsewhere."""
    global _FLEX_COMPILED
    mod = flex_attention_module()
    if not on_cuda:
        return mod.flex_attention
    if _FLEX_COMPILED is None:
        _FLEX_COMPILED = torch.compile(mod.flex_attention)
    return _FLEX_COMPILED


def resolve_backend(backend: str) -> str:
    """Check ``model.attention`` on this machine: ``flash`` must import flash-attn, ``flex`` flex attention.
    Returns the name; ``auto`` picks a kernel per call from the inputs."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r} ({', '.join(BACKENDS)})")
    if backend == "flash" and flash_attn_module() is None:
        raise RuntimeError("model.attention=flash but flash-attn does not import on this machine; install the "
                           "[gpu] extra on a CUDA machine or use model.attention=auto (falls back to SDPA)")
    if backend == "flex" and flex_attention_module() is None:
        raise RuntimeError(f"model.attention=flex needs torch.nn.attention.flex_attention (torch >= 2.5; this is "
                           f"{torch.__version__}); use model.attention=auto")
    return backend


class AttentionMask:
    """A general attention pattern for one forward: ``allowed`` (B or 1, Lq, Lk) bool, True where query i may
    attend to key j. Derived forms (the SDPA mask, flex's block mask) are built on first use and reused by every
    layer of the forward."""

    def __init__(self, allowed: torch.Tensor):
        if allowed.dim() != 3 or allowed.dtype != torch.bool:
            raise ValueError(f"an attention mask is a bool (B or 1, Lq, Lk) tensor, got {allowed.dtype} of shape "
                             f"{tuple(allowed.shape)}")
        self.allowed = allowed
        self.empty_rows = ~allowed.any(-1)  # (B|1, Lq): queries with no key, zero output by convention
        self.has_empty = bool(self.empty_rows.any())  # one host sync per forward, like the padding path's
        self._sdpa = None
        self._flex = None

    @property
    def shape(self):
        return self.allowed.shape

    def prepare(self, backend: str, device: torch.device) -> "AttentionMask":
        """Build what this forward's kernels will read now, outside any compiled block (``train.compile``)."""
        flex = flex_attention_module() is not None and backend != "sdpa"
        if flex and (device.type == "cuda" or backend == "flex"):
            self.block_mask()
        if not (flex and device.type == "cuda"):
            self.sdpa_mask()
        return self

    def sdpa_mask(self) -> torch.Tensor:
        """(B|1, 1, Lq, Lk) for SDPA; empty rows see every key (finite softmax) and are zeroed afterwards."""
        if self._sdpa is None:
            a = self.allowed | self.empty_rows[..., None] if self.has_empty else self.allowed
            self._sdpa = a[:, None]
        return self._sdpa

    def block_mask(self):
        """flex attention's BlockMask of this pattern (it skips fully masked tiles and reads ``allowed`` in the
        partial ones)."""
        if self._flex is None:
            mod = flex_attention_module()
            allowed = self.allowed
            batch = allowed.shape[0]

            if batch == 1:
                def mask_mod(b, h, q, k):
                    return allowed[0, q, k]
            else:
                def mask_mod(b, h, q, k):
                    return allowed[b, q, k]
            self._flex = mod.create_block_mask(mask_mod, batch if batch > 1 else None, None, allowed.shape[1],
                                               allowed.shape[2], device=allowed.device)
        return self._flex


def padding_and_causal(key_padding_mask, lq: int, lk: int, causal: bool, device) -> torch.Tensor:
    """The (B or 1, Lq, Lk) bool pattern of a causal flag and/or a (B, Lk) key padding mask (causal bottom-right
    aligned). A padded query keeps its own key, so no row is empty (real queries' outputs are unchanged: a real
    query's own key is real)."""
    rows = torch.arange(lq, device=device)[:, None] + (lk - lq)
    cols = torch.arange(lk, device=device)[None, :]
    allowed = cols <= rows if causal else torch.ones(lq, lk, dtype=torch.bool, device=device)
    allowed = allowed[None]
    if key_padding_mask is not None:
        allowed = (allowed & key_padding_mask.to(device=device, dtype=torch.bool)[:, None, :]) | (cols == rows)
    return allowed


def _flash_eligible(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              key_padding_mask: torch.Tensor | None = None, mask: AttentionMask | torch.Tensor | None = None,
              dropout_p: float = 0.0, backend: str = "auto") -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v over (B, L, H, hd) tensors; returns (B, Lq, H, hd).

    ``mask`` (an AttentionMask, or a bool (B|1, Lq, Lk) tensor) replaces ``causal`` and ``key_padding_mask``.
    """
    if mask is not None and not isinstance(mask, AttentionMask):
        mask = AttentionMask(mask)
    # torch has no flex backward on CPU: gradients there go through SDPA (the same function)
    if backend == "flex" and dropout_p == 0.0 and (q.is_cuda or not (torch.is_grad_enabled() and q.requires_grad)):
        if mask is None:
            mask = AttentionMask(padding_and_causal(key_padding_mask, q.shape[1], k.shape[1], causal, q.device))
        return _flex(q, k, v, mask)
    if mask is not None:
        if backend != "sdpa" and dropout_p == 0.0 and q.is_cuda and flex_attention_module() is not None:
            return _flex(q, k, v, mask)
        return _sdpa_masked(q, k, v, mask, dropout_p)
    if backend in ("auto", "flash") and _flash_eligible(q) and flash_attn_module() is not None:
        return _flash(q, k, v, causal, key_padding_mask, dropout_p)
    return _sdpa(q, k, v, causal, key_padding_mask, dropout_p)


def _sdpa(q, k, v, causal, key_padding_mask, dropout_p):
    lq, lk = q.shape[1], k.shape[1]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, hd)
    mask = None
    if key_padding_mask is not None or (causal and lq != lk):
        mask = padding_and_causal(key_padding_mask, lq, lk, causal, q.device)[:, None]
        causal = False
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)
    return out.transpose(1, 2)


def _sdpa_masked(q, k, v, mask: AttentionMask, dropout_p):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.sdpa_mask(), dropout_p=dropout_p)
    out = out.transpose(1, 2)
    if mask.has_empty:
        out = out.masked_fill(mask.empty_rows[:, :, None, None], 0.0)
    return out


def _flex(q, k, v, mask: AttentionMask):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = _flex_kernel(q.is_cuda)(q, k, v, block_mask=mask.block_mask())
    out = out.transpose(1, 2)
    if mask.has_empty:  # flex already gives 0 there; keep the convention explicit for every kernel
        out = out.masked_fill(mask.empty_rows[:, :, None, None], 0.0)
    return out


def _flash(q, k, v, causal, key_padding_mask, dropout_p):
    from flash_attn import flash_attn_func, flash_attn_varlen_func
    if key_padding_mask is None:
        return flash_attn_func(q, k, v, dropout_p=dropout_p, causal=causal)
    b, lq, h, d = q.shape
    if k.shape[1] != lq:
        return _sdpa(q, k, v, causal, key_padding_mask, dropout_p)  # varlen packing needs Lq == Lk
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
