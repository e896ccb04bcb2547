"""How objectives and samplers call a network: the ``model_fn`` protocol, and ``make_model_fn`` for a module.

``model_fn(x (B, L) long, cond (B,) float | None = None, attention_mask (B, L) | None = None) -> logits (B, L, V)``
with ``V`` counting the mask token. Optional attributes: ``device`` (where samplers put their tokens) and, for causal
models, ``decode_step(tokens_new, cache) -> (logits, cache)`` (KV-cache decoding). Objectives never see the module
behind it, so any backbone, wrapper or parallel layout works the same way.

Backbones with the transformer's extended protocol (``mdtrain/models/transformer.py``) take more, passed through as
keywords: ``cond`` per token (B, L); ``attention_mask`` a bool (B or 1, Lq, Lk) pattern instead of a padding mask;
``positions=`` (L,) or (B, L) RoPE positions; ``kv_cache=`` a cache from ``model_fn.new_kv_cache()`` and
``store_kv=True`` to append to it; ``logits_for=`` a slice of positions to compute logits for. block diffusion
(``objectives/bd3lm.py``) relies on them.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

ModelFn = Callable[..., torch.Tensor]


def make_model_fn(model: torch.nn.Module, attention_mask: Optional[torch.Tensor] = None, **inputs) -> ModelFn:
    """The ``model_fn`` of a module (``model(x, cond, attention_mask, **inputs)``); forwards ``decode_step``.

    ``attention_mask`` is the default padding mask of the batch (cut to the length of shorter inputs); a mask
    passed in the call wins (as it is). ``inputs`` are per-batch inputs the backbone takes besides the tokens (e.g.
    the class ``labels`` of a class-conditional image model); keywords of the call (``positions``, ``kv_cache``, ...)
    are passed on too, and ``new_kv_cache`` is forwarded like ``decode_step``."""
    def model_fn(x, cond=None, attention_mask=None, _default=attention_mask, **kw):
        mask = attention_mask
        if mask is None and _default is not None:
            mask = _default[:, : x.shape[1]] if _default.shape[1] != x.shape[1] else _default
        return model(x, cond, mask, **inputs, **kw)

    for name in ("decode_step", "new_kv_cache"):
        if hasattr(model, name):
            setattr(model_fn, name, getattr(model, name))
    try:
        model_fn.device = next(model.parameters()).device  # samplers put their tokens here
    except StopIteration:
        pass
    return model_fn
