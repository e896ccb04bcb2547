"""Parameter counts and training FLOPs per token, read off the real module tree (built on the meta device).

Two FLOP numbers, both for one training token (forward + backward = 3x forward):

* ``rule`` = 6·N + 12·n_layers·d_model·T (Kaplan/Chinchilla/PaLM convention), N = the parameters a token
  multiplies: everything except the input embedding and the per-sequence time conditioning (time MLP, adaLN).
  The attention term is the full non-causal one even for the causal model; it is 0 for dimamba (no attention).
  Use it to plan sweeps (C = rule·D) and to compare with papers.
* ``exact`` = 3 x (every matmul of the forward): 2·in·out per token for each Linear (the per-sequence
  conditioning Linears divided by T), depthwise convs, q·k and p·v (causal: each query sees (T+1)/2 keys on
  average, as flash kernels skip masked blocks), and the SSM scan's two contractions (dt·B x^T into the state,
  C·h out of it; 2·2·d_inner·d_state per direction). Element-wise work (norms, activations, softmax, dropout,
  decays) is not counted. This is what the MFU meter divides by the peak matmul throughput.

Block diffusion (``block_size`` b > 0, bd3lm): a training token enters twice (x_t ⊕ x_0, 2L inputs), so every
matmul but the output head (run on the x_t half only) counts twice, and a pair of queries sees L + b keys on
average (noisy block k: itself and the k clean blocks before it; clean block k: blocks 0..k; what a block-sparse
kernel computes). ``rule`` becomes 6·(2N − N_head) + 12·n_layers·d·(T + b).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from mdtrain.models.llama import GroupedAttention
from mdtrain.models.mamba import SSMDirection
from mdtrain.models.registry import build_model
from mdtrain.models.transformer import SelfAttention


def _meta_model(cfg, vocab_size: int, seq_len: int = 1024) -> nn.Module:
    with torch.device("meta"):
        return build_model(cfg, vocab_size, seq_len)


def _is_conditioning(name: str) -> bool:
    return name.startswith("time_embed") or "adaLN" in name or "cond_proj" in name  # cond_proj: the unet's


def count_params(model_or_cfg, vocab_size: int | None = None) -> dict:
    """Parameter counts of a model, or of a ModelConfig at ``vocab_size`` (mask token included).

    Returns ``total``; ``embedding`` (input table) and ``head`` (output layer), both untied;
    ``non_embedding`` = total - embedding - head (SMDM's N, used by the sweep's C = 6·N·D; MDLM's model card's
    "130M non-embedding" is total - embedding); ``conditioning`` (time MLP + adaLN, per-sequence work).
    """
    if isinstance(model_or_cfg, nn.Module):
        model = model_or_cfg
    else:
        if vocab_size is None:
            raise TypeError("count_params(cfg, vocab_size): a config needs the vocabulary size")
        model = _meta_model(model_or_cfg, vocab_size)
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for p in model.embed.parameters())
    shared = {id(p) for p in model.embed.parameters()}  # a tied head adds nothing
    head = sum(p.numel() for p in model.head.parameters() if id(p) not in shared)
    cond = sum(p.numel() for n, p in model.named_parameters() if _is_conditioning(n))
    return {"total": total, "embedding": embedding, "head": head, "non_embedding": total - embedding - head,
            "conditioning": cond}


def flops_per_token(cfg, vocab_size: int, seq_len: int, causal: bool | None = None, block_size: int = 0) -> dict:
    """Training FLOPs per token of ``cfg`` at (``vocab_size``, ``seq_len``): ``{"rule", "exact", "n_params"}``.

    ``causal`` (default: whether cfg.name is ``causal``) only changes the exact attention count; ``block_size``
    > 0 counts block diffusion's doubled input (module docstring).
    """
    causal = cfg.name == "causal" if causal is None else causal
    model = _meta_model(cfg, vocab_size, seq_len)
    if cfg.name == "unet":
        return _unet_flops_per_token(model)
    t = float(seq_len)
    keys = (t + 1) / 2 if causal else t
    copies = 1.0
    if block_size:
        keys, copies = t + block_size, 2.0  # per token: its x_t and x_0 queries together
    fwd = 0.0
    n_attn = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            per_token = 1.0 if name == "head" else copies
            fwd += per_token * 2.0 * m.in_features * m.out_features / (t if _is_conditioning(name) else 1.0)
        elif isinstance(m, nn.Conv1d):
            fwd += copies * 2.0 * m.out_channels * (m.in_channels // m.groups) * m.kernel_size[0]
        elif isinstance(m, SelfAttention):
            width = m.qkv.out_features // 3
            fwd += 2.0 * 2.0 * keys * width  # q.k^T and p.v
            n_attn += 1
        elif isinstance(m, GroupedAttention):
            fwd += 2.0 * 2.0 * keys * m.q_width
            n_attn += 1
        elif isinstance(m, SSMDirection):
            fwd += copies * 2.0 * 2.0 * m.d_inner * m.d_state
    counts = count_params(model)
    n = counts["total"] - counts["embedding"] - counts["conditioning"]
    d = model.dims.d_model
    n_rule = 2.0 * n - counts["head"] if block_size else n
    rule = 6.0 * n_rule + (12.0 * n_attn * d * (t + block_size) if n_attn else 0.0)
    return {"rule": rule, "exact": 3.0 * fwd, "n_params": n}


def _unet_flops_per_token(model) -> dict:
    """The unet's counts per pixel token. Convolutions and the attention's Linears run once per *pixel* (H·W per
    image), a token is a sub-pixel (H·W·C per image), so per-pixel work is divided by C; the conditioning runs once
    per image (divided by H·W·C). ``rule`` = (6·N + 12·n_attn·d·H·W) / C with N the parameters a pixel multiplies
    (no input embedding, no conditioning); ``exact`` = 3 x the forward's convolutions and matmuls (3x3 convs:
    2·in·out·9 per pixel; q·k^T and p·v: 2·2·H·W·d per pixel)."""
    from mdtrain.models.unet import AttentionBlock
    h, w, c = model.image_shape
    pixels = float(h * w)
    fwd_pixel = fwd_image = 0.0
    n_attn = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            fwd_pixel += 2.0 * m.out_channels * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            if _is_conditioning(name):
                fwd_image += 2.0 * m.in_features * m.out_features
            else:
                fwd_pixel += 2.0 * m.in_features * m.out_features
        elif isinstance(m, AttentionBlock):
            fwd_pixel += 2.0 * 2.0 * pixels * m.qkv.in_features
            n_attn += 1
    counts = count_params(model)
    n = counts["total"] - counts["embedding"] - counts["conditioning"]
    d = model.dims.d_model
    rule = (6.0 * n + 12.0 * n_attn * d * pixels) / c
    exact = 3.0 * (fwd_pixel / c + fwd_image / (pixels * c))
    return {"rule": rule, "exact": exact, "n_params": n}
