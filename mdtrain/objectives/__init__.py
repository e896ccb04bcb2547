"""The math: noise schedules, objectives (MDLM, MD4, GenMD4, D3PM, SEDD, AR, BD3-LM) and samplers, as pure tensor
functions.

    obj = build_objective(cfg.objective, vocab_size=V_incl_mask, mask_id=m)
    loss, metrics = obj.loss(model_fn, x0, attention_mask, generator)     # model_fn(x_in, cond) -> logits
    tokens, info = samplers.sample(obj, model_fn, batch_size, seq_len, steps, generator)

Conventions and units: objectives/README.md.
"""
from __future__ import annotations

from mdtrain.objectives.ar import AR
from mdtrain.objectives.base import MaskedObjective, Objective, draw_noise
from mdtrain.objectives.bd3lm import BD3LM
from mdtrain.objectives.config import ObjectiveConfig, SampleConfig, resolve_objective
from mdtrain.objectives.d3pm import D3PM
from mdtrain.objectives.genmd4 import GenMD4
from mdtrain.objectives.schedules import build_schedule
from mdtrain.objectives.sedd import SEDD
from mdtrain.objectives.subs import MD4, MDLM

OBJECTIVES: dict[str, type[Objective]] = {c.name: c for c in (MDLM, MD4, GenMD4, D3PM, SEDD, AR, BD3LM)}


def build_objective(cfg: ObjectiveConfig, vocab_size: int, mask_id: int) -> Objective:
    """The objective named by ``cfg.name``. ``vocab_size`` includes the mask token (the network's output width);
    ``mask_id`` is its index."""
    settings = resolve_objective(cfg)
    return OBJECTIVES[settings["name"]](settings, vocab_size, mask_id)


__all__ = ["OBJECTIVES", "Objective", "MaskedObjective", "ObjectiveConfig", "SampleConfig", "build_objective",
           "build_schedule", "draw_noise", "resolve_objective"]
