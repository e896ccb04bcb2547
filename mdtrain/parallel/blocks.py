"""Per-block wrappers applied from outside the models: activation checkpointing and torch.compile.

torchtitan's order is tensor parallel -> activation checkpointing -> compile -> FSDP/ZeRO/DDP; the trainer calls
``wrap_blocks`` after tensor parallelism and before building the engine. Blocks are changed in place (their forward
is routed through ``torch.utils.checkpoint``; ``nn.Module.compile`` compiles the call), so parameter names, and with
them checkpoints and exports, do not depend on these switches.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        # non-reentrant: composes with FSDP2, compile and kwargs
        return _checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


def wrap_blocks(model: nn.Module, checkpoint: bool = False, compile: bool = False) -> nn.Module:
    """Apply activation checkpointing and/or ``torch.compile`` to every block of ``model.blocks`` in place."""
    for block in model.blocks:
        if checkpoint:
            block.forward = _checkpointed(block.forward)
        if compile:
            block.compile()
    return model
