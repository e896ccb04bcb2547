"""The model + objective pair a config describes, built once, the same way for training, inference and export.

The objective is built first (it fixes the vocabulary convention: ``vocab_size`` counts the mask token), then the
single-device backbone; an objective with parameters (GenMD4's learnable schedule) rides along as
``model.objective``, so every engine shards, syncs, optimises, checkpoints and exports it with the network.

Training builds the backbone on the meta device (``build_deferred``): no rank ever holds the whole model; each
engine allocates and fills only its own pieces from the returned ``DeferredInit`` (``mdtrain.parallel.meta_init``),
and the values equal ``build_objective_and_model(..., init_seed=seed)``'s whatever the layout.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mdtrain.models import build_model
from mdtrain.models.init import DeferredInit
from mdtrain.objectives import Objective, build_objective


def attach_objective(model: nn.Module, objective: Objective) -> nn.Module:
    """Register ``objective`` as ``model.objective`` when it has parameters (else the model is unchanged)."""
    if any(True for _ in objective.parameters()):
        model.add_module("objective", objective)
    return model


def build_objective_and_model(cfg, vocab_size: int, mask_id: int, seq_len: int,
                              init_seed: Optional[int] = None) -> tuple[nn.Module, Objective]:
    """(model with its objective attached, objective) for the ``model`` and ``objective`` sections of ``cfg``.

    The backbone's weights are keyed by ``init_seed`` (``mdtrain.models.init``); None draws the seed from
    torch's global generator: seed that first for reproducible weights."""
    objective = build_objective(cfg.objective, vocab_size, mask_id)
    with torch.device("meta"):
        model = build_model(cfg.model, vocab_size, seq_len)
    model.to_empty(device="cpu")
    model.init_weights(init_seed)
    return attach_objective(model, objective), objective


def build_deferred(cfg, vocab_size: int, mask_id: int, seq_len: int,
                   init_seed: int) -> tuple[nn.Module, Objective, DeferredInit]:
    """Like ``build_objective_and_model`` with the backbone on the meta device, plus what initialises it later
    (the objective's own parameters, if any, are built for real: they are small)."""
    objective = build_objective(cfg.objective, vocab_size, mask_id)
    with torch.device("meta"):
        model = build_model(cfg.model, vocab_size, seq_len)
    return attach_objective(model, objective), objective, DeferredInit(init_seed, model.init_plan())
