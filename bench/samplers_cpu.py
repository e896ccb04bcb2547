"""Every sampler side by side on one small trained MDLM, on CPU: network evaluations, wall and CPU time, generative
perplexity under an AR model trained on the same data, and unigram entropy, at L = 128 and 256 and several step
counts; then ddpm vs ddpm_cache at batch 1, 16 and 64 (T = 1000).

    python bench/samplers_cpu.py                      # ~5 min to prepare and train once, then the sampling runs
    python bench/samplers_cpu.py --only cache          # just the ddpm_cache batch study

The data (Python's standard-library sources, SentencePiece BPE-2048, 256-token MDLM packing) and the two models
(a 4x128 DiT with the MDLM objective and a 4x128 causal transformer with the AR objective, 500 steps each) are
built once with `mdtrain prepare` / `mdtrain train` under --cache (default runs/bench-samplers, gitignored) and
reused. Raw rows (one JSON object per setting) go to --log; the tables are printed as Markdown and the plot
(gen-PPL vs NFE) is written next to the log. One intra-op thread, so figures are comparable on a shared machine;
CPU seconds (this process) are reported beside wall seconds.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import sysconfig
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mdtrain.evaluate import generative_perplexity, unigram_entropy  # noqa: E402
from mdtrain.inference import load_for_inference  # noqa: E402
from mdtrain.objectives.protocol import make_model_fn  # noqa: E402
from mdtrain.objectives.samplers import sample  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDLIB_DIRS = ("json", "email", "asyncio", "logging", "unittest", "http", "xml", "importlib", "concurrent",
               "collections")
TRAIN = ["data.seq_len=256", "train.steps=500", "train.global_batch_size=16", "train.micro_batch_size=16",
         "train.ema=0.0", "optim.lr=3e-3", "optim.warmup_steps=50", "checkpoint.every=500", "logging.every=100",
         "eval.batches=4", "logging.progress_bar=false", "model.name=dit", "model.flavor=debug", "model.n_layers=4",
         "model.d_model=128", "model.n_heads=4", "model.cond_dim=64", "model.dropout=0.0"]


def mdtrain(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    subprocess.run([sys.executable, "-m", "mdtrain", *args], check=True, env=env, cwd=ROOT)


def finished(run: str, steps: int) -> bool:
    return os.path.isdir(os.path.join(run, "checkpoints", f"step_{steps:08d}"))


def build(cache: str) -> tuple[str, str]:
    data, mdlm, ar = (os.path.join(cache, n) for n in ("data", "mdlm", "ar"))
    if not os.path.exists(os.path.join(data, "manifest.json")):
        stdlib = sysconfig.get_paths()["stdlib"]
        mdtrain("prepare", "--input", *[os.path.join(stdlib, d) for d in STDLIB_DIRS], "--glob", "*.py",
                "--tokenizer", "sentencepiece:train:2048", "--seq-len", "256", "--val-fraction", "0.1", "--out", data)
    for run, extra in ((mdlm, ["objective.name=mdlm"]), (ar, ["objective.name=ar", "model.name=causal"])):
        if not finished(run, 500):
            mdtrain("train", "configs/quickstart.yaml", f"data.train={data}", f"train.run_dir={run}", *TRAIN, *extra)
    return mdlm, ar


def score(scorer, bundle, seqs) -> tuple[float, float]:
    """(gen-PPL under the AR scorer, unigram entropy) exactly as `mdtrain eval eval.gen_ppl_model=...` reports them."""
    texts = [bundle.tokenizer.decode(s) for s in seqs]
    return generative_perplexity(texts, scorer)["gen_ppl"], unigram_entropy(seqs)


def run_one(bundle, scorer, L, sampler, steps, batch, opts, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model_fn = make_model_fn(bundle.model)
    w0, c0 = time.perf_counter(), time.process_time()
    x, info = sample(bundle.objective, model_fn, batch, L, steps, gen, sampler=sampler, **opts)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    seqs = x.tolist()
    row = {"L": L, "sampler": sampler, "steps": steps, "batch": batch, "opts": opts, "nfe": int(info["nfe"]),
           "nfe_per_seq": float(info["nfe_per_sample"].double().mean()), "wall_s": round(wall, 3),
           "cpu_s": round(cpu, 3)}
    if scorer is not None:
        ppl, ent = score(scorer, bundle, seqs)
        row["gen_ppl"], row["entropy"] = round(ppl, 2), round(ent, 3)
    return row


def grid(L: int):
    """(sampler, steps, options) settings at model length L."""
    out = [("ddpm", 32, {}), ("ddpm", 128, {}), ("ddpm_cache", 128, {}), ("ddpm_cache", 1000, {}),
           ("analytic", 128, {})]
    out += [("first_hitting", 0, {"tokens_per_call": k}) for k in (1, 4, 16)]
    out += [("remdm", 256, {"remdm_schedule": s}) for s in ("cap", "rescale", "loop")]
    out += [("llada", T, {"block_length": 32}) for T in (16, 64, L)]
    out += [("fast_dllm", 0, {"block_length": 32, "threshold": t}) for t in (0.9, 0.5, 0.2, 0.05)]
    out += [("llada", 64, {"block_length": 32, "prefix_cache": True}),
            ("fast_dllm", 0, {"block_length": 32, "threshold": 0.2, "prefix_cache": True})]
    return out


def label(r) -> str:
    o = ", ".join(f"{k.replace('remdm_', '')}={v}" for k, v in r["opts"].items())
    return f"{r['sampler']}" + (f" ({o})" if o else "")


def table(rows, keys):
    head = "| " + " | ".join(k for k, _ in keys) + " |\n|" + "---|" * len(keys) + "\n"
    return head + "".join("| " + " | ".join(str(f(r)) for _, f in keys) + " |\n" for r in rows)


def plot(rows, refs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=False)
    for ax, L in zip(axes, (128, 256)):
        by = {}
        for r in rows:
            if r["L"] == L and "gen_ppl" in r:
                key = r["sampler"] + (" + prefix cache" if r["opts"].get("prefix_cache") else "") + (
                    f" {r['opts']['remdm_schedule']}" if r["sampler"] == "remdm" else "")
                by.setdefault(key, []).append(r)
        for name, rs in sorted(by.items()):
            rs = sorted(rs, key=lambda r: r["nfe_per_seq"])
            ax.plot([r["nfe_per_seq"] for r in rs], [r["gen_ppl"] for r in rs], "o-", label=name)
        for name, v in refs.get(L, {}).items():
            ax.axhline(v, ls="--", lw=1, color="gray" if name == "data" else "black")
            ax.text(1.05, v, name, fontsize=8, va="bottom")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("network evaluations per sequence")
        ax.set_ylabel("gen-PPL (AR scorer)")
        ax.set_title(f"L = {L}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default=os.path.join(ROOT, "runs", "bench-samplers"))
    ap.add_argument("--log", default=os.path.join(ROOT, "bench", "results", time.strftime("samplers_cpu_%Y-%m-%d.log")))
    ap.add_argument("--only", choices=("samplers", "cache"), default=None)
    ap.add_argument("--samples", type=int, default=16)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    mdlm_dir, ar_dir = build(args.cache)
    mdlm, ar = load_for_inference(mdlm_dir), load_for_inference(ar_dir)
    scorer = ar
    os.makedirs(os.path.dirname(os.path.abspath(args.log)), exist_ok=True)
    log = open(args.log, "a")

    def emit(row):
        log.write(json.dumps(row) + "\n")
        log.flush()
        print(json.dumps(row), flush=True)

    emit({"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
          "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
          "date": time.strftime("%Y-%m-%d %H:%M"), "samples": args.samples, "mdlm": mdlm_dir, "ar": ar_dir})
    rows, refs = [], {}
    if args.only in (None, "samplers"):
        for L in (128, 256):
            # references: real validation text and the AR model's own samples, scored by the same AR model
            val = _validation(mdlm, args.samples, L)
            ppl, ent = score(scorer, mdlm, val)
            refs[L] = {"data": ppl}
            emit({"L": L, "reference": "data", "gen_ppl": round(ppl, 2), "entropy": round(ent, 3)})
            r = run_one(ar, scorer, L, "ar", 0, args.samples, {"bos_id": ar.tokenizer.bos_id})
            refs[L]["ar"] = r["gen_ppl"]
            emit({**r, "reference": "ar"})
            for sampler, steps, opts in grid(L):
                r = run_one(mdlm, scorer, L, sampler, steps, args.samples, opts)
                rows.append(r)
                emit(r)
        keys = [("L", lambda r: r["L"]), ("sampler", label), ("steps", lambda r: r["steps"] or "–"),
                ("NFE/seq", lambda r: f"{r['nfe_per_seq']:.0f}"), ("wall s", lambda r: f"{r['wall_s']:.1f}"),
                ("CPU s", lambda r: f"{r['cpu_s']:.1f}"), ("gen-PPL", lambda r: f"{r['gen_ppl']:.1f}"),
                ("entropy", lambda r: f"{r['entropy']:.2f}")]
        print("\n" + table(rows, keys))
        print("references:", json.dumps({L: {k: round(v, 1) for k, v in d.items()} for L, d in refs.items()}))
        plot(rows, refs, os.path.splitext(args.log)[0] + ".png")
    if args.only in (None, "cache"):
        cache_rows = []
        for batch in (1, 16, 64):
            for sampler in ("ddpm", "ddpm_cache"):
                r = run_one(mdlm, None, 128, sampler, 1000, batch, {})
                cache_rows.append(r)
                emit(r)
        keys = [("batch", lambda r: r["batch"]), ("sampler", lambda r: r["sampler"]),
                ("calls", lambda r: r["nfe"]), ("evaluations/seq", lambda r: f"{r['nfe_per_seq']:.0f}"),
                ("wall s", lambda r: f"{r['wall_s']:.1f}"), ("CPU s", lambda r: f"{r['cpu_s']:.1f}")]
        print("\n" + table(cache_rows, keys))
    return 0


def _validation(bundle, n, L):
    """n validation chunks of L tokens (the start of each packed sample), for the reference gen-PPL."""
    from mdtrain.data.config import DataConfig
    from mdtrain.data.loader import build_loader

    cfg = DataConfig(train=bundle.cfg.data.train, seq_len=bundle.cfg.data.seq_len)
    it = iter(build_loader(cfg, "valid", n, 0, 1, seed=0))
    return next(it)["input_ids"][:, :L].tolist()


if __name__ == "__main__":
    sys.exit(main())
