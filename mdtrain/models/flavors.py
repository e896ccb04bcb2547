"""Size presets ("flavors") and how a ModelConfig resolves to concrete dimensions.

| flavor  | layers | d_model | heads | cond | notes                                                                  |
|---------|-------:|--------:|------:|-----:|------------------------------------------------------------------------|
| debug   |      2 |      64 |     4 |   32 | CPU-sized; one step 0.05-0.3 s (bench/model_step_cpu.py)               |
| tiny    |      8 |     512 |     8 |  128 | MDLM tiny: 80.1M parameters with V = 50258                             |
| small   |     12 |     768 |    12 |  128 | MDLM small: 169.6M; causal 162.2M; md4 variant 165.9M (MD4-S)          |
| medium  |     24 |    1024 |    16 |  128 | MDLM medium: 424.5M; md4 variant 416.2M (MD4-M)                        |
| large   |     36 |    1280 |    20 |  128 | GPT-2-large shape (ours; neither paper trains it): 872.9M at V = 50258 |
| 1.3b    |     24 |    2048 |    16 |  128 | GPT-3 XL shape (ours): 1,452.8M at V = 50258; 1,246.9M non-embedding   |
| 7b      |     32 |    4096 |    32 |  128 | LLaMA-7B shape, 4x GELU MLP (ours): 6,957.7M; non-embedding 6,545.9M   |
| md4-cifar10 | 32 |     128 |     1 |  128 | unet: MD4's CIFAR-10 U-Net (32 res blocks per side, 128 channels), 28.4M |

The ``ladder-<N>M`` flavors are a scaling-sweep grid: the (layers, width, heads) shapes of SMDM's
``Diff_LLaMA_*`` table (Nie et al. 2025, arXiv 2410.18514: 6M..2,121M there; depth varied at fixed width and
width at fixed depth), named here by *our* non-embedding parameter count N (no input embedding, no output head, adaLN included) of the
DiT with the mdlm variant and cond 128, in millions (6M..1.6B). N is what a sweep uses in C = 6·N·D. The md4
variant (GLU, cond = head dim) comes out a few percent smaller at the same shape; ``count_params`` gives the exact
number for any config.

With the md4 variant the conditioning width defaults to the head dim (MD4's ``CondEmbedding(feature_dim)``), so
``variant=md4 flavor=small`` is MD4-S; an explicit ``cond_dim`` override wins.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

from mdtrain.configtools import ConfigError
from mdtrain.models.backbone import ModelDims
from mdtrain.models.layers import VARIANTS


@dataclass(frozen=True)
class Flavor:
    n_layers: int
    d_model: int
    n_heads: int
    cond_dim: int = 128


# (layers, width, heads) from SMDM's grid, keyed by our DiT non-embedding count in millions (see the docstring)
_LADDER = {
    "ladder-6M": (6, 256, 4), "ladder-17M": (8, 384, 6), "ladder-29M": (8, 512, 8), "ladder-40M": (9, 576, 9),
    "ladder-54M": (10, 640, 10), "ladder-71M": (13, 640, 10), "ladder-92M": (12, 768, 12),
    "ladder-115M": (15, 768, 12), "ladder-138M": (18, 768, 12), "ladder-145M": (14, 896, 14),
    "ladder-186M": (18, 896, 14), "ladder-214M": (16, 1024, 16), "ladder-268M": (20, 1024, 16),
    "ladder-372M": (18, 1280, 10), "ladder-496M": (24, 1280, 10), "ladder-561M": (19, 1536, 12),
    "ladder-738M": (25, 1536, 12), "ladder-799M": (20, 1792, 14), "ladder-959M": (24, 1792, 14),
    "ladder-1143M": (22, 2048, 16), "ladder-1299M": (25, 2048, 16), "ladder-1639M": (28, 2176, 17),
}

FLAVORS: dict[str, Flavor] = {
    "debug": Flavor(2, 64, 4, 32),
    "tiny": Flavor(8, 512, 8),
    "small": Flavor(12, 768, 12),
    "medium": Flavor(24, 1024, 16),
    "large": Flavor(36, 1280, 20),
    "1.3b": Flavor(24, 2048, 16),
    "7b": Flavor(32, 4096, 32),
    "md4-cifar10": Flavor(32, 128, 1, 128),  # model.name=unet: MD4's CIFAR-10 U-Net, 28.4M parameters
    **{name: Flavor(*shape) for name, shape in _LADDER.items()},
}


def get_flavor(name: str) -> Flavor:
    if name not in FLAVORS:
        close = difflib.get_close_matches(name, list(FLAVORS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"model.flavor: unknown flavor '{name}'{hint}; known: {', '.join(FLAVORS)}")
    return FLAVORS[name]


def resolve(cfg) -> ModelDims:
    """The flavor of a ModelConfig with its overrides (n_layers, d_model, n_heads, cond_dim) applied, checked."""
    f = get_flavor(cfg.flavor)
    variant = VARIANTS[cfg.variant]
    n_layers = cfg.n_layers if cfg.n_layers is not None else f.n_layers
    d_model = cfg.d_model if cfg.d_model is not None else f.d_model
    n_heads = cfg.n_heads if cfg.n_heads is not None else f.n_heads
    for key, val in (("n_layers", n_layers), ("d_model", d_model), ("n_heads", n_heads)):
        if val < 1:
            raise ConfigError(f"model.{key} must be >= 1, got {val}")
    if d_model % n_heads or (d_model // n_heads) % 2:
        raise ConfigError(f"model.d_model={d_model} must be n_heads={n_heads} times an even head dim")
    if cfg.cond_dim is not None:
        cond_dim = cfg.cond_dim
    else:
        cond_dim = d_model // n_heads if variant.name == "md4" else f.cond_dim
    if cond_dim < 2 or cond_dim % 2:
        raise ConfigError(f"model.cond_dim must be an even number >= 2, got {cond_dim}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.mamba_d_state < 1:
        raise ConfigError(f"model.mamba_d_state must be >= 1, got {cfg.mamba_d_state}")
    return ModelDims(name=cfg.name, variant=variant, n_layers=n_layers, d_model=d_model, n_heads=n_heads,
                     cond_dim=cond_dim, dropout=cfg.dropout, attention=cfg.attention,
                     mamba_backend=cfg.mamba_backend, mamba_d_state=cfg.mamba_d_state,
                     image_shape=tuple(cfg.image_shape), num_classes=cfg.num_classes,
                     llama=cfg.llama if cfg.name == "llama" else None)
