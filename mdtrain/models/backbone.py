"""What every backbone shares: token embedding, time conditioning, the block loop, the adaLN output layer and
initialisation. Subclasses fill ``self.blocks`` and say what per-forward context their blocks need."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from mdtrain.models.init import Init, apply_plan, lecun_trunc_normal, ones, torch_linear, uniform, zeros
from mdtrain.models.layers import LayerNorm, TimestepEmbedder, Variant, modulate


@dataclass(frozen=True)
class ModelDims:
    """A flavor with the config's overrides applied: everything a backbone's constructor needs."""
    name: str
    variant: Variant
    n_layers: int
    d_model: int
    n_heads: int
    cond_dim: int
    dropout: float
    attention: str
    mamba_backend: str
    mamba_d_state: int
    image_shape: tuple = ()  # (H, W, C) of pixel-token data (the unet's layout); () otherwise
    num_classes: int = 0     # class-conditional (unet): classes whose embedding joins the time embedding
    llama: Any = field(default=None, compare=False)  # model.llama (the Llama backbone's section), else None

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def per_position(mod: torch.Tensor) -> torch.Tensor:
    """A modulation computed from the time embedding, broadcastable over positions: (B, k) -> (B, 1, k); a
    per-token one (B, L, k) stays as it is."""
    return mod[:, None] if mod.dim() == 2 else mod


class Backbone(nn.Module):
    """``forward(x (B, L) int, cond (B,) | (B, L) float | None, attention_mask (B, L) | None) -> fp32 logits
    (B, L, V)``.

    ``cond`` is the time conditioning (the objective decides whether it is sigma or t; None means zeros): one value
    per sequence (B,) or one per token (B, L) (block diffusion: each block at its own noise level). Blocks are
    called as ``block(h, c, ctx, mask)`` with ``c`` the activated time embedding ((B, C) or (B, L, C); None without
    time conditioning), ``ctx`` what ``block_context`` returns and ``mask`` the (B, L) bool padding mask or None.
    General attention masks, position ids and KV caches are the transformer's (``Transformer.forward``).
    """

    def __init__(self, dims: ModelDims, vocab_size: int, conditioned: bool):
        super().__init__()
        self.dims = dims
        self.vocab_size = vocab_size
        self.max_seq_len = 0  # the training length; set by build_model (sizes the causal model's KV cache)
        d, v = dims.d_model, dims.variant
        self.embed = nn.Embedding(vocab_size, d)
        self.time_embed = TimestepEmbedder(dims.cond_dim, v) if conditioned else None
        self.blocks = nn.ModuleList()
        self.final_norm = LayerNorm(d, v.norm_affine)
        self.final_adaLN = nn.Linear(dims.cond_dim, 2 * d) if conditioned else None
        self.head = nn.Linear(d, vocab_size, bias=v.bias)

    # -- initialisation -------------------------------------------------------------------------------------
    def init_plan(self) -> Dict[str, Init]:
        """How every parameter starts (name -> distribution; the values are keyed, ``mdtrain.models.init``).

        Linear layers: PyTorch's defaults, U(+-1/sqrt(fan_in)) for weight and bias (mdlm), or Flax-style truncated
        normal with zero biases (md4, MLP scale 2/n_layers). LayerNorm scales 1. adaLN modulations and the output
        head are zero (adaLN-Zero), so the initial logits are all 0: uniform. Subclasses add their own layers'."""
        v = self.dims.variant
        mlp_scale = 2.0 / self.dims.n_layers
        plan: Dict[str, Init] = {}
        for name, m in self.named_modules():
            pre = f"{name}." if name else ""
            if isinstance(m, nn.Linear):
                scale = mlp_scale if ".mlp." in f".{name}" else 1.0
                md4 = v.name == "md4"
                plan[pre + "weight"] = lecun_trunc_normal(m.in_features, scale) if md4 else torch_linear(m.in_features)
                if m.bias is not None:
                    plan[pre + "bias"] = zeros() if md4 else torch_linear(m.in_features)
            elif isinstance(m, LayerNorm) and m.weight is not None:
                plan[pre + "weight"] = ones()
            elif hasattr(m, "init_plan") and m is not self:  # e.g. a Mamba scan direction
                plan.update({pre + k: val for k, val in m.init_plan().items()})
        d = self.dims.d_model
        # MD4: N(0, 1/d); MDLM: kaiming_uniform(a=sqrt(5)) on a (V, d) parameter = U(+-1/sqrt(d))
        plan["embed.weight"] = Init("normal", 0.0, std=1 / math.sqrt(d)) if v.name == "md4" else uniform(1 / math.sqrt(d))
        zeroed = [blk.adaLN_modulation for blk in self.blocks if getattr(blk, "adaLN_modulation", None) is not None]
        zeroed += [m for m in (self.final_adaLN, self.head) if m is not None]
        names = {id(m): n for n, m in self.named_modules()}
        for m in zeroed:
            for pname, _ in m.named_parameters(recurse=False):
                plan[f"{names[id(m)]}.{pname}"] = zeros()
        return plan

    def init_weights(self, seed: Optional[int] = None) -> int:
        """(Re)initialise every parameter from ``init_plan`` with keyed values (``seed`` None: one drawn from
        torch's global generator). Parameters on the meta device are skipped. Returns the seed."""
        return apply_plan(self, self.init_plan(), seed)

    def set_train_step(self, step: int) -> None:
        """The optimizer step about to be taken, for backbones whose training forward depends on it (the Llama
        backbone's attention-mask annealing); the others ignore it."""

    # -- forward --------------------------------------------------------------------------------------------
    def block_context(self, length: int, device: torch.device, offset: int = 0):
        return None

    def condition(self, cond: torch.Tensor | None, batch: int, device: torch.device,
                  length: int | None = None) -> torch.Tensor | None:
        if self.time_embed is None:
            return None
        if cond is None:
            cond = torch.zeros(batch, device=device)
        if cond.dim() == 2 and length is not None and cond.shape == (batch, length) and length > 1:
            return self.dims.variant.act(self.time_embed(cond.reshape(-1))).view(batch, length, -1)
        cond = cond.reshape(-1).expand(batch) if cond.numel() == 1 else cond.reshape(batch)
        return self.dims.variant.act(self.time_embed(cond))

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        if self.dims.variant.channel_dropout and self.training and self.dims.dropout > 0:
            h = nn.functional.dropout(h, self.dims.dropout, True)  # MD4's embedding dropout
        return h

    def output(self, h: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        h = self.final_norm(h)
        if self.final_adaLN is not None:
            shift, scale = per_position(self.final_adaLN(c)).chunk(2, dim=-1)
            h = modulate(h, shift, scale)
        logits = self.head(h)
        # log-softmax downstream wants fp32, never bf16 logits; a float64 model (exactness tests) keeps float64
        return logits if logits.dtype == torch.float64 else logits.float()

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, length = x.shape
        h = self.embed_tokens(x)
        c = self.condition(cond, b, x.device, length)
        mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(f"model.name={self.dims.name} takes a (B, L) padding mask only, got shape "
                                 f"{tuple(attention_mask.shape)}; general attention masks need model.name=dit")
            mask = attention_mask.to(device=x.device, dtype=torch.bool)
            if bool(mask.all()):
                mask = None  # no padding: keep the fast unmasked kernels
        ctx = self.block_context(length, x.device)
        for blk in self.blocks:
            h = blk(h, c, ctx, mask)
        return self.output(h, c)


def set_train_step(model: nn.Module, step: int) -> None:
    """Tell every backbone inside ``model`` (through DDP / FSDP / DeepSpeed wrappers) the current training step."""
    for m in model.modules():
        if isinstance(m, Backbone):
            m.set_train_step(step)
