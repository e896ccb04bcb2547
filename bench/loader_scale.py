"""Per-rank loader cost against the data-parallel size: one process plays rank 0 of a job of dp ranks.

    python bench/loader_scale.py                          # temporary dataset; dp = 1, 8, 64, 512, 4096
    python bench/loader_scale.py --data DIR --dp 1,64     # an existing prepared directory

Per setting it prints rank 0's tokens per CPU-second (this process, the loader's background thread included;
nothing is trained) and the bytes read from files per token delivered, counted by the kernel (``rchar`` of
/proc/self/io: every byte a read syscall returned, page-cache hits included, so it is what a shared filesystem
would be asked for) and, where the loader has one, by its own reader (with its number of reads and their mean size).
The target of issue 16: both figures within 1.5x of dp = 1 at every dp.

Run it against another checkout (``PYTHONPATH=/path/to/old/checkout``) to measure that loader on the same data.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np

if "mdtrain" not in sys.modules and not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mdtrain  # noqa: E402
from mdtrain.data.config import DataConfig  # noqa: E402
from mdtrain.data.loader import build_loader  # noqa: E402
from mdtrain.data.synthetic import write_shards  # noqa: E402


def _rchar() -> int:
    with open("/proc/self/io") as fh:
        for line in fh:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def measure(data: str, seq_len: int, batch: int, dp: int, min_tokens: int, max_seconds: float, window: int) -> dict:
    cfg = DataConfig(train=data, seq_len=seq_len, num_workers=0, shuffle_window=window)
    loader = build_loader(cfg, "train", batch, 0, dp, seed=0)
    reader = getattr(loader.source, "reader", None)
    it = iter(loader)
    next(it)  # start-up (thread, first chunk) is not throughput
    r0, c0, t0 = _rchar(), _cpu(), time.perf_counter()
    b0, n0 = (reader.bytes_read, reader.reads) if reader is not None else (0, 0)
    tokens = steps = 0
    # the background thread reads up to data.prefetch chunks ahead: measure over many chunks
    while (tokens < min_tokens or steps < 8 * loader.steps_per_chunk) and time.perf_counter() - t0 < max_seconds:
        tokens += int(next(it)["attention_mask"].sum())
        steps += 1
    cpu, wall, rchar = _cpu() - c0, time.perf_counter() - t0, _rchar() - r0
    out = {"dp": dp, "steps": steps, "tokens": tokens, "tokens_per_cpu_s": tokens / max(cpu, 1e-9),
           "tokens_per_s": tokens / wall, "rchar_per_token": rchar / tokens}
    if reader is not None:
        nbytes, reads = reader.bytes_read - b0, reader.reads - n0
        out.update(reader_bytes_per_token=nbytes / tokens, reads_per_step=reads / steps,
                   mean_read=nbytes / max(reads, 1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="prepared directory (default: write a synthetic one to a temp dir)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=32768, help="train samples of the temporary dataset")
    ap.add_argument("--batch", type=int, default=32, help="rank 0's micro-batch")
    ap.add_argument("--window", type=int, default=8, help="data.shuffle_window (shards)")
    ap.add_argument("--dp", default="1,8,64,512,4096", help="DP sizes to emulate (this process is rank 0)")
    ap.add_argument("--tokens", type=float, default=20e6, help="tokens to deliver per setting (or --seconds)")
    ap.add_argument("--seconds", type=float, default=30.0, help="at most this long per setting")
    ap.add_argument("--repeat", type=int, default=3, help="runs per setting; the median is printed")
    args = ap.parse_args()

    data = args.data
    if data is None:
        data = os.path.join(tempfile.mkdtemp(prefix="mdtrain-bench-"), "data")
        t = time.perf_counter()
        write_shards("synthetic:markov:vocab=1000", data, seq_len=args.seq_len, train_samples=args.samples,
                     valid_samples=0, samples_per_shard=1024)
        print(f"wrote {args.samples} x {args.seq_len} tokens to {data} in {time.perf_counter() - t:.1f}s")
    print(f"mdtrain from {os.path.dirname(mdtrain.__file__)}")
    print(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, numpy {np.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}; batch {args.batch} x {args.seq_len}, shuffle_window {args.window}")
    base = None
    for dp in map(int, args.dp.split(",")):
        runs = [measure(data, args.seq_len, args.batch, dp, int(args.tokens), args.seconds, args.window)
                for _ in range(args.repeat)]
        r = sorted(runs, key=lambda x: x["tokens_per_cpu_s"])[len(runs) // 2]
        base = base or r
        rel = r["tokens_per_cpu_s"] / base["tokens_per_cpu_s"]
        line = (f"dp {dp:5d}: {r['tokens_per_cpu_s']:12,.0f} tokens/CPU-s ({rel:.2f} of dp=1)  "
                f"{r['tokens_per_s']:12,.0f} tokens/s  read {r['rchar_per_token']:.3f} B/token "
                f"({r['rchar_per_token'] / base['rchar_per_token']:.2f} of dp=1)")
        if "mean_read" in r:
            line += (f"  [reader: {r['reader_bytes_per_token']:.3f} B/token, {r['reads_per_step']:.1f} reads/step of "
                     f"{r['mean_read'] / 1024:,.1f} KiB]")
        print(line + f"  ({r['tokens']:,} tokens, {r['steps']} steps; runs: "
              + ", ".join(f"{x['tokens_per_cpu_s'] / 1e6:.1f}M" for x in runs) + ")", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
