"""Start-up cost of resuming from a large checkpoint: the time from `mdtrain train` to its first training step,
resuming a >= 2 GB checkpoint, against the same command without a checkpoint and against reading the checkpoint's
files once (so the cost of loading is counted in reads of the checkpoint).

    python bench/checkpoint_startup.py [--dir /tmp/mdtrain-startup] [--layers 10] [--width 1024] [--repeats 2]
        [--old-code /path/to/an/older/mdtrain/checkout]

It trains one step of a wide debug DiT (fp32 weights, AdamW moments and EMA: ~16 bytes per parameter on disk) to
write the checkpoint, then times, with the page cache of the checkpoint's files dropped first ("cold", when the
kernel honours posix_fadvise DONTNEED) and warm:
  read once        every file of the checkpoint read sequentially in 4 MiB blocks
  fresh start      `mdtrain train` in an empty run dir, to its first step (imports, model, engine)
  resume           the same command resuming the checkpoint, checkpoint.verify=size (the default) and sha256
  resume (old)     with --old-code: the same with that checkout on PYTHONPATH (before this change rank 0 hashed
                   every file before loading it)
Each run is killed once its first step is printed (nothing is saved). The data is deleted at the end.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time

BLOCK = 4 << 20


def files_of(root: str) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)


def drop_cache(root: str) -> None:
    for path in files_of(root):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_once(root: str) -> float:
    t0 = time.perf_counter()
    buf = bytearray(BLOCK)
    for path in files_of(root):
        with open(path, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - t0


def first_step(argv: list[str], env: dict, cwd: str) -> float:
    """Seconds from starting ``argv`` (in ``cwd``: no checkout shadows the one on PYTHONPATH) to its first 'step:'
    line; the process is then killed."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                         start_new_session=True, cwd=cwd)
    lines = []
    try:
        for line in p.stdout:
            lines.append(line)
            if line.startswith("step:"):
                return time.perf_counter() - t0
        raise RuntimeError(f"{argv} ended without a step:\n{''.join(lines[-30:])}")
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/mdtrain-startup")
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--old-code", default="", help="a checkout of mdtrain to compare with (put on PYTHONPATH)")
    args = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1",
               PYTHONDONTWRITEBYTECODE="1")
    common = ["model.flavor=debug", f"model.n_layers={args.layers}", f"model.d_model={args.width}",
              f"model.n_heads={max(1, args.width // 64)}", "data.train=synthetic:markov", "data.seq_len=32",
              "train.global_batch_size=2", "train.micro_batch_size=2", "train.ema=0.999", "logging.every=1",
              "logging.progress_bar=false", "checkpoint.every=0", "eval.batches=1", "eval.batch_size=2"]
    mdtrain = [sys.executable, "-m", "mdtrain", "train", *common]
    run = os.path.join(args.dir, "run")
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    try:
        t0 = time.perf_counter()
        subprocess.run(mdtrain + [f"train.run_dir={run}", "train.steps=1"], check=True, env=env,
                       stdout=subprocess.DEVNULL, cwd=args.dir)
        ckpt = os.path.join(run, "checkpoints", "step_00000001")
        size = sum(os.path.getsize(f) for f in files_of(ckpt))
        print(f"# {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}; "
              f"checkpoint {ckpt}: {size / 2**30:.2f} GiB in {len(files_of(ckpt))} files, written by a 1-step run "
              f"in {time.perf_counter() - t0:.1f} s", flush=True)
        cases = [("fresh start", mdtrain + [f"train.run_dir={args.dir}/fresh", "train.steps=2"], env),
                 ("resume, verify=size", mdtrain + [f"train.run_dir={run}", "train.steps=2"], env),
                 ("resume, verify=sha256", mdtrain + [f"train.run_dir={run}", "train.steps=2",
                                                      "checkpoint.verify=sha256"], env)]
        if args.old_code:
            old_env = dict(env, PYTHONPATH=os.path.abspath(args.old_code))
            cases.append(("resume, old code", mdtrain + [f"train.run_dir={run}", "train.steps=2"], old_env))
        print(f"{'what':<24} {'cache':<5} {'seconds':>8}  (median of {args.repeats})", flush=True)
        for cache in ("cold", "warm"):
            times = []
            for _ in range(args.repeats):
                if cache == "cold":
                    drop_cache(ckpt)
                times.append(read_once(ckpt))
            once = statistics.median(times)
            print(f"{'read once':<24} {cache:<5} {once:8.2f}  ({size / once / 2**20:.0f} MiB/s)", flush=True)
            for name, argv, e in cases:
                times = []
                for _ in range(args.repeats):
                    shutil.rmtree(f"{args.dir}/fresh", ignore_errors=True)
                    if cache == "cold":
                        drop_cache(ckpt)
                    else:
                        read_once(ckpt)
                    times.append(first_step(argv, e, args.dir))
                print(f"{name:<24} {cache:<5} {statistics.median(times):8.2f}  {['%.2f' % t for t in times]}",
                      flush=True)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
