"""Llama-family backbone (``model.name=llama``): the decoder of Llama, Qwen2 and GPT-2 with the attention made
causal (AR), bidirectional (LLaDA's architecture, for the masked objectives) or annealed from one to the other.

Pieces, each chosen by ``model.llama`` (``mdtrain import hf`` sets them from a Hugging Face ``config.json``):
RMSNorm or LayerNorm, SwiGLU or GELU MLP, grouped-query attention, rotary embeddings with the config's base and
scaling (linear, dynamic NTK, Llama 3, YaRN) or a learned position table, tied or untied embeddings, biases on
q/k/v, on the attention output and on the MLP. No time conditioning (``cond`` is ignored), like LLaDA.

Tensor-parallel names are the other backbones' (``embed``, ``blocks.i.attn.qkv`` / ``out``, ``blocks.i.mlp.fc1``
(up) / ``gate`` / ``fc2`` (down), ``head``). The fused qkv rows are grouped per key/value head,
(n_kv_heads, n_heads/n_kv_heads + 2, head_dim) = [the group's queries, its key, its value], so a column split keeps
whole groups, and the local head count is read from the local width. With tied embeddings the state dict holds
``embed.weight`` only (``head.weight`` is filled from it on load), so safetensors never sees a shared tensor.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mdtrain.models.attention import attention, flash_attn_module, resolve_backend
from mdtrain.models.backbone import Backbone, ModelDims
from mdtrain.models.init import Init, ones, zeros
from mdtrain.models.layers import apply_rotary
from mdtrain.models.transformer import KVCache


# ----------------------------------------------------------------------------------------------------------------
# rotary frequencies (the scaling rules of Hugging Face's rope utilities, as formulas)


def rope_frequencies(head_dim: int, theta: float, scaling: dict, seq_len: int, max_positions: int):
    """(inverse frequencies (head_dim/2,) float64, attention factor that multiplies cos and sin).

    ``linear``: positions divided by ``factor``. ``dynamic`` (NTK): past ``max_positions`` the base grows to
    theta·(factor·L/max − (factor−1))^(d/(d−2)). ``llama3``: wavelengths longer than original/low_freq_factor
    divided by ``factor``, shorter than original/high_freq_factor kept, a linear blend between. ``yarn``: per
    frequency blend of interpolation (÷factor) and extrapolation by a ramp between the dims where beta_fast and
    beta_slow rotations fit the original context, attention factor 0.1·ln(factor) + 1 unless given.
    """
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    dims = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    inv = 1.0 / theta ** dims
    factor = float(scaling.get("factor", 1.0)) if scaling else 1.0
    if kind == "default":
        return inv, 1.0
    if kind == "linear":
        return inv / factor, 1.0
    if kind == "dynamic":
        if max_positions and seq_len > max_positions:
            base = theta * (factor * seq_len / max_positions - (factor - 1)) ** (head_dim / (head_dim - 2))
            inv = 1.0 / base ** dims
        return inv, 1.0
    original = float(scaling.get("original_max_position_embeddings") or max_positions or seq_len)
    if kind == "llama3":
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > original / low, inv / factor, inv)
        smooth = (original / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= original / high) & (wavelen <= original / low)
        return torch.where(medium, blended, scaled), 1.0
    if kind == "yarn":
        beta_fast, beta_slow = float(scaling.get("beta_fast", 32.0)), float(scaling.get("beta_slow", 1.0))

        def correction_dim(rotations: float) -> float:
            return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, head_dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
        keep = 1 - ramp  # 1: extrapolate (high frequencies), 0: interpolate
        inv = inv / factor * (1 - keep) + inv * keep
        attn = scaling.get("attention_factor")
        if attn is None:
            mscale = lambda s, m=1.0: 0.1 * m * math.log(s) + 1.0 if s > 1 else 1.0  # noqa: E731
            ms, ms_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
            attn = mscale(factor, ms) / mscale(factor, ms_all) if ms and ms_all else mscale(factor)
        return inv, float(attn)
    raise ValueError(f"unsupported rope_type {kind!r}")


_TABLES: dict = {}


def rope_tables(length: int, head_dim: int, theta: float, scaling: dict, max_positions: int, device):
    """cos, sin (length, head_dim) fp32 in rotate-half layout, times the attention factor; cached."""
    key = (length, head_dim, theta, repr(sorted(scaling.items())), max_positions, str(device))
    hit = _TABLES.get(key)
    if hit is not None:
        return hit
    inv, factor = rope_frequencies(head_dim, theta, scaling, length, max_positions)
    ang = torch.arange(length, dtype=torch.float64)[:, None] * inv[None]
    ang = torch.cat([ang, ang], dim=-1)
    out = ((ang.cos() * factor).float().to(device), (ang.sin() * factor).float().to(device))
    if torch.device(device).type != "meta":
        if len(_TABLES) > 32:
            _TABLES.clear()
        _TABLES[key] = out
    return out


# ----------------------------------------------------------------------------------------------------------------
# layers


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (as Llama's), returned in the input's dtype."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def reset_parameters(self):
        nn.init.ones_(self.weight)

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
            return (h * self.weight.float()).to(x.dtype)


class BiasLayerNorm(nn.LayerNorm):
    """GPT-2's LayerNorm (scale and bias), computed in fp32, returned in the input's dtype."""

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                                self.eps).to(x.dtype)


def make_norm(kind: str, d: int, eps: float) -> nn.Module:
    return RMSNorm(d, eps) if kind == "rmsnorm" else BiasLayerNorm(d, eps=eps)


class LlamaMLP(nn.Module):
    """SwiGLU fc2(silu(gate x) * fc1 x), or fc2(gelu(fc1 x)). fc1 / gate column-, fc2 row-parallel under TP."""

    def __init__(self, d: int, hidden: int, kind: str, bias: bool):
        super().__init__()
        self.kind = kind
        self.fc1 = nn.Linear(d, hidden, bias=bias)
        self.gate = nn.Linear(d, hidden, bias=bias) if kind == "swiglu" else None
        self.fc2 = nn.Linear(hidden, d, bias=bias)

    def forward(self, x):
        if self.kind == "swiglu":
            return self.fc2(F.silu(self.gate(x)) * self.fc1(x))
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh" if self.kind == "gelu_tanh" else "none"))


class AttentionPlan(NamedTuple):
    """What every block's attention needs for one forward: rotary tables (or None) and the mask."""
    rope: Optional[tuple]
    causal: bool
    allowed: Optional[torch.Tensor]  # (L, L) bool, True where a query may see a key (annealing); None: no extra


class GroupedAttention(nn.Module):
    """Grouped-query attention over a fused qkv laid out (kv_heads, group + 2, head_dim)."""

    def __init__(self, d: int, n_heads: int, n_kv_heads: int, head_dim: int, qkv_bias: bool, out_bias: bool,
                 backend: str):
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
        self.group, self.head_dim = n_heads // n_kv_heads, head_dim
        self.backend = resolve_backend(backend)
        self.qkv = nn.Linear(d, n_kv_heads * (self.group + 2) * head_dim, bias=qkv_bias)
        self.out = nn.Linear(n_heads * head_dim, d, bias=out_bias)

    @property
    def q_width(self) -> int:
        """Query width of this (possibly tensor-parallel) layer: what the attention FLOPs scale with."""
        return self.qkv.out_features // (self.group + 2) * self.group

    def forward(self, x, plan: AttentionPlan, mask=None, kv=None):
        b, length, _ = x.shape
        g, hd = self.group, self.head_dim
        qkv = self.qkv(x)
        groups = qkv.shape[-1] // ((g + 2) * hd)
        qkv = qkv.view(b, length, groups, g + 2, hd)
        q = qkv[:, :, :, :g].reshape(b, length, groups * g, hd)
        k, v = qkv[:, :, :, g], qkv[:, :, :, g + 1]
        if plan.rope is not None:
            cos, sin = plan.rope
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv is not None:
            k, v = kv.append(k, v)
        o = self._attend(q, k, v, plan, mask)
        return self.out(o.reshape(b, length, groups * g * hd))

    def _attend(self, q, k, v, plan, mask):
        if (plan.allowed is None and self.backend == "flash" and q.is_cuda and q.dtype in (torch.float16,
                                                                                           torch.bfloat16)
                and flash_attn_module() is not None):
            return attention(q, k, v, causal=plan.causal, key_padding_mask=mask, backend="flash")  # native GQA
        lq, lk = q.shape[1], k.shape[1]
        if self.group > 1:
            k, v = k.repeat_interleave(self.group, dim=2), v.repeat_interleave(self.group, dim=2)
        allowed = plan.allowed[None, None] if plan.allowed is not None else None
        rows = torch.arange(lq, device=q.device)[:, None] + (lk - lq)
        cols = torch.arange(lk, device=q.device)[None, :]
        if allowed is None and plan.causal and (mask is not None or lq != lk):
            allowed = (cols <= rows)[None, None]
        if mask is not None:
            keep = mask[:, None, None, :].bool()
            allowed = keep if allowed is None else allowed & keep
            allowed = allowed | (cols == rows)  # a fully padded row attends to itself: finite, never read
        causal = plan.causal and allowed is None
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=allowed, is_causal=causal)
        return out.transpose(1, 2)


class LlamaBlock(nn.Module):
    """x + drop(attn(norm1 x)); x + drop(mlp(norm2 x)) (pre-norm, sequential residual)."""

    def __init__(self, dims: ModelDims, spec: "LlamaSpec"):
        super().__init__()
        d = dims.d_model
        self.dropout = dims.dropout
        self.norm1 = make_norm(spec.norm, d, spec.norm_eps)
        self.attn = GroupedAttention(d, dims.n_heads, spec.n_kv_heads, spec.head_dim, spec.qkv_bias, spec.out_bias,
                                     dims.attention)
        self.norm2 = make_norm(spec.norm, d, spec.norm_eps)
        self.mlp = LlamaMLP(d, spec.ffn_hidden, spec.mlp, spec.mlp_bias)

    def _drop(self, x):
        return F.dropout(x, self.dropout, True) if self.training and self.dropout > 0 else x

    def forward(self, x, c, plan, mask=None, kv=None):
        x = x + self._drop(self.attn(self.norm1(x), plan, mask, kv))
        return x + self._drop(self.mlp(self.norm2(x)))


# ----------------------------------------------------------------------------------------------------------------
# the model


class LlamaSpec(NamedTuple):
    """``model.llama`` resolved against the flavor's dims."""
    attention: str
    anneal_steps: int
    n_kv_heads: int
    head_dim: int
    ffn_hidden: int
    mlp: str
    norm: str
    norm_eps: float
    positions: str
    max_positions: int
    rope_theta: float
    rope_scaling: dict
    tie_embeddings: bool
    qkv_bias: bool
    out_bias: bool
    mlp_bias: bool
    init_std: float


def resolve_llama(dims: ModelDims) -> LlamaSpec:
    """``model.llama`` (carried by ``dims``) with its nulls filled: kv heads = heads, head dim = d / heads, the MLP
    width by Llama's rule."""
    d, cfg = dims.d_model, dims.llama
    if cfg is None:
        raise ValueError("resolve_llama needs the dims of a model.name=llama config")
    n_kv = dims.llama.n_kv_heads or dims.n_heads
    if dims.n_heads % n_kv:
        raise ValueError(f"model.n_heads={dims.n_heads} must be a multiple of model.llama.n_kv_heads={n_kv}")
    head_dim = dims.llama.head_dim or d // dims.n_heads
    if dims.llama.positions == "rope" and head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head dim, got {head_dim}")
    mlp = dims.llama.mlp
    hidden = dims.llama.ffn_hidden or (256 * math.ceil(8 * d / 3 / 256) if mlp == "swiglu" else 4 * d)
    return LlamaSpec(dims.llama.attention, dims.llama.anneal_steps, n_kv, head_dim, hidden, mlp, dims.llama.norm,
                     dims.llama.norm_eps, dims.llama.positions, dims.llama.max_positions, dims.llama.rope_theta,
                     dict(dims.llama.rope_scaling), dims.llama.tie_embeddings, dims.llama.qkv_bias,
                     dims.llama.out_bias, dims.llama.mlp_bias, dims.llama.init_std)


def build_llama(dims: ModelDims, vocab_size: int) -> "Llama":
    """The registry's constructor for ``model.name=llama``."""
    return Llama(dims, resolve_llama(dims), vocab_size)


class Llama(Backbone):
    """``forward(x, cond=None, attention_mask=None) -> fp32 logits``; ``cond`` is ignored (no time conditioning).

    ``attention=anneal``: in training, each forward draws which future keys every query may see, each pair with
    probability step/anneal_steps (the step comes from :meth:`set_train_step`), so the model starts exactly
    causal and is fully bidirectional after ``anneal_steps``; in eval mode it is always bidirectional. The draw
    uses the default generator, which the trainer seeds per step like dropout (and TP ranks share).
    """

    def __init__(self, dims: ModelDims, spec: LlamaSpec, vocab_size: int):
        super().__init__(dims, vocab_size, conditioned=False)
        if spec.positions == "learned" and spec.max_positions < 1:
            raise ValueError("model.llama.positions=learned needs model.llama.max_positions (the table's rows)")
        self.spec = spec
        self.causal = spec.attention == "causal"
        self.train_step = 0
        d = dims.d_model
        self.pos_embed = nn.Embedding(spec.max_positions, d) if spec.positions == "learned" else None
        self.blocks = nn.ModuleList(LlamaBlock(dims, spec) for _ in range(dims.n_layers))
        self.final_norm = make_norm(spec.norm, d, spec.norm_eps)
        self.head = nn.Linear(d, vocab_size, bias=False)
        if spec.tie_embeddings:
            self.head.weight = self.embed.weight
            self.register_state_dict_post_hook(_drop_tied_head)
            self.register_load_state_dict_pre_hook(_fill_tied_head)
        self.init_weights()

    def init_plan(self) -> dict:
        """HF's init for training from scratch: every weight N(0, init_std), biases 0, norms 1 (values keyed,
        ``mdtrain.models.init``). A tied head shares the embedding's entry."""
        std = self.spec.init_std
        plan = {}
        for name, m in self.named_modules():
            pre = f"{name}." if name else ""
            if isinstance(m, (nn.Linear, nn.Embedding)):
                plan[pre + "weight"] = Init("normal", 0.0, std=std)
                if getattr(m, "bias", None) is not None:
                    plan[pre + "bias"] = zeros()
            elif isinstance(m, RMSNorm):
                plan[pre + "weight"] = ones()
            elif isinstance(m, nn.LayerNorm):
                plan[pre + "weight"], plan[pre + "bias"] = ones(), zeros()
        names = {n for n, _ in self.named_parameters()}  # a tied head.weight is listed as embed.weight only
        return {k: v for k, v in plan.items() if k in names}

    def set_train_step(self, step: int) -> None:
        self.train_step = int(step)

    def anneal_ratio(self) -> Optional[float]:
        """Share of future keys visible now (attention=anneal in training), None when attention is not annealed."""
        if self.spec.attention != "anneal" or not self.training:
            return None
        return min(1.0, self.train_step / self.spec.anneal_steps)

    def plan(self, length: int, device, offset: int = 0) -> AttentionPlan:
        rope = None
        if self.spec.positions == "rope":
            s = self.spec
            cos, sin = rope_tables(offset + length, s.head_dim, s.rope_theta, s.rope_scaling, s.max_positions, device)
            rope = (cos[offset:], sin[offset:])
        ratio = self.anneal_ratio()
        if ratio is None or ratio >= 1.0:
            return AttentionPlan(rope, self.causal, None)
        if ratio <= 0.0:
            return AttentionPlan(rope, True, None)
        allowed = torch.rand(length, length, device=device) < ratio
        allowed |= torch.ones(length, length, dtype=torch.bool, device=device).tril()
        return AttentionPlan(rope, False, allowed)

    def embed_tokens(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        h = self.embed(x)
        if self.pos_embed is not None:
            if offset + x.shape[1] > self.pos_embed.num_embeddings:
                raise ValueError(f"sequence of {offset + x.shape[1]} tokens is longer than the learned position "
                                 f"table ({self.pos_embed.num_embeddings})")
            h = h + self.pos_embed(torch.arange(offset, offset + x.shape[1], device=x.device))
        if self.training and self.dims.dropout > 0:
            h = F.dropout(h, self.dims.dropout, True)
        return h

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = None
        if attention_mask is not None:
            mask = attention_mask.to(device=x.device, dtype=torch.bool)
            if bool(mask.all()):
                mask = None
        h = self.embed_tokens(x)
        plan = self.plan(x.shape[1], x.device)
        for blk in self.blocks:
            h = blk(h, None, plan, mask)
        return self.output(h, None)

    @torch.no_grad()
    def decode_step(self, tokens_new: torch.Tensor, cache: KVCache | None = None):
        """Causal models: logits for ``tokens_new`` (B, k) given the cached prefix; ``(logits, cache)``."""
        if not self.causal:
            raise RuntimeError("decode_step needs model.llama.attention=causal")
        cache = cache if cache is not None else KVCache(len(self.blocks), self.max_seq_len)
        h = self.embed_tokens(tokens_new, offset=cache.pos)
        plan = self.plan(tokens_new.shape[1], tokens_new.device, offset=cache.pos)
        for blk, kv in zip(self.blocks, cache.layers):
            h = blk(h, None, plan, None, kv=kv)
        return self.output(h, None), cache


def _drop_tied_head(module, state_dict, prefix, local_metadata):
    state_dict.pop(prefix + "head.weight", None)


def _fill_tied_head(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    if prefix + "embed.weight" in state_dict:
        state_dict.setdefault(prefix + "head.weight", state_dict[prefix + "embed.weight"])
