"""The `model` config section (owned by models/)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from mdtrain.configtools import ConfigError, doc, section
from mdtrain.models.llama_config import LlamaConfig


@dataclass
class ModelConfig:
    name: str = doc("dit", "backbone: dit (bidirectional), causal (for ar), dimamba (bidirectional Mamba), unet "
                           "(MD4's image U-Net over pixel tokens; flavor md4-cifar10; model.variant does not apply), "
                           "llama (Llama / Qwen2 / GPT-2 decoder, causal or bidirectional: model.llama)",
                    choices=("dit", "causal", "dimamba", "unet", "llama"))
    flavor: str = doc("debug", "size preset from the flavor registry (debug, tiny, small, medium, large, ladder-*)")
    variant: str = doc("mdlm", "block style: mdlm (GELU-tanh MLP 4x with biases, LayerNorm with learnable scale, "
                               "SiLU modulation, cond = sigma) or md4 (sigmoid-GLU MLP, parameter-free LayerNorm, "
                               "sigmoid modulation, no biases, channel-wise dropout, cond = t, embedded as t*1000, "
                               "cond_dim defaults to the head dim)", choices=("mdlm", "md4"))
    n_layers: Optional[int] = doc(None, "override the flavor's number of blocks", ge=1)
    d_model: Optional[int] = doc(None, "override the flavor's hidden size", ge=1)
    n_heads: Optional[int] = doc(None, "override the flavor's number of attention heads (dimamba: SSM head dim = "
                                       "d_model / n_heads)", ge=1)
    cond_dim: Optional[int] = doc(None, "override the flavor's time-conditioning width", ge=1)
    dropout: float = doc(0.1, "dropout probability (MDLM: 0.1; MD4 OWT: 0.02)", ge=0, lt=1)
    attention: str = doc("auto", "attention kernel: auto (flash-attn when importable and the inputs are CUDA "
                                 "bf16/fp16, flex attention for general masks such as bd3lm's on CUDA, else "
                                 "scaled_dot_product_attention), flash (require flash-attn), flex (flex attention "
                                 "for every call; eager on CPU), sdpa", choices=("auto", "flash", "sdpa", "flex"))
    mamba_backend: str = doc("auto", "dimamba scan: auto (mamba-ssm's Triton SSD kernel when importable and on CUDA, "
                                     "else pure PyTorch), triton (require the kernel), torch",
                             choices=("auto", "triton", "torch"))
    mamba_d_state: int = doc(64, "dimamba: SSM state size per head (Mamba-2 default 128)", ge=1)
    image_shape: list[int] = doc([], "image data ([H, W, C], pixels as tokens, H*W*C = data.seq_len; CIFAR-10: "
                                     "[32, 32, 3]): the unet's layout; eval adds bits/dim and `mdtrain sample` "
                                     "writes a PNG grid, for any backbone; [] = not images", ge=1)
    num_classes: int = doc(0, "unet: class-conditional training and sampling on the data's labels (`mdtrain "
                              "prepare --images` keeps them); a class embedding joins the time embedding (MD4's "
                              "classes); 0 = unconditional", ge=0)
    llama: LlamaConfig = section(LlamaConfig, "model.name=llama: attention, norms, MLP, rotary, biases, tying")

    def validate(self):
        from mdtrain.models.flavors import resolve
        resolve(self)  # unknown flavor, head-count and width mismatches fail here, before any work
        if self.image_shape and (len(self.image_shape) != 3 or min(self.image_shape) < 1):
            raise ConfigError(f"model.image_shape must be [H, W, C] with positive entries, got {self.image_shape}")
        if self.num_classes < 0:
            raise ConfigError(f"model.num_classes must be >= 0, got {self.num_classes}")
        if self.name != "unet":
            if self.num_classes:
                raise ConfigError(f"model.num_classes={self.num_classes} (class-conditional) needs model.name=unet")
            return
        if not self.image_shape:
            raise ConfigError("model.name=unet needs model.image_shape=[H,W,C] (CIFAR-10: [32,32,3])")
        d = self.d_model if self.d_model is not None else resolve(self).d_model
        if d % 32:
            raise ConfigError(f"model.name=unet: its GroupNorms have 32 groups, so model.d_model={d} must be a "
                              "multiple of 32")
