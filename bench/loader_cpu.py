"""Loader throughput on CPU: tokens/s that one DP rank's loader delivers from prepared shards (and synthetic sources).

    python bench/loader_cpu.py                       # writes a temporary dataset, prints one line per setting
    python bench/loader_cpu.py --data DIR            # an existing prepared directory

Nothing is trained: batches are only produced and counted, so this is the ceiling the loader puts on training.
Two figures per setting: tokens per wall-clock second, and tokens per CPU-second summed over this process and its
DataLoader workers (psutil), which does not depend on what else the machine is running.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mdtrain.data.config import DataConfig  # noqa: E402
from mdtrain.data.loader import build_loader  # noqa: E402
from mdtrain.data.synthetic import write_shards  # noqa: E402


def _cpu_seconds() -> float:
    import psutil

    procs = [psutil.Process()] + psutil.Process().children(recursive=True)
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def measure(cfg: DataConfig, batch: int, dp_rank: int, dp_size: int, seconds: float) -> tuple[float, float, int]:
    """-> (tokens per wall second, tokens per CPU-second, tokens) over at least ``seconds`` of streaming."""
    loader = build_loader(cfg, "train", batch, dp_rank, dp_size, seed=0)
    it = iter(loader)
    next(it)  # start-up (workers, first window) is not throughput
    n, t0, c0 = 0, time.perf_counter(), _cpu_seconds()
    while time.perf_counter() - t0 < seconds:
        b = next(it)
        n += int(b["attention_mask"].sum())
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    return n / wall, n / max(cpu, 1e-9), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="prepared directory (default: write a synthetic one to a temp dir)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=16384, help="train samples of the temporary dataset")
    ap.add_argument("--batch", type=int, default=32, help="per-rank micro-batch")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--dp", default="1,8", help="DP sizes to emulate (this process is rank 0)")
    args = ap.parse_args()

    data = args.data
    if data is None:
        data = os.path.join(tempfile.mkdtemp(prefix="mdtrain-bench-"), "data")
        t = time.perf_counter()
        write_shards("synthetic:markov:vocab=1000", data, seq_len=args.seq_len, train_samples=args.samples,
                     valid_samples=0, samples_per_shard=1024)
        print(f"wrote {args.samples} x {args.seq_len} tokens to {data} in {time.perf_counter() - t:.1f}s")
    print(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}")
    for dp in map(int, args.dp.split(",")):
        for w in map(int, args.workers.split(",")):
            cfg = DataConfig(train=data, seq_len=args.seq_len, num_workers=w)
            tps, cps, n = measure(cfg, args.batch, 0, dp, args.seconds)
            print(f"shards dp_size {dp:3d} workers {w}  batch {args.batch}x{args.seq_len}: {tps:13,.0f} tokens/s "
                  f"{cps:13,.0f} tokens/CPU-s  ({n:,} tokens)", flush=True)
    for spec in ("synthetic:markov:vocab=32", "synthetic:hmm:vocab=32"):
        tps, cps, n = measure(DataConfig(train=spec, seq_len=args.seq_len), args.batch, 0, 1, args.seconds)
        print(f"{spec:26s} workers 0  batch {args.batch}x{args.seq_len}: {tps:13,.0f} tokens/s "
              f"{cps:13,.0f} tokens/CPU-s", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
