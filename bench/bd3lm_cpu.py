"""BD3-LM against AR and MDLM on CPU: validation NELBO after the same training steps on the same data, and
block-by-block sampling wall time per token with and without the KV cache.

    python bench/bd3lm_cpu.py                        # ~10 min on 2 idle cores; a table, one JSON line per run
    python bench/bd3lm_cpu.py --steps 50 --quick     # a smoke run

Data: the synthetic unifilar HMM source (``synthetic:hmm``), whose exact entropy is the floor of every NLL; AR and
BD3-LM score tokens 2..L (the first is context), MDLM all L, so each row shows the entropy of what it scores. The
network is the same DiT (``--layers`` x ``--width``, 2 x 64 by default, fp32) for the diffusion objectives and its
causal twin for AR; one seed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mdtrain.config import load_config  # noqa: E402
from mdtrain.data.synthetic import entropy_per_token  # noqa: E402

SOURCE = "synthetic:hmm:valid_samples=256"
RUNS = {
    "ar": ["objective.name=ar", "model.name=causal"],
    "mdlm": ["objective.name=mdlm"],
    "bd3lm_b4": ["objective.name=bd3lm", "objective.block_size=4"],
    "bd3lm_b16": ["objective.name=bd3lm", "objective.block_size=16"],
}


def common(args, run_dir):
    return ["model.flavor=debug", f"model.n_layers={args.layers}", f"model.d_model={args.width}", "model.n_heads=4",
            "model.dropout=0.0",
            f"data.train={SOURCE}", f"data.seq_len={args.seq_len}", f"train.steps={args.steps}",
            f"train.global_batch_size={args.batch}", f"train.micro_batch_size={args.batch}", "optim.lr=1e-3",
            "optim.warmup_steps=50", "train.ema=0", "logging.every=50", "logging.progress_bar=false",
            "checkpoint.every=0", "eval.batches=0", "eval.batch_size=64", f"eval.mc_samples={args.mc}",
            f"train.run_dir={run_dir}"]


def train(args, name, root):
    from mdtrain.trainer import Trainer
    run_dir = os.path.join(root, name)
    t0 = time.perf_counter()
    trainer = Trainer(load_config(None, common(args, run_dir) + RUNS[name]))
    try:
        trainer.fit()
    finally:
        trainer.close()
    seconds = time.perf_counter() - t0
    rows = [json.loads(ln) for ln in open(os.path.join(run_dir, "metrics.jsonl"))]
    ev = [r for r in rows if r.get("split") == "valid"][-1]
    return run_dir, {"run": name, "steps": args.steps, "valid_nll": ev["nll"], "tokens_scored": ev["tokens"],
                     "bound": ev.get("bound"), "train_seconds": round(seconds, 1)}


@torch.no_grad()
def sampling_speed(run_dir, lengths, steps, batch, seed=0):
    """Seconds per generated token of block-by-block sampling, with and without the KV cache (same samples)."""
    from mdtrain.inference import load_for_inference
    from mdtrain.objectives.protocol import make_model_fn
    from mdtrain.objectives.samplers import sample

    bundle = load_for_inference(run_dir)
    model, obj, L = bundle.model, bundle.objective, bundle.cfg.data.seq_len
    cached = make_model_fn(model)

    def uncached(x, cond=None, attention_mask=None, **kw):  # the same network without a cache factory
        return model(x, cond, attention_mask, **kw)
    out = []
    for n in lengths:
        extra = n - L
        opts = dict(stride_length=extra, num_strides=1) if extra > 0 else {}
        toks = {}
        for label, fn in (("kv_cache", cached), ("no_cache", uncached)):
            gen = torch.Generator().manual_seed(seed)
            t0, c0 = time.perf_counter(), time.process_time()
            tok, info = sample(obj, fn, batch, L, steps, gen, sampler="ddpm_cache", bos_id=bundle.tokenizer.bos_id,
                               **opts)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            toks[label] = tok
            per = batch * (n - 1)  # generated tokens (the first is the given context token)
            out.append({"tokens": n, "mode": label, "seconds": round(dt, 3), "cpu_seconds": round(dc, 3),
                        "nfe": info["nfe"], "ms_per_token": round(1000 * dt / per, 3),
                        "cpu_ms_per_token": round(1000 * dc / per, 3)})
        out[-1]["same_samples"] = bool(torch.equal(toks["kv_cache"], toks["no_cache"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--mc", type=int, default=2, help="Monte Carlo draws of t per validation sequence (diffusion)")
    ap.add_argument("--sample-steps", type=int, default=16, help="denoising steps per block")
    ap.add_argument("--quick", action="store_true", help="only bd3lm_b4 and mdlm, short sampling")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {platform.processor() or platform.machine()}  "
          f"threads={torch.get_num_threads()}  torch {torch.__version__}  python {platform.python_version()}")
    print(f"# args: {vars(args)}  source: {SOURCE}")
    h_all = entropy_per_token(SOURCE, args.seq_len) * args.seq_len
    h_first = entropy_per_token(SOURCE, 1)
    floor = {"all": h_all / args.seq_len, "after_first": (h_all - h_first) / (args.seq_len - 1)}
    print(json.dumps({"entropy_per_token_all": floor["all"], "entropy_per_token_after_first": floor["after_first"]}))
    root = tempfile.mkdtemp(prefix="bd3lm_bench_")
    names = ["mdlm", "bd3lm_b4"] if args.quick else list(RUNS)
    results, dirs = [], {}
    for name in names:
        dirs[name], r = train(args, name, root)
        r["entropy_floor"] = floor["all"] if name == "mdlm" else floor["after_first"]
        results.append(r)
        print(json.dumps(r), flush=True)
    speed = sampling_speed(dirs["bd3lm_b4"], [args.seq_len, 4 * args.seq_len] if not args.quick else [args.seq_len],
                           args.sample_steps, batch=4)
    for s in speed:
        print(json.dumps(s), flush=True)
    shutil.rmtree(root, ignore_errors=True)
    print("\n| run | valid NELBO / NLL (nats/token) | entropy floor | tokens scored | train s |")
    print("|---|---|---|---|---|")
    for r in results:
        kind = "NLL (exact)" if r["bound"] == "exact" else "NELBO (upper bound)"
        print(f"| {r['run']} | {r['valid_nll']:.4f} {kind} | {r['entropy_floor']:.4f} | {int(r['tokens_scored'])} "
              f"| {r['train_seconds']} |")
    print("\n| sequence length | mode | wall s | CPU s | NFE | wall ms / token | CPU ms / token |")
    print("|---|---|---|---|---|---|---|")
    for s in speed:
        print(f"| {s['tokens']} | {s['mode']} | {s['seconds']} | {s['cpu_seconds']} | {s['nfe']} | "
              f"{s['ms_per_token']} | {s['cpu_ms_per_token']} |")


if __name__ == "__main__":
    main()
