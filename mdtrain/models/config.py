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
    variant: str = doc("mdlm", "block style: mdlm (GELU-tanh MLP 4x with biases, LayerNorm with learnable scale, "
                               "SiLU modulation, cond = sigma) or md4 (sigmoid-GLU MLP, parameter-free LayerNorm, "
                               "sigmoid modulation, no biases, channel-wise dropout, cond = t, embedded as t*1000, "
                               "cond_dim defaults to the head dim)", choices=("mdlm", "md4"))
    n_layers: Optional[int] = doc(None, "override the flavor's number of blocks")
    d_model: Optional[int] = doc(None, "override the flavor's hidden size")
    n_heads: Optional[int] = doc(None, "override the flavor's number of attention heads (dimamba: SSM head dim = "
                                       "d_model / n_heads)")
    cond_dim: Optional[int] = doc(None, "override the flavor's time-conditioning width")
    dropout: float = doc(0.1, "dropout probability (MDLM: 0.1; MD4 OWT: 0.02)")
    attention: str = doc("auto", "attention kernel: auto (flash-attn when importable and the inputs are CUDA "
                                 "bf16/fp16, else scaled_dot_product_attention), flash (require flash-attn), sdpa",
                         choices=("auto", "flash", "sdpa"))
    mamba_backend: str = doc("auto", "dimamba scan: auto (mamba-ssm's Triton SSD kernel when importable and on CUDA, "
                                     "else pure PyTorch), triton (require the kernel), torch",
                             choices=("auto", "triton", "torch"))
    mamba_d_state: int = doc(64, "dimamba: SSM state size per head (Mamba-2 default 128)")

    def validate(self):
        from mdtrain.models.flavors import resolve
        resolve(self)  # unknown flavor, head-count and width mismatches fail here, before any work
