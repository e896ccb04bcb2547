"""Single-device backbones (DiT, causal transformer, bidirectional Mamba), flavors and FLOP counts.

``build_model(cfg, vocab_size, seq_len)`` returns a module with
``forward(x (B, L) int, cond (B,) float | None = None, attention_mask (B, L) | None = None) -> logits (B, L, V)``
in fp32, ``vocab_size`` including the mask token. Every backbone keeps its repeated blocks in ``model.blocks``
(activation checkpointing, ``torch.compile`` and FSDP are applied per block from outside) and its layers as plain
``nn.Linear`` / ``nn.Embedding`` under stable names (``embed``, ``blocks.i.attn.qkv``, ``blocks.i.attn.out``,
``blocks.i.mlp.fc1`` / ``gate`` / ``fc2``, ``blocks.i.adaLN_modulation``, ``final_adaLN``, ``head``), so
tensor parallelism can swap them from outside. Nothing here imports torch.distributed, DeepSpeed or Megatron.
"""
from __future__ import annotations

import torch.nn as nn

from mdtrain.models.attention import attention
from mdtrain.models.backbone import Backbone, ModelDims
from mdtrain.models.config import ModelConfig
from mdtrain.models.flavors import FLAVORS, Flavor, count_params, flops_per_token, get_flavor, resolve
from mdtrain.models.mamba import DiMamba
from mdtrain.models.transformer import KVCache, Transformer

__all__ = ["build_model", "ModelConfig", "FLAVORS", "Flavor", "get_flavor", "resolve", "count_params",
           "flops_per_token", "attention", "Backbone", "ModelDims", "Transformer", "DiMamba", "KVCache"]


def build_model(cfg: ModelConfig, vocab_size: int, seq_len: int) -> nn.Module:
    """The backbone named by ``cfg.name`` at the size of ``cfg.flavor`` (+ overrides), initialised.

    ``seq_len`` is the training length: the causal model's KV cache is sized for it (it grows past it if asked).
    Build under ``torch.device("meta")`` and call ``model.init_weights()`` after ``to_empty`` for deferred init.
    """
    if vocab_size < 2 or seq_len < 1:
        raise ValueError(f"build_model needs vocab_size >= 2 and seq_len >= 1, got {vocab_size}, {seq_len}")
    dims = resolve(cfg)
    if dims.name == "dimamba":
        model = DiMamba(dims, vocab_size)
    elif dims.name in ("dit", "causal"):
        model = Transformer(dims, vocab_size, causal=dims.name == "causal")
    else:
        raise ValueError(f"unknown backbone model.name={dims.name!r} (dit, causal, dimamba)")
    model.max_seq_len = seq_len
    return model
