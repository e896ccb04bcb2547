"""CPU training-step time of each backbone at the ``debug`` flavor (fp32, one thread): the claim in
mdtrain/models/flavors.py that the debug flavor trains a CPU step in well under a second, measured.

    python bench/model_step_cpu.py [--threads 1] [--batch 8] [--seq 128] [--repeats 5]

Prints one row per backbone: the best and the median wall time of a forward + backward + AdamW step.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from mdtrain.models import BACKBONES, ModelConfig, build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s), "
          f"batch {args.batch} x seq {args.seq}, vocab {args.vocab}")
    print(f"{'backbone':<10} {'best_s':>8} {'median_s':>9}")
    for name in BACKBONES:
        torch.manual_seed(0)
        model = build_model(ModelConfig(name=name, flavor="debug"), args.vocab, args.seq)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randint(0, args.vocab - 1, (args.batch, args.seq))
        times = []
        for _ in range(args.repeats + 1):  # the first step warms the allocator and is dropped
            start = time.perf_counter()
            loss = F.cross_entropy(model(x, torch.rand(args.batch)).flatten(0, 1), x.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - start)
        times = times[1:]
        print(f"{name:<10} {min(times):>8.3f} {statistics.median(times):>9.3f}")


if __name__ == "__main__":
    main()
