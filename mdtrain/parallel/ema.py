"""Exponential moving average of the weights, kept on each rank for exactly the pieces of the weights it owns.

The engine hands over ``live``: name -> this rank's fp32 piece of that parameter (a view the optimizer updates:
the whole parameter under DDP, the local shard under FSDP, the fp32 master fragment under ZeRO). The EMA keeps a
float32 shadow of the same shape; nothing is ever gathered to one rank for an update or a swap.
"""
from __future__ import annotations

from typing import Dict

import torch


class ShardedEMA:
    def __init__(self, live: Dict[str, torch.Tensor]):
        self.live = live
        self.shadow = {k: v.detach().float().clone() for k, v in live.items()}

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """shadow <- decay * shadow + (1 - decay) * live."""
        names = list(self.live)
        shadows = [self.shadow[k] for k in names]
        lives = [self.live[k] for k in names]
        if not lives:  # a rank that owns no piece of any parameter (tiny model, many ranks)
            return
        if all(t.dtype == torch.float32 for t in lives):
            torch._foreach_lerp_(shadows, lives, 1.0 - decay)
        else:
            for s, v in zip(shadows, lives):
                s.lerp_(v.float(), 1.0 - decay)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange live and shadow values in place (twice restores both exactly)."""
        for k, v in self.live.items():
            s = self.shadow[k]
            tmp = v.detach().clone()
            v.copy_(s)
            s.copy_(tmp)

    @torch.no_grad()
    def reset(self) -> None:
        """Shadow <- live (after weights were loaded from a checkpoint that had no EMA)."""
        for k, v in self.live.items():
            self.shadow[k].copy_(v)
