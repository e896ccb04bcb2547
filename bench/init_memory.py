"""Peak RSS per rank while building a >= 1B-parameter model for training, at world size 1 and 4 (gloo, CPU).

Each rank: import everything and join the process group (its baseline RSS), then build the trainer's way -- the
backbone on the meta device, tensor parallelism applied there, and the engine allocating and filling only its own
pieces (``mdtrain/parallel/meta_init.py``) -- and report its peak RSS (``ru_maxrss``). ``eager`` is the previous way
(the whole fp32 model built on every rank, then sharded) at world size 1: what every rank of any world size paid.

Layouts: FSDP2 (dp = world), ZeRO-3 partitioning (``materialize_zero3``: the step before ``deepspeed.initialize``,
whose optimizer then adds its fp32 master and gradient partitions, 8 more bytes per parameter / dp), and FSDP2 x TP
(dp=2 x tp=2). The default shape is the 1.3B one (24 x 2048, 16 heads; 1,452.8M parameters at V = 50258).

    python bench/init_memory.py [--layers 24 --d-model 2048 --heads 16] | tee bench/results/init_memory_DATE.log
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

VOCAB, SEQ = 50258, 1024


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cfg(args, engine):
    from mdtrain.config import load_config
    return load_config(None, ["model.flavor=medium", f"model.n_layers={args.layers}", f"model.d_model={args.d_model}",
                              f"model.n_heads={args.heads}", f"parallel.engine={engine}", "parallel.zero_stage=3"])


def _rank(rank, world, args, layout):
    import torch
    import deepspeed  # noqa: F401 - imported by every layout, so baselines compare
    import megatron.core  # noqa: F401

    from mdtrain.modeling import build_deferred, build_objective_and_model
    from mdtrain.parallel.dist import _context_from_group
    from mdtrain.parallel.engines.torch_native import FSDPEngine
    from mdtrain.parallel.meta_init import materialize_zero3

    tp = 2 if layout == "fsdp_tp2" else 1
    ctx = _context_from_group(torch.device("cpu"), tp, rank, "env", owns=False)
    cfg = _cfg(args, "fsdp")
    base = _rss_mb()
    t0 = time.perf_counter()
    if layout == "eager":  # the old way: the whole model on every rank, then FSDP2 shards it
        model, _ = build_objective_and_model(cfg, VOCAB, VOCAB - 1, SEQ, init_seed=1)
        engine = FSDPEngine(cfg.parallel, model, lambda m: torch.optim.AdamW(m.parameters()), ctx, "fp32")
    else:
        model, objective, init = build_deferred(cfg, VOCAB, VOCAB - 1, SEQ, init_seed=1)
        if tp > 1:
            from mdtrain.parallel.tensor_parallel import apply_tensor_parallel
            model = apply_tensor_parallel(model, ctx, objective)
        if layout == "zero3":
            from mdtrain.parallel.engines.zero import deepspeed_config, import_deepspeed
            import_deepspeed(ctx.device).init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
            pcfg = _cfg(args, "deepspeed").parallel
            ds_cfg = deepspeed_config(pcfg, "fp32", 1, 1, ctx.dp_size, ctx.device)
            materialize_zero3(model, init, ctx.device, torch.float32, ds_cfg)
            kept = sum(p.ds_tensor.numel() for p in model.parameters())
        else:
            engine = FSDPEngine(cfg.parallel, model, lambda m: torch.optim.AdamW(m.parameters()), ctx, "fp32",
                                init=init)
    if layout != "zero3":
        kept = sum(p.to_local().numel() for p in engine.module.parameters())
    seconds = time.perf_counter() - t0
    return {"rank": rank, "baseline_mb": round(base, 1), "peak_mb": round(_peak_mb(), 1),
            "kept_params": int(kept), "seconds": round(seconds, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--runs", default="eager:1,fsdp:1,fsdp:4,zero3:1,zero3:4,fsdp_tp2:4")
    args = ap.parse_args()

    from mdtrain.models import count_params
    from mdtrain.testing import run_distributed
    n = count_params(_cfg(args, "fsdp").model, VOCAB)["total"]
    print(f"# model: {args.layers} x {args.d_model}, {args.heads} heads, V={VOCAB}: {n / 1e6:,.1f}M parameters "
          f"({4 * n / 2 ** 20:,.0f} MiB in fp32)", flush=True)
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    results = []
    for spec in args.runs.split(","):
        layout, world = spec.split(":")
        ranks = run_distributed(_rank, int(world), args, layout, timeout=3600)
        for r in ranks:
            r.update(layout=layout, world=int(world), model_params=n)
            results.append(r)
            print(json.dumps(r), flush=True)
    print("\n| layout | world | rank | baseline MiB | peak MiB | peak - baseline MiB | params kept | build s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['layout']} | {r['world']} | {r['rank']} | {r['baseline_mb']:,.0f} | {r['peak_mb']:,.0f} | "
              f"{r['peak_mb'] - r['baseline_mb']:,.0f} | {r['kept_params'] / 1e6:,.1f}M | {r['seconds']} |")


if __name__ == "__main__":
    main()
