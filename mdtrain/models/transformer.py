"""DiT (bidirectional, adaLN-Zero time conditioning; MDLM's and MD4's) and the causal transformer for AR, from one
block class; general attention masks, explicit position ids and a KV cache for both.

The transformer's calling protocol (what ``model_fn`` forwards; every argument after ``cond`` is optional)::

    logits = model(x, cond, attention_mask, positions=None, kv_cache=None, store_kv=False, logits_for=None)

* ``cond``: (B,) per sequence or (B, L) per token (adaLN per token), None = zeros; the causal model ignores it.
* ``attention_mask``: (B, Lk) bool/int padding mask (True = real token), or a bool (B or 1, Lq, Lk) pattern
  (True = query i may attend to key j) that replaces the default one (bidirectional for the DiT, causal for the
  causal model). Lk counts the cached tokens first, then the new ones.
* ``positions``: (L,) or (B, L) int rotary positions; default ``kv_cache.pos + arange(L)`` (0.. without a cache).
* ``kv_cache``: a :class:`KVCache` (``model.new_kv_cache()``). The new tokens attend to every cached token and,
  among themselves, by the default pattern (bidirectional for the DiT: a block sees itself; causal for the causal
  model) unless ``attention_mask`` says otherwise; with ``store_kv`` their keys and values are appended.
* ``logits_for``: a slice of positions to compute logits for (the head runs on those only).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from mdtrain.models.attention import AttentionMask, attention, padding_and_causal, resolve_backend
from mdtrain.models.backbone import Backbone, ModelDims, per_position
from mdtrain.models.layers import MLP, LayerNorm, apply_rotary, branch_dropout, modulate, rotary_tables


def rotary_at(positions: torch.Tensor, head_dim: int, base: float = 10000.0):
    """cos/sin (*positions.shape, head_dim) at explicit positions; the same fp32 arithmetic as ``rotary_tables``,
    so ``positions = arange(L)`` gives its rows bit for bit."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    ang = positions.to(torch.float32)[..., None] * inv_freq
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if cos.dim() == 2:
        return apply_rotary(x, cos, sin)
    cos, sin = cos[:, :, None, :].to(x.dtype), sin[:, :, None, :].to(x.dtype)  # per-sequence positions (B, L, hd)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class SelfAttention(nn.Module):
    """qkv -> RoPE on q, k -> attention -> out. No biases.

    The qkv output is laid out per head as (H, 3, hd), so a column split of ``qkv`` keeps whole heads; the head
    count is read from the local qkv width, so a tensor-parallel (column-split qkv, row-split out) layer pair
    works unchanged.
    """

    def __init__(self, d: int, head_dim: int, causal: bool, dropout: float, backend: str):
        super().__init__()
        self.head_dim, self.causal, self.dropout = head_dim, causal, dropout
        self.backend = resolve_backend(backend)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, rope, mask=None, kv: "LayerKV | None" = None):
        """``mask``: None, a (B, L) padding mask or an AttentionMask; ``kv``: this layer's cache, or None."""
        b, length, _ = x.shape
        qkv = self.qkv(x)
        heads = qkv.shape[-1] // (3 * self.head_dim)
        q, k, v = qkv.view(b, length, heads, 3, self.head_dim).unbind(3)
        cos, sin = rope
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if kv is not None:
            k, v = kv.extend(k, v)
        general = isinstance(mask, AttentionMask)
        o = attention(q, k, v, causal=self.causal, key_padding_mask=None if general else mask,
                      mask=mask if general else None, dropout_p=self.dropout if self.training else 0.0,
                      backend=self.backend)
        return self.out(o.reshape(b, length, heads * self.head_dim))


class TransformerBlock(nn.Module):
    """Pre-norm attention + MLP block; with a conditioning width, adaLN-Zero (shift, scale, gate for each branch)."""

    def __init__(self, dims: ModelDims, causal: bool, conditioned: bool):
        super().__init__()
        d, v = dims.d_model, dims.variant
        self.variant, self.dropout = v, dims.dropout
        self.norm1 = LayerNorm(d, v.norm_affine)
        # MDLM has no attention-probability dropout; MD4 has (its networks/transformer.py)
        self.attn = SelfAttention(d, dims.head_dim, causal, dims.dropout if v.channel_dropout else 0.0,
                                  dims.attention)
        self.norm2 = LayerNorm(d, v.norm_affine)
        self.mlp = MLP(d, v.mlp_hidden(d), v.glu, v.bias)
        self.adaLN_modulation = nn.Linear(dims.cond_dim, 6 * d) if conditioned else None

    def _drop(self, x):
        return branch_dropout(x, self.dropout, self.training, self.variant.channel_dropout)

    def forward(self, x, c, rope, mask=None, kv=None):
        if self.adaLN_modulation is None:
            x = x + self._drop(self.attn(self.norm1(x), rope, mask, kv))
            return x + self._drop(self.mlp(self.norm2(x)))
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = per_position(self.adaLN_modulation(c)).chunk(6, dim=-1)
        x = x + gate_a * self._drop(self.attn(modulate(self.norm1(x), shift_a, scale_a), rope, mask, kv))
        return x + gate_m * self._drop(self.mlp(modulate(self.norm2(x), shift_m, scale_m)))


class LayerKV:
    """One layer's cached keys and values (B, T, H, hd), rows ``[start, end)`` of buffers allocated for
    ``capacity`` tokens and doubled (or compacted) when full."""

    def __init__(self, capacity: int = 0):
        self.k = self.v = None
        self.start = self.end = 0
        self.capacity = capacity
        self.store = False  # set per forward by KVCache.begin

    @property
    def length(self) -> int:
        return self.end - self.start

    def cached(self):
        if self.k is None:
            return None, None
        return self.k[:, self.start:self.end], self.v[:, self.start:self.end]

    def append(self, k: torch.Tensor, v: torch.Tensor):
        """Store ``k``/``v`` after the cached ones and return them all (incremental decoding)."""
        store, self.store = self.store, True
        try:
            return self.extend(k, v)
        finally:
            self.store = store

    def extend(self, k: torch.Tensor, v: torch.Tensor):
        """Keys/values the new tokens attend to: the cached ones, then ``k``/``v``; appended when ``store``."""
        if not self.store:
            ck, cv = self.cached()
            if ck is None or ck.shape[1] == 0:
                return k, v
            return torch.cat([ck, k.to(ck.dtype)], 1), torch.cat([cv, v.to(cv.dtype)], 1)
        n = k.shape[1]
        if self.k is None or self.end + n > self.k.shape[1]:
            keep = self.length
            cap = max(keep + n, self.capacity, 2 * (0 if self.k is None else self.k.shape[1]))
            nk = k.new_empty(k.shape[0], cap, *k.shape[2:])
            nv = v.new_empty(v.shape[0], cap, *v.shape[2:])
            if self.k is not None and keep:
                nk[:, :keep] = self.k[:, self.start:self.end]
                nv[:, :keep] = self.v[:, self.start:self.end]
            self.k, self.v, self.start, self.end = nk, nv, 0, keep
        self.k[:, self.end:self.end + n] = k
        self.v[:, self.end:self.end + n] = v
        self.end += n
        return self.k[:, self.start:self.end], self.v[:, self.start:self.end]


class KVCache:
    """Keys and values of every layer, after RoPE: what ``Transformer.forward(kv_cache=...)`` and ``decode_step``
    attend to.

    ``length`` tokens are cached; ``pos`` is the position a new token gets by default (tokens dropped from the
    front with :meth:`keep_last` still count, so positions stay absolute). Edit with :meth:`truncate` (keep the
    first n: roll back), :meth:`keep_last` (a sliding window) and :meth:`index_select` (keep some sequences)."""

    def __init__(self, n_layers: int, capacity: int = 0):
        self.layers = [LayerKV(capacity) for _ in range(n_layers)]
        self.offset = 0  # tokens dropped from the front

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0

    @property
    def pos(self) -> int:
        return self.offset + self.length

    @property
    def batch_size(self):
        k = self.layers[0].k if self.layers else None
        return None if k is None else k.shape[0]

    def begin(self, n_layers: int, store: bool) -> list[LayerKV]:
        if n_layers != len(self.layers):
            raise ValueError(f"this KV cache has {len(self.layers)} layers, the model {n_layers}")
        for layer in self.layers:
            layer.store = store
        return self.layers

    def truncate(self, n: int) -> "KVCache":
        """Keep the first ``n`` cached tokens (drop the newest)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"truncate({n}) on a cache of {self.length} tokens")
        for layer in self.layers:
            layer.end = layer.start + n
        return self

    def keep_last(self, n: int) -> "KVCache":
        """Keep the newest ``n`` cached tokens (drop the oldest; their positions are not reused)."""
        n = max(0, min(n, self.length))
        drop = self.length - n
        for layer in self.layers:
            layer.start += drop
        self.offset += drop
        return self

    def index_select(self, index: torch.Tensor) -> "KVCache":
        """A new cache holding the sequences ``index`` (a LongTensor of batch rows) of this one."""
        out = KVCache(len(self.layers), self.layers[0].capacity if self.layers else 0)
        out.offset = self.offset
        for src, dst in zip(self.layers, out.layers):
            ck, cv = src.cached()
            if ck is not None:
                dst.k, dst.v = ck.index_select(0, index), cv.index_select(0, index)
                dst.start, dst.end = 0, ck.shape[1]
        return out


class Transformer(Backbone):
    """DiT (``causal=False``: bidirectional, adaLN-Zero conditioned) or the causal transformer for AR
    (``causal=True``: causal attention, plain pre-norm blocks, no time conditioning; ``cond`` is ignored).
    ``forward`` takes the protocol in the module docstring."""

    def __init__(self, dims: ModelDims, vocab_size: int, causal: bool):
        super().__init__(dims, vocab_size, conditioned=not causal)
        if dims.d_model % dims.n_heads:
            raise ValueError(f"d_model={dims.d_model} is not divisible by n_heads={dims.n_heads}")
        if dims.head_dim % 2:
            raise ValueError(f"head dim {dims.head_dim} must be even for rotary embeddings")
        self.causal = causal
        self.blocks = nn.ModuleList(TransformerBlock(dims, causal, not causal) for _ in range(dims.n_layers))
        self.init_weights()

    def block_context(self, length, device, offset=0):
        cos, sin = rotary_tables(offset + length, self.dims.head_dim, device)
        return cos[offset:], sin[offset:]

    def new_kv_cache(self, capacity: int | None = None) -> KVCache:
        """An empty cache for this model (buffers sized for ``capacity`` tokens, default the training length)."""
        return KVCache(len(self.blocks), self.max_seq_len if capacity is None else capacity)

    def _mask(self, attention_mask, b: int, lq: int, lk: int, device):
        """None / the (B, L) padding tensor of the plain path / an AttentionMask for everything else."""
        if attention_mask is None:
            return None
        m = attention_mask.to(device=device)
        if m.dim() == 2:
            if m.shape != (b, lk):
                raise ValueError(f"a padding mask must have shape (batch, keys) = {(b, lk)}, got {tuple(m.shape)}")
            m = m.bool()
            if bool(m.all()):
                return None  # no padding: keep the fast unmasked kernels
            return m if lq == lk else AttentionMask(padding_and_causal(m, lq, lk, self.causal, device))
        if m.dim() != 3 or m.shape[0] not in (1, b) or tuple(m.shape[1:]) != (lq, lk):
            raise ValueError(f"an attention mask must be (batch or 1, queries, keys) = ({b}, {lq}, {lk}), got "
                             f"{tuple(m.shape)}")
        return AttentionMask(m.bool())

    def _rope(self, length: int, device, offset: int, positions):
        if positions is None:
            return self.block_context(length, device, offset)
        positions = torch.as_tensor(positions, device=device)
        if positions.shape[-1] != length or positions.dim() not in (1, 2):
            raise ValueError(f"positions must be (L,) or (B, L) with L={length}, got {tuple(positions.shape)}")
        return rotary_at(positions, self.dims.head_dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                *, positions: torch.Tensor | None = None, kv_cache: KVCache | None = None, store_kv: bool = False,
                logits_for: slice | None = None) -> torch.Tensor:
        b, length = x.shape
        if store_kv and kv_cache is None:
            raise ValueError("store_kv=True needs a kv_cache (model.new_kv_cache())")
        past = 0 if kv_cache is None else kv_cache.length
        h = self.embed_tokens(x)
        c = self.condition(cond, b, x.device, length)
        mask = self._mask(attention_mask, b, length, past + length, x.device)
        if isinstance(mask, AttentionMask) and self.blocks:
            mask.prepare(self.blocks[0].attn.backend, x.device)
        rope = self._rope(length, x.device, 0 if kv_cache is None else kv_cache.pos, positions)
        layers = [None] * len(self.blocks) if kv_cache is None else kv_cache.begin(len(self.blocks), store_kv)
        for blk, kv in zip(self.blocks, layers):
            h = blk(h, c, rope, mask, kv) if kv is not None else blk(h, c, rope, mask)
        if logits_for is not None:
            h = h[:, logits_for].contiguous()  # a view would reach FSDP2 as the output (its in-place hazard)
            if c is not None and c.dim() == 3:
                c = c[:, logits_for]
        return self.output(h, c)

    @torch.no_grad()
    def decode_step(self, tokens_new: torch.Tensor, cache: KVCache | None = None):
        """Logits for ``tokens_new`` (B, k) given everything decoded before (in ``cache``; None starts fresh).

        Returns ``(logits (B, k, V) fp32, cache)``; the logits equal the full forward's at those positions.
        """
        if not self.causal:
            raise RuntimeError("decode_step needs the causal model (model.name=causal)")
        cache = cache if cache is not None else self.new_kv_cache()
        return self.forward(tokens_new, None, kv_cache=cache, store_kv=True), cache
