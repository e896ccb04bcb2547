"""The model + objective pair a config describes, built once, the same way for training, inference and export.

The objective is built first (it fixes the vocabulary convention: ``vocab_size`` counts the mask token), then the
single-device backbone; an objective with parameters (GenMD4's learnable schedule) rides along as
``model.objective``, so every engine shards, syncs, optimises, checkpoints and exports it with the network.
"""
from __future__ import annotations

from torch import nn

from mdtrain.models import build_model
from mdtrain.objectives import Objective, build_objective


def attach_objective(model: nn.Module, objective: Objective) -> nn.Module:
    """Register ``objective`` as ``model.objective`` when it has parameters (else the model is unchanged)."""
    if any(True for _ in objective.parameters()):
        model.add_module("objective", objective)
    return model


def build_objective_and_model(cfg, vocab_size: int, mask_id: int, seq_len: int) -> tuple[nn.Module, Objective]:
    """(model with its objective attached, objective) for the ``model`` and ``objective`` sections of ``cfg``.

    The weights are initialised from torch's global generator: seed it first for reproducible weights."""
    objective = build_objective(cfg.objective, vocab_size, mask_id)
    model = attach_objective(build_model(cfg.model, vocab_size, seq_len), objective)
    return model, objective
