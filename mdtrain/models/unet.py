"""MD4's CIFAR-10 U-Net (the VDM U-Net without down-sampling) over pixel tokens, single-device.

google-deepmind/md4 ``networks/unet.py`` + ``models/backward.py`` (MD4 paper, Shi et al. 2024, appendix on image models):

* each sub-pixel token (0..255, mask 256) is embedded to F features; the C embeddings of a pixel are concatenated
  (B, H, W, C·F) and a 3x3 conv maps them to F channels;
* ``n_layers`` residual blocks, a middle of residual block + self-attention + residual block, then
  ``n_layers + 1`` residual blocks that each take the concatenation of the running features and one saved
  down-path output (the skip connections), all at full resolution (``ch_mult = (1,)``: no down-sampling);
* residual block: GroupNorm -> swish -> 3x3 conv -> + Linear(cond) (no bias, zero-init) -> GroupNorm -> swish ->
  dropout -> 3x3 conv (zero-init), plus the input (projected by a 1x1 conv where the widths differ);
* self-attention: GroupNorm -> multi-head attention with biases over the H·W positions -> + input;
* GroupNorm -> swish -> 3x3 conv (zero-init) to C·V logits, reshaped to (B, H·W·C, V);
* time conditioning: sinusoidal features of t·1000 (``cond_dim`` of them, [sin, cos]) -> Linear(4·cond_dim) ->
  swish -> Linear(cond_dim); with ``num_classes`` a class embedding is concatenated to the features before the
  MLP (MD4's ``CondEmbedding``). GroupNorm has 32 groups and eps 1e-6 (Flax's defaults).

At 32 blocks per side, 128 features and 1 head (flavor ``md4-cifar10``) this is MD4's 28.4M-parameter network.
The 68 blocks (down, middle, up) are ``model.blocks``, called as ``block(h, c)`` or ``block(h, c, skip)``, so
activation checkpointing, compile and FSDP apply per block. Initialisation follows Flax: LeCun-normal (truncated)
kernels, zero biases, embeddings N(0, 1/F). The output head has all V classes (the mask's too: the objectives
suppress it), so the initial logits are 0: uniform.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mdtrain.models.attention import attention, resolve_backend
from mdtrain.models.backbone import ModelDims
from mdtrain.models.init import Init, apply_plan, lecun_trunc_normal, ones, zeros

GROUPS = 32
GN_EPS = 1e-6
TIME_SCALE = 1000.0  # MD4 embeds t·1000


def _group_norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, ch, eps=GN_EPS)


class CondEmbedding(nn.Module):
    """[sin, cos] features of t·1000 (and a class embedding) -> Linear(4c) -> swish -> Linear(c)."""

    def __init__(self, cond_dim: int, num_classes: int):
        super().__init__()
        self.cond_dim = cond_dim
        self.class_embed = nn.Embedding(num_classes, cond_dim) if num_classes > 0 else None
        self.fc1 = nn.Linear(cond_dim * (2 if num_classes > 0 else 1), 4 * cond_dim)
        self.fc2 = nn.Linear(4 * cond_dim, cond_dim)

    def forward(self, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        half = self.cond_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
        args = (t.float() * TIME_SCALE)[:, None] * freqs[None]
        feats = torch.cat([torch.sin(args), torch.cos(args)], dim=-1).to(self.fc1.weight.dtype)
        if self.class_embed is not None:
            feats = torch.cat([feats, self.class_embed(labels)], dim=-1)
        return self.fc2(F.silu(self.fc1(feats)))


class ResBlock(nn.Module):
    """GN -> swish -> conv -> + cond -> GN -> swish -> dropout -> conv, plus the (projected) input."""

    def __init__(self, in_ch: int, out_ch: int, cond_dim: int, dropout: float):
        super().__init__()
        self.norm1 = _group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.cond_proj = nn.Linear(cond_dim, out_ch, bias=False)
        self.norm2 = _group_norm(out_ch)
        self.dropout = dropout
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, h: torch.Tensor, c: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = h if skip is None else torch.cat([h, skip], dim=1)  # up path: running features, then the saved ones
        y = self.conv1(F.silu(self.norm1(x)))
        y = y + self.cond_proj(c)[:, :, None, None]
        y = F.dropout(F.silu(self.norm2(y)), self.dropout, self.training)
        y = self.conv2(y)
        return (x if self.skip is None else self.skip(x)) + y


class AttentionBlock(nn.Module):
    """GN -> multi-head self-attention over the H·W positions (q, k, v, out with biases) -> + input."""

    def __init__(self, ch: int, n_heads: int, backend: str):
        super().__init__()
        self.norm = _group_norm(ch)
        self.n_heads = n_heads
        self.backend = resolve_backend(backend)
        self.qkv = nn.Linear(ch, 3 * ch)
        self.out = nn.Linear(ch, ch)

    def forward(self, h: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        b, ch, hh, ww = h.shape
        z = self.norm(h).flatten(2).transpose(1, 2)  # (B, H·W, ch)
        q, k, v = self.qkv(z).view(b, hh * ww, 3, self.n_heads, ch // self.n_heads).unbind(2)
        o = attention(q, k, v, backend=self.backend).reshape(b, hh * ww, ch)
        return h + self.out(o).transpose(1, 2).reshape(b, ch, hh, ww)


class UNet(nn.Module):
    """``forward(x (B, H·W·C) int, cond (B,) | None, attention_mask=None, labels (B,) | None) -> (B, L, V) fp32``.

    ``attention_mask`` is accepted for the backbone protocol and ignored: image samples have no padding, and the
    loader's padding rows carry no loss. ``labels`` are required when ``dims.num_classes > 0``.
    """

    def __init__(self, dims: ModelDims, vocab_size: int):
        super().__init__()
        if len(dims.image_shape) != 3:
            raise ValueError("the unet backbone needs model.image_shape = [H, W, C]")
        self.dims, self.vocab_size = dims, vocab_size
        self.max_seq_len = 0
        self.image_shape = tuple(int(s) for s in dims.image_shape)
        h, w, c = self.image_shape
        d, n, cd = dims.d_model, dims.n_layers, dims.cond_dim
        self.n_down = n
        self.embed = nn.Embedding(vocab_size, d)
        self.time_embed = CondEmbedding(cd, dims.num_classes)
        self.conv_in = nn.Conv2d(c * d, d, 3, padding=1)
        down = [ResBlock(d, d, cd, dims.dropout) for _ in range(n)]
        middle = [ResBlock(d, d, cd, dims.dropout), AttentionBlock(d, dims.n_heads, dims.attention),
                  ResBlock(d, d, cd, dims.dropout)]
        up = [ResBlock(2 * d, d, cd, dims.dropout) for _ in range(n + 1)]
        self.blocks = nn.ModuleList(down + middle + up)
        self.final_norm = _group_norm(d)
        self.head = nn.Conv2d(d, c * vocab_size, 3, padding=1)
        self.init_weights()

    def init_plan(self) -> Dict[str, Init]:
        """Flax's defaults (LeCun-normal kernels, zero biases, N(0, 1/F) embeddings, GroupNorm 1 / 0); zero-init
        where MD4 has it (each residual block's conditioning projection and second conv, the output conv)."""
        plan: Dict[str, Init] = {}
        for name, m in self.named_modules():
            pre = f"{name}." if name else ""
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                plan[pre + "weight"] = lecun_trunc_normal(m.weight[0].numel())
                if m.bias is not None:
                    plan[pre + "bias"] = zeros()
            elif isinstance(m, nn.Embedding):
                plan[pre + "weight"] = Init("normal", 0.0, std=1 / math.sqrt(m.embedding_dim))
            elif isinstance(m, nn.GroupNorm):
                plan[pre + "weight"], plan[pre + "bias"] = ones(), zeros()
        for i, blk in enumerate(self.blocks):
            if isinstance(blk, ResBlock):
                for pname in ("cond_proj.weight", "conv2.weight", "conv2.bias"):
                    plan[f"blocks.{i}.{pname}"] = zeros()
        plan["head.weight"], plan["head.bias"] = zeros(), zeros()
        return plan

    def init_weights(self, seed: Optional[int] = None) -> int:
        """(Re)initialise every parameter from ``init_plan`` with keyed values (see ``Backbone.init_weights``)."""
        return apply_plan(self, self.init_plan(), seed)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        b, length = x.shape
        h_, w_, c_ = self.image_shape
        if length != h_ * w_ * c_:
            raise ValueError(f"the unet models {h_}x{w_}x{c_} images = {h_ * w_ * c_} tokens, got sequences of "
                             f"{length}")
        if (labels is None) != (self.time_embed.class_embed is None):
            raise ValueError("this unet is class-conditional: pass labels" if labels is None else
                             "labels given to a unet built without model.num_classes")
        if cond is None:
            cond = torch.zeros(b, device=x.device)
        cond = cond.reshape(-1).expand(b) if cond.numel() == 1 else cond.reshape(b)
        c = self.time_embed(cond, labels)
        h = self.embed(x).view(b, h_, w_, c_ * self.dims.d_model).permute(0, 3, 1, 2)
        h = self.conv_in(h)
        saved = [h]
        for blk in self.blocks[:self.n_down]:
            h = blk(h, c)
            saved.append(h)
        for blk in self.blocks[self.n_down:self.n_down + 3]:
            h = blk(h, c)
        for blk in self.blocks[self.n_down + 3:]:
            h = blk(h, c, saved.pop())
        h = self.head(F.silu(self.final_norm(h)))  # (B, C·V, H, W), channel-major classes as MD4's reshape
        return h.permute(0, 2, 3, 1).reshape(b, length, self.vocab_size).float()
