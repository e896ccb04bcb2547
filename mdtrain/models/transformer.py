"""DiT (bidirectional, adaLN-Zero time conditioning; MDLM's and MD4's) and the causal transformer for AR, from one
block class, with KV-cache incremental decoding for the causal one."""
from __future__ import annotations

import torch
import torch.nn as nn

from mdtrain.models.attention import attention, resolve_backend
from mdtrain.models.backbone import Backbone, ModelDims
from mdtrain.models.layers import MLP, LayerNorm, apply_rotary, branch_dropout, modulate, rotary_tables


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

    def forward(self, x: torch.Tensor, rope, mask: torch.Tensor | None = None, kv: "LayerKV | None" = None):
        b, length, _ = x.shape
        qkv = self.qkv(x)
        heads = qkv.shape[-1] // (3 * self.head_dim)
        q, k, v = qkv.view(b, length, heads, 3, self.head_dim).unbind(3)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv is not None:
            k, v = kv.append(k, v)
        o = attention(q, k, v, causal=self.causal, key_padding_mask=mask,
                      dropout_p=self.dropout if self.training else 0.0, backend=self.backend)
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
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
        x = x + gate_a * self._drop(self.attn(modulate(self.norm1(x), shift_a, scale_a), rope, mask, kv))
        return x + gate_m * self._drop(self.mlp(modulate(self.norm2(x), shift_m, scale_m)))


class LayerKV:
    """One layer's cached keys and values (B, T, H, hd); allocated for ``capacity`` tokens, doubled when full."""

    def __init__(self, capacity: int = 0):
        self.k = self.v = None
        self.length, self.capacity = 0, capacity

    def append(self, k: torch.Tensor, v: torch.Tensor):
        need = self.length + k.shape[1]
        if self.k is None or need > self.k.shape[1]:
            cap = max(need, self.capacity, 2 * (0 if self.k is None else self.k.shape[1]))
            nk = k.new_empty(k.shape[0], cap, *k.shape[2:])
            nv = v.new_empty(v.shape[0], cap, *v.shape[2:])
            if self.k is not None:
                nk[:, :self.length] = self.k[:, :self.length]
                nv[:, :self.length] = self.v[:, :self.length]
            self.k, self.v = nk, nv
        self.k[:, self.length:need] = k
        self.v[:, self.length:need] = v
        self.length = need
        return self.k[:, :need], self.v[:, :need]


class KVCache:
    """Keys and values of every layer for ``Transformer.decode_step``; ``pos`` tokens are cached so far."""

    def __init__(self, n_layers: int, capacity: int = 0):
        self.layers = [LayerKV(capacity) for _ in range(n_layers)]

    @property
    def pos(self) -> int:
        return self.layers[0].length


class Transformer(Backbone):
    """DiT (``causal=False``: bidirectional, adaLN-Zero conditioned) or the causal transformer for AR
    (``causal=True``: causal attention, plain pre-norm blocks, no time conditioning; ``cond`` is ignored)."""

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

    @torch.no_grad()
    def decode_step(self, tokens_new: torch.Tensor, cache: KVCache | None = None):
        """Logits for ``tokens_new`` (B, k) given everything decoded before (in ``cache``; None starts fresh).

        Returns ``(logits (B, k, V) fp32, cache)``; the logits equal the full forward's at those positions.
        """
        if not self.causal:
            raise RuntimeError("decode_step needs the causal model (model.name=causal)")
        cache = cache if cache is not None else KVCache(len(self.blocks), self.max_seq_len)
        h = self.embed_tokens(tokens_new)
        rope = self.block_context(tokens_new.shape[1], tokens_new.device, offset=cache.pos)
        for blk, kv in zip(self.blocks, cache.layers):
            h = blk(h, None, rope, None, kv=kv)
        return self.output(h, None), cache
