"""The backbone registry: ``model.name`` -> a constructor ``(dims, vocab_size) -> nn.Module``, and ``build_model``.

A new backbone registers itself here (``register_backbone``) and adds its name to ``ModelConfig.name``'s choices;
nothing else dispatches on the backbone's name.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from mdtrain.models.backbone import ModelDims
from mdtrain.models.flavors import resolve
from mdtrain.models.llama import build_llama
from mdtrain.models.mamba import DiMamba
from mdtrain.models.transformer import Transformer
from mdtrain.models.unet import UNet

BackboneBuilder = Callable[[ModelDims, int], nn.Module]

BACKBONES: dict[str, BackboneBuilder] = {
    "dit": lambda dims, vocab: Transformer(dims, vocab, causal=False),
    "causal": lambda dims, vocab: Transformer(dims, vocab, causal=True),
    "dimamba": DiMamba,
    "unet": UNet,
    "llama": build_llama,
}


def register_backbone(name: str, builder: BackboneBuilder) -> None:
    if name in BACKBONES:
        raise ValueError(f"backbone '{name}' is already registered")
    BACKBONES[name] = builder


def build_model(cfg, vocab_size: int, seq_len: int) -> nn.Module:
    """The backbone named by ``cfg.name`` at the size of ``cfg.flavor`` (+ overrides), initialised.

    ``seq_len`` is the training length: the causal model's KV cache is sized for it (it grows past it if asked).
    Build under ``torch.device("meta")`` and call ``model.init_weights()`` after ``to_empty`` for deferred init.
    """
    if vocab_size < 2 or seq_len < 1:
        raise ValueError(f"build_model needs vocab_size >= 2 and seq_len >= 1, got {vocab_size}, {seq_len}")
    dims = resolve(cfg)
    if dims.name not in BACKBONES:
        raise ValueError(f"unknown backbone model.name={dims.name!r} ({', '.join(BACKBONES)})")
    model = BACKBONES[dims.name](dims, vocab_size)
    model.max_seq_len = seq_len
    return model
