"""How objectives and samplers call a network: the ``model_fn`` protocol, and ``make_model_fn`` for a module.

``model_fn(x (B, L) long, cond (B,) float | None = None, attention_mask (B, L) | None = None) -> logits (B, L, V)``
with ``V`` counting the mask token. Optional attributes: ``device`` (where samplers put their tokens) and, for causal
models, ``decode_step(tokens_new, cache) -> (logits, cache)`` (KV-cache decoding). Objectives never see the module
behind it, so any backbone, wrapper or parallel layout works the same way.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

ModelFn = Callable[..., torch.Tensor]


def make_model_fn(model: torch.nn.Module, attention_mask: Optional[torch.Tensor] = None, **inputs) -> ModelFn:
    """The ``model_fn`` of a module (``model(x, cond, attention_mask, **inputs)``); forwards ``decode_step``.

    ``attention_mask`` is the default padding mask of the batch (cut to the length of shorter inputs); a mask
    passed in the call wins. ``inputs`` are per-batch inputs the backbone takes besides the tokens (e.g. the class
    ``labels`` of a class-conditional image model)."""
    def model_fn(x, cond=None, attention_mask=None, _default=attention_mask):
        mask = attention_mask if attention_mask is not None else _default
        if mask is not None and mask.shape[1] != x.shape[1]:
            mask = mask[:, : x.shape[1]]
        return model(x, cond, mask, **inputs)

    if hasattr(model, "decode_step"):
        model_fn.decode_step = model.decode_step
    try:
        model_fn.device = next(model.parameters()).device  # samplers put their tokens here
    except StopIteration:
        pass
    return model_fn
