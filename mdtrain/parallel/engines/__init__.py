"""Data-parallel engines behind one interface (see ``base.Engine``): ddp, fsdp (FSDP2), deepspeed (ZeRO 0-3)."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from mdtrain.models.init import DeferredInit
from mdtrain.parallel.dist import DistContext
from mdtrain.parallel.engines.base import Engine, read_meta

__all__ = ["Engine", "build_engine", "read_meta"]


def build_engine(pcfg, model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
                 ctx: DistContext, *, precision: str = "fp32", grad_accum: int = 1,
                 micro_batch_size: int = 1, init: Optional[DeferredInit] = None) -> Engine:
    """Wrap ``model`` for ``pcfg.engine`` and build its optimizer with ``make_optimizer(module)`` after wrapping.

    ``precision``: fp32, bf16 (autocast / FSDP mixed precision / DeepSpeed bf16), or auto (bf16 on CUDA).
    ``init``: ``model`` was built on the meta device (``modeling.build_deferred``); the engine allocates and fills
    only the pieces this rank keeps (``parallel/meta_init.py``)."""
    if precision == "auto":
        precision = "bf16" if ctx.device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32, bf16 or auto, got '{precision}'")
    if pcfg.engine == "ddp":
        from mdtrain.parallel.engines.torch_native import DDPEngine
        return DDPEngine(pcfg, model, make_optimizer, ctx, precision, init)
    if pcfg.engine == "fsdp":
        from mdtrain.parallel.engines.torch_native import FSDPEngine
        return FSDPEngine(pcfg, model, make_optimizer, ctx, precision, init)
    if pcfg.engine == "deepspeed":
        from mdtrain.parallel.engines.zero import DeepSpeedEngine
        return DeepSpeedEngine(pcfg, model, make_optimizer, ctx, precision, grad_accum, micro_batch_size, init)
    raise ValueError(f"unknown parallel.engine '{pcfg.engine}' (choose ddp, fsdp or deepspeed)")
