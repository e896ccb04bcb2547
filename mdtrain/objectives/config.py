"""The `objective` and `sample` config sections (owned by objectives/)."""
from __future__ import annotations

from dataclasses import dataclass

from mdtrain.configtools import doc


@dataclass
class ObjectiveConfig:
    name: str = doc("mdlm", "training objective", choices=("mdlm", "md4", "genmd4", "d3pm", "sedd", "ar"))
    schedule: str = doc("loglinear", "noise schedule name")


@dataclass
class SampleConfig:
    sampler: str = doc("ddpm_cache", "sampler name")
    steps: int = doc(1000, "number of reverse steps T")
    num_samples: int = doc(8, "how many sequences to generate")
    batch_size: int = doc(8, "sequences generated at once")
    seed: int = doc(0, "generator seed")
