"""Model-state memory per rank for every (engine x tp) layout, from the code's own parameter counts.

For a model config: its parameters split into the tensor-parallel cut (``tensor_parallel_layout``: TP-split tensors,
held 1/tp per rank, and replicated ones, held whole), and per engine the bytes per parameter that a rank keeps
whole and those it keeps 1/dp of. Weights, gradients, AdamW moments, fp32 masters and the EMA; activations, the
gathered FSDP block and communication buffers are not counted (they depend on batch and sequence length).

    python bench/memory_plan.py [--gpus 8] | tee bench/results/memory_plan_DATE.log

Bytes per parameter (fp32 = 4, bf16 = 2; ``whole`` + ``sharded`` / dp):

| engine | precision | whole | sharded over dp |
|---|---|---|---|
| ddp | fp32 / bf16 autocast | weights 4, grads 4, AdamW 8, EMA 4 | - |
| fsdp | fp32 / bf16 params | - | weights 4, grads 4, AdamW 8, EMA 4 |
| zero1 | fp32 | weights 4, grads 4 | AdamW 8, EMA 4 |
| zero1 | bf16 | weights 2, grads 2 | fp32 master 4, AdamW 8, EMA 4 |
| zero2 | fp32 | weights 4 | grads 4, AdamW 8, EMA 4 |
| zero2 | bf16 | weights 2 | grads 2, fp32 master 4, AdamW 8, EMA 4 |
| zero3 | fp32 | - | weights 4, fp32 master 4, grads 4, AdamW 8, EMA 4 |
| zero3 | bf16 | - | weights 2, fp32 master 4, grads 2, AdamW 8, EMA 4 |

(FSDP2 in bf16 keeps fp32 sharded parameters and casts each gathered block; DeepSpeed's ZeRO-3 keeps an fp32
master copy beside its partition even in fp32; the EMA lives on each rank's fp32 pieces.)
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

VOCAB = 50258
BYTES = {  # engine -> precision -> (bytes per parameter kept whole, bytes per parameter kept 1/dp)
    "ddp": {"fp32": (20, 0), "bf16": (20, 0)},
    "fsdp": {"fp32": (0, 20), "bf16": (0, 20)},
    "zero1": {"fp32": (8, 12), "bf16": (4, 16)},
    "zero2": {"fp32": (4, 16), "bf16": (2, 18)},
    "zero3": {"fp32": (0, 24), "bf16": (0, 20)},
}
SHAPES = {"DiT-small": ("small", None), "1.3B (24 x 2048)": ("medium", (24, 2048, 16))}


def split_counts(model_cfg, tp: int) -> tuple[int, int]:
    """(parameters a rank holds of the TP-split tensors, parameters of the replicated ones), one rank of tp."""
    import torch
    from mdtrain.models.registry import build_model
    from mdtrain.parallel.tensor_parallel_layout import ModelLayout

    with torch.device("meta"):
        model = build_model(model_cfg, VOCAB, 1024)
    layout = ModelLayout.from_shapes({n: p.shape for n, p in model.named_parameters()})
    split_names = layout.split_set(tp)
    split = rep = 0
    for name, shape in layout.local_shapes(tp).items():
        n = int(torch.Size(shape).numel())
        if name in split_names:
            split += n
        else:
            rep += n
    return split, rep


def per_rank_gib(model_cfg, engine: str, precision: str, dp: int, tp: int) -> float:
    split, rep = split_counts(model_cfg, tp)
    whole, sharded = BYTES[engine][precision]
    local = split + rep  # parameters one TP rank holds (split ones already 1/tp)
    return (whole * local + sharded * local / dp) / 2 ** 30


def model_cfg(flavor: str, shape):
    from mdtrain.models import ModelConfig
    if shape is None:
        return ModelConfig(name="dit", flavor=flavor)
    layers, d, heads = shape
    return ModelConfig(name="dit", flavor=flavor, n_layers=layers, d_model=d, n_heads=heads)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    args = ap.parse_args()
    from mdtrain.models import count_params

    tps = [t for t in (1, 2, 4, 8) if args.gpus % t == 0]
    print(f"# model-state GiB per rank at {args.gpus} ranks (dp = {args.gpus} / tp), {args.precision}, EMA on, "
          f"V = {VOCAB}; activations not included")
    for label, (flavor, shape) in SHAPES.items():
        cfg = model_cfg(flavor, shape)
        n = count_params(cfg, VOCAB)["total"]
        print(f"\n## {label}: {n / 1e6:,.1f}M parameters")
        print("| engine | " + " | ".join(f"tp={t}" for t in tps) + " |")
        print("|---|" + "---:|" * len(tps))
        for engine in BYTES:
            cells = [f"{per_rank_gib(cfg, engine, args.precision, args.gpus // t, t):.2f}" for t in tps]
            print(f"| {engine} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
