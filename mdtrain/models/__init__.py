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

from mdtrain.models.attention import attention
from mdtrain.models.backbone import Backbone, ModelDims
from mdtrain.models.config import ModelConfig
from mdtrain.models.flavors import FLAVORS, Flavor, get_flavor, resolve
from mdtrain.models.flops import count_params, flops_per_token
from mdtrain.models.mamba import DiMamba
from mdtrain.models.registry import BACKBONES, build_model, register_backbone
from mdtrain.models.transformer import KVCache, Transformer

__all__ = ["build_model", "register_backbone", "BACKBONES", "ModelConfig", "FLAVORS", "Flavor", "get_flavor",
           "resolve", "count_params", "flops_per_token", "attention", "Backbone", "ModelDims", "Transformer",
           "DiMamba", "KVCache"]
