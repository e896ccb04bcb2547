"""Networks of models exported by ``mdtrain export --format hf``, for ``transformers`` with
``trust_remote_code=True``:

    AutoModelForMaskedLM.from_pretrained(DIR, trust_remote_code=True)(input_ids, timesteps=None).logits

Self-contained (torch and transformers only) and written to compute exactly what mdtrain computes:

* ``backbone=dit``: MDLM's / MD4's diffusion transformer: token embedding, sinusoidal time embedding -> MLP,
  blocks of adaLN-Zero-modulated bias-free fp32 LayerNorm -> attention with rotary embeddings (rotate-half,
  base 10000, q/k/v rows laid out per head) and an MLP (mdlm: GELU-tanh 4x with biases; md4: sigmoid-gated,
  no biases), a modulated final norm and the output head.
* ``backbone=causal``: the same blocks with causal attention and no conditioning (the AR baseline).
* ``backbone=llama``: a Llama / Qwen2 / GPT-2 decoder (RMSNorm or LayerNorm, SwiGLU or GELU, grouped-query
  attention with fused q/k/v rows grouped per key/value head, rotary with scaling or learned positions),
  bidirectional (LLaDA's architecture) or causal.

``timesteps`` is the network's time input (``config.mdtrain["cond"]`` says what: sigma(t), t, or nothing); the
logits are raw (B, L, vocab_size), the mask column included: the objective's parameterisation (e.g. SUBS: mask
logit to -inf, normalise, carry unmasked tokens over) is the caller's, as in MDLM's published models.
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput, MaskedLMOutput

from .configuration_mdtrain import MdtrainConfig


# ---------------------------------------------------------------------------------------------------------------
# shared pieces


def rotate(x, cos, sin):
    """x (B, L, H, hd) by cos/sin (L, hd) in rotate-half layout."""
    cos, sin = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def inverse_frequencies(head_dim, theta, scaling, seq_len, max_positions):
    """Rotary inverse frequencies (float64) and the attention factor, for Hugging Face's rope scaling types."""
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    exps = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    inv = theta ** -exps
    factor = float(scaling.get("factor", 1.0)) if scaling else 1.0
    if kind == "linear":
        return inv / factor, 1.0
    if kind == "dynamic":
        if max_positions and seq_len > max_positions:
            base = theta * (factor * seq_len / max_positions - (factor - 1)) ** (head_dim / (head_dim - 2))
            inv = base ** -exps
        return inv, 1.0
    if kind == "default":
        return inv, 1.0
    ctx = float(scaling.get("original_max_position_embeddings") or max_positions or seq_len)
    if kind == "llama3":
        lo_f, hi_f = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        wave = 2 * math.pi / inv
        out = torch.where(wave > ctx / lo_f, inv / factor, inv)
        t = (ctx / wave - lo_f) / (hi_f - lo_f)
        mid = (wave >= ctx / hi_f) & (wave <= ctx / lo_f)
        return torch.where(mid, (1 - t) * out / factor + t * out, out), 1.0
    if kind == "yarn":
        def dim_of(rot):
            return head_dim * math.log(ctx / (rot * 2 * math.pi)) / (2 * math.log(theta))
        lo, hi = dim_of(float(scaling.get("beta_fast", 32.0))), dim_of(float(scaling.get("beta_slow", 1.0)))
        if scaling.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, head_dim - 1)
        hi = hi + 0.001 if lo == hi else hi
        extrapolate = 1 - ((torch.arange(head_dim // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
        inv = inv * extrapolate + inv / factor * (1 - extrapolate)
        attn = scaling.get("attention_factor")
        if attn is None:
            def m(s, k=1.0):
                return 0.1 * k * math.log(s) + 1.0 if s > 1 else 1.0
            a, b = scaling.get("mscale"), scaling.get("mscale_all_dim")
            attn = m(factor, a) / m(factor, b) if a and b else m(factor)
        return inv, float(attn)
    raise ValueError(f"unsupported rope_type {kind}")


def rotary(length, head_dim, device, theta=10000.0, scaling=None, max_positions=0):
    inv, factor = inverse_frequencies(head_dim, theta, scaling or {}, length, max_positions)
    ang = torch.arange(length, dtype=torch.float64)[:, None] * inv[None]
    ang = torch.cat([ang, ang], dim=-1)
    return (ang.cos() * factor).float().to(device), (ang.sin() * factor).float().to(device)


def sdpa(q, k, v, causal, key_mask):
    """softmax(q k^T / sqrt(hd)) v over (B, L, H, hd); k/v may have fewer heads (grouped queries)."""
    if k.shape[2] != q.shape[2]:
        k, v = (t.repeat_interleave(q.shape[2] // k.shape[2], dim=2) for t in (k, v))
    mask = None
    if key_mask is not None:
        n = q.shape[1]
        eye = torch.eye(n, dtype=torch.bool, device=q.device)
        allowed = torch.ones(n, n, dtype=torch.bool, device=q.device)
        allowed = allowed.tril() if causal else allowed
        mask = (allowed[None, None] & key_mask[:, None, None, :].bool()) | eye
        causal = False
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         is_causal=causal)
    return out.transpose(1, 2)


class FP32LayerNorm(nn.Module):
    """Bias-free LayerNorm in fp32 with an optional scale (mdtrain's DiT)."""

    def __init__(self, d, affine=True):
        super().__init__()
        self.d = d
        self.weight = nn.Parameter(torch.ones(d)) if affine else None

    def forward(self, x):
        w = None if self.weight is None else self.weight.float()
        return F.layer_norm(x.float(), (self.d,), w, None, 1e-5).to(x.dtype)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


# ---------------------------------------------------------------------------------------------------------------
# dit / causal


class TimeEmbed(nn.Module):
    def __init__(self, cond_dim, md4):
        super().__init__()
        self.md4 = md4
        self.n_freq, hidden = (cond_dim, 4 * cond_dim) if md4 else (256, cond_dim)
        self.fc1 = nn.Linear(self.n_freq, hidden)
        self.fc2 = nn.Linear(hidden, cond_dim)

    def forward(self, t):
        half = self.n_freq // 2
        k = torch.arange(half, device=t.device, dtype=torch.float32)
        freqs = torch.exp(-math.log(10000.0) * k / (half - 1 if self.md4 else half))
        args = (t.float() * (1000.0 if self.md4 else 1.0))[:, None] * freqs[None]
        feats = torch.cat([args.sin(), args.cos()] if self.md4 else [args.cos(), args.sin()], dim=-1)
        return self.fc2(F.silu(self.fc1(feats.to(self.fc1.weight.dtype))))


class DiTAttention(nn.Module):
    def __init__(self, d, n_heads, causal):
        super().__init__()
        self.n_heads, self.causal = n_heads, causal
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)

    def forward(self, x, rope, key_mask):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, self.n_heads, 3, d // self.n_heads).unbind(3)
        q, k = rotate(q, *rope), rotate(k, *rope)
        return self.out(sdpa(q, k, v, self.causal, key_mask).reshape(b, n, d))


class DiTMLP(nn.Module):
    def __init__(self, d, md4):
        super().__init__()
        self.md4 = md4
        hidden = 32 * math.ceil(2 * 4 * d / 3 / 32) if md4 else 4 * d
        self.fc1 = nn.Linear(d, hidden, bias=not md4)
        self.gate = nn.Linear(d, hidden, bias=False) if md4 else None
        self.fc2 = nn.Linear(hidden, d, bias=not md4)

    def forward(self, x):
        if self.md4:
            return self.fc2(torch.sigmoid(self.gate(x)) * self.fc1(x))
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    def __init__(self, config, causal):
        super().__init__()
        d, md4 = config.d_model, config.variant == "md4"
        self.norm1, self.norm2 = FP32LayerNorm(d, not md4), FP32LayerNorm(d, not md4)
        self.attn = DiTAttention(d, config.n_heads, causal)
        self.mlp = DiTMLP(d, md4)
        self.adaLN_modulation = None if causal else nn.Linear(config.cond_dim, 6 * d)

    def forward(self, x, c, rope, key_mask):
        if self.adaLN_modulation is None:
            x = x + self.attn(self.norm1(x), rope, key_mask)
            return x + self.mlp(self.norm2(x))
        sa, ca, ga, sm, cm, gm = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
        x = x + ga * self.attn(modulate(self.norm1(x), sa, ca), rope, key_mask)
        return x + gm * self.mlp(modulate(self.norm2(x), sm, cm))


# ---------------------------------------------------------------------------------------------------------------
# llama


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


class BiasLayerNorm(nn.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


def norm_of(spec, d):
    return RMSNorm(d, spec["norm_eps"]) if spec["norm"] == "rmsnorm" else BiasLayerNorm(d, eps=spec["norm_eps"])


class LlamaAttention(nn.Module):
    def __init__(self, d, n_heads, spec):
        super().__init__()
        self.n_kv, self.hd = spec["n_kv_heads"], spec["head_dim"]
        self.group = n_heads // self.n_kv
        self.causal = spec["attention"] == "causal"
        self.qkv = nn.Linear(d, self.n_kv * (self.group + 2) * self.hd, bias=spec["qkv_bias"])
        self.out = nn.Linear(n_heads * self.hd, d, bias=spec["out_bias"])

    def forward(self, x, rope, key_mask):
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, self.n_kv, self.group + 2, self.hd)
        q = qkv[:, :, :, :self.group].reshape(b, n, self.n_kv * self.group, self.hd)
        k, v = qkv[:, :, :, self.group], qkv[:, :, :, self.group + 1]
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        return self.out(sdpa(q, k, v, self.causal, key_mask).reshape(b, n, -1))


class LlamaMLP(nn.Module):
    def __init__(self, d, spec):
        super().__init__()
        self.kind, hidden, bias = spec["mlp"], spec["ffn_hidden"], spec["mlp_bias"]
        self.fc1 = nn.Linear(d, hidden, bias=bias)
        self.gate = nn.Linear(d, hidden, bias=bias) if self.kind == "swiglu" else None
        self.fc2 = nn.Linear(hidden, d, bias=bias)

    def forward(self, x):
        if self.kind == "swiglu":
            return self.fc2(F.silu(self.gate(x)) * self.fc1(x))
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh" if self.kind == "gelu_tanh" else "none"))


class LlamaBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        spec, d = config.llama, config.d_model
        self.norm1, self.norm2 = norm_of(spec, d), norm_of(spec, d)
        self.attn = LlamaAttention(d, config.n_heads, spec)
        self.mlp = LlamaMLP(d, spec)

    def forward(self, x, c, rope, key_mask):
        x = x + self.attn(self.norm1(x), rope, key_mask)
        return x + self.mlp(self.norm2(x))


# ---------------------------------------------------------------------------------------------------------------
# the models


class MdtrainPreTrainedModel(PreTrainedModel):
    config_class = MdtrainConfig
    base_model_prefix = "mdtrain"
    _no_split_modules = ["DiTBlock", "LlamaBlock"]

    def __init__(self, config: MdtrainConfig):
        super().__init__(config)
        d, kind = config.d_model, config.backbone
        self.embed = nn.Embedding(config.vocab_size, d)
        if kind == "llama":
            spec = config.llama
            self.pos_embed = nn.Embedding(spec["max_positions"], d) if spec["positions"] == "learned" else None
            self.blocks = nn.ModuleList(LlamaBlock(config) for _ in range(config.n_layers))
            self.final_norm = norm_of(spec, d)
            self.head = None if spec["tie_embeddings"] else nn.Linear(d, config.vocab_size, bias=False)
            self.time_embed = self.final_adaLN = None
        else:
            md4 = config.variant == "md4"
            self.pos_embed = None
            self.time_embed = TimeEmbed(config.cond_dim, md4) if kind == "dit" else None
            self.blocks = nn.ModuleList(DiTBlock(config, kind == "causal") for _ in range(config.n_layers))
            self.final_norm = FP32LayerNorm(d, not md4)
            self.final_adaLN = nn.Linear(config.cond_dim, 2 * d) if kind == "dit" else None
            self.head = nn.Linear(d, config.vocab_size, bias=not md4)
        self.post_init()

    def _init_weights(self, module):
        # every weight comes from model.safetensors; this only serves models built from a config alone
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def logits(self, input_ids, timesteps=None, attention_mask=None):
        config = self.config
        b, n = input_ids.shape
        h = self.embed(input_ids)
        if self.pos_embed is not None:
            h = h + self.pos_embed(torch.arange(n, device=input_ids.device))
        c = None
        if self.time_embed is not None:
            t = torch.zeros(b, device=h.device) if timesteps is None else torch.as_tensor(timesteps, device=h.device)
            t = t.reshape(-1).expand(b) if t.numel() == 1 else t.reshape(b)
            c = self.time_embed(t)
            c = torch.sigmoid(c) if config.variant == "md4" else F.silu(c)
        if config.backbone == "llama":
            spec = config.llama
            rope = None if spec["positions"] == "learned" else rotary(
                n, spec["head_dim"], h.device, spec["rope_theta"], spec["rope_scaling"], spec["max_positions"])
        else:
            rope = rotary(n, config.d_model // config.n_heads, h.device)
        key_mask = None
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            key_mask = attention_mask.to(h.device).bool()
        for block in self.blocks:
            h = block(h, c, rope, key_mask)
        h = self.final_norm(h)
        if self.final_adaLN is not None:
            shift, scale = self.final_adaLN(c)[:, None].chunk(2, dim=-1)
            h = modulate(h, shift, scale)
        out = F.linear(h, self.embed.weight) if self.head is None else self.head(h)
        return out.float()


class MdtrainForMaskedLM(MdtrainPreTrainedModel):
    """Diffusion denoiser: logits over the vocabulary at every position of the (partly masked) input."""

    def forward(self, input_ids, timesteps: Optional[torch.Tensor] = None, attention_mask=None,
                return_dict: Optional[bool] = None, **kwargs):
        logits = self.logits(input_ids, timesteps, attention_mask)
        if return_dict is False:
            return (logits,)
        return MaskedLMOutput(logits=logits)


class MdtrainForCausalLM(MdtrainPreTrainedModel):
    """Autoregressive model: the logits at position i predict token i + 1."""

    def forward(self, input_ids, attention_mask=None, return_dict: Optional[bool] = None, **kwargs):
        logits = self.logits(input_ids, None, attention_mask)
        if return_dict is False:
            return (logits,)
        return CausalLMOutput(logits=logits)
