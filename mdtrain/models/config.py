"""The `model` config section (owned by models/)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from mdtrain.configtools import doc


@dataclass
class ModelConfig:
    name: str = doc("dit", "backbone: dit (bidirectional), causal (for ar), dimamba (bidirectional Mamba)",
                    choices=("dit", "causal", "dimamba"))
    flavor: str = doc("debug", "size preset from the flavor registry (debug, tiny, small, medium, large, ladder-*)")
    n_layers: Optional[int] = doc(None, "override the flavor's number of blocks")
    d_model: Optional[int] = doc(None, "override the flavor's hidden size")
    n_heads: Optional[int] = doc(None, "override the flavor's number of attention heads")
    cond_dim: Optional[int] = doc(None, "override the flavor's time-conditioning width")
    dropout: float = doc(0.1, "dropout probability (MDLM: 0.1)")
