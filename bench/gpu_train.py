"""Issue 25 in one prepared run: every CUDA training path checked against an fp32/float64 reference, then DiT-small
MDLM and AR training throughput in bf16 (tokens/s, MFU over the bf16 matmul peak measured in the same run, peak
memory; eager and compiled; micro-batch 32 and 64 x 1024), and the GPU-only tests that skip on CPU.

    python3 bench/gpu_train.py [--out DIR] [--budget 360] [--skip SECTION,...] [--toy] [--device cpu]

Sections, in the order they run (most valuable first; each has its own budget and can be skipped):
  env                  device, driver, versions; the bf16 matmul peak (8192^3) and the device copy bandwidth
  correctness          bf16 autocast vs fp32 training loss (same init and data), SDPA flash / efficient / cudnn /
                       math vs a float64 softmax (outputs and gradients), pinned asynchronous input copies vs the
                       host data and an unpinned loader, the objective's extra full-vocabulary fp32 buffers, and a
                       3 + 3-step resume (dropout on, no SIGKILL) vs 6 uninterrupted steps, bit for bit, with the
                       CUDA RNG state restored
  throughput_eager     MDLM (DiT-small) and AR (causal, same size), L = 1024, V = 50258, bf16, through the real
                       Trainer.train_step: micro-batch 32, and whether 64 x 1024 fits
  gpu_tests            the tests that skip without CUDA (tests/ files that ask torch.cuda.is_available()), by name
  throughput_compiled  train.compile=true (torch.compile per block), then levers: fused AdamW, a bare step (batch,
                       noise staged on the device, no EMA), micro-batch 64
  compile_check        torch.compile per block vs eager in fp32: loss and every gradient, same weights and inputs

The data is ``synthetic:hmm:vocab=50254`` (50258 classes with the specials, GPT-2's size with a mask token), so
nothing is read from disk. ``--toy`` shrinks every shape (debug flavor, L = 16-32): the CPU rehearsal that runs
every code path the GPU run takes, with the CUDA-only calls reported "skipped (no CUDA)". The tables are printed as
each section ends and all together at the end; ``--out`` (default $OUT) gets gpu_train.log / .json / .md.
"""
from __future__ import annotations

import argparse
import copy
import glob
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_common import (CUDA, ENV_ROWS, NO_CUDA, REPO, Bench, common_args, environment_rows,  # noqa: E402
                        free_memory, load_mamba_triton, measure_ceilings, median, randomize_zero_params, rel_err,
                        sync, verdict)

import torch  # noqa: E402

TARGET_TPS = 450_000
HMM_BIG = "synthetic:hmm:vocab=50254"  # + 4 specials = 50258 classes


class Sizes:
    def __init__(self, toy: bool):
        self.toy = toy
        self.flavor = "debug" if toy else "small"
        self.seq = 32 if toy else 1024
        self.data = "synthetic:hmm:vocab=60" if toy else HMM_BIG
        self.micro, self.big_micro = (4, 8) if toy else (32, 64)
        self.warmup, self.steps = (1, 3) if toy else (3, 10)
        self.check_seq, self.check_micro, self.check_steps = (16, 2, 3) if toy else (256, 8, 5)
        self.resume_model = ["model.flavor=debug"] if toy else ["model.flavor=tiny", "model.n_layers=4"]
        self.resume_data = "synthetic:hmm:vocab=60" if toy else "synthetic:hmm:vocab=1000"
        self.attn = (2, 2, 32, 16) if toy else (4, 12, 1024, 64)       # B, H, L, head dim
        self.obj = (2, 16, 64) if toy else (16, 1024, 50258)           # B, L, V of the logits-buffer check
        self.compile_model = (["model.flavor=debug"] if toy else
                              ["model.flavor=small", "model.d_model=256", "model.n_heads=4", "model.n_layers=2"])
        self.compile_shape = (2, 16) if toy else (4, 256)
        self.workers = 0 if toy else 2


def train_cfg(base: str, run_dir: str, device: str, overrides: list[str]):
    from mdtrain.config import load_config
    common = ["logging.wandb=false", "logging.progress_bar=false", "logging.every=1000000", "eval.every=0",
              "checkpoint.every=0", "train.steps=1000000", f"train.run_dir={run_dir}", f"train.device={device}"]
    return load_config(os.path.join(REPO, "configs", base), common + overrides)


def close_trainer(tr) -> None:
    try:
        tr.data_iter.close()  # the loader's prefetch thread / DataLoader workers end here
    except Exception:
        pass
    tr.close()


# ============================================================================================ correctness


def check_bf16_vs_fp32(b: Bench, t, z: Sizes, tmp: str) -> None:
    from mdtrain.trainer import Trainer
    key = "bf16 autocast loss vs fp32"
    losses = {}
    for prec in ("fp32", "bf16"):
        cfg = train_cfg("owt_mdlm_small.yaml", os.path.join(tmp, f"prec_{prec}"), b.device.type,
                        [f"model.flavor={z.flavor}", "model.dropout=0.0", f"data.train={z.data}",
                         f"data.seq_len={z.check_seq}", f"train.micro_batch_size={z.check_micro}",
                         f"train.global_batch_size={z.check_micro}", f"train.precision={prec}",
                         "optim.warmup_steps=0", "train.ema=0", "data.num_workers=0"])
        tr = Trainer(cfg)
        try:
            # the same random values for the zero-initialised adaLN and head in both runs: logits that are not all
            # zero from step 1, so the first step already compares the two precisions' forward passes
            randomize_zero_params(tr.engine.module, std=0.02, seed=11)
            losses[prec] = [tr.train_step()["loss"] for _ in range(z.check_steps)]
        finally:
            close_trainer(tr)
    gaps = [abs(a - r) / abs(r) for a, r in zip(losses["bf16"], losses["fp32"])]
    note = "" if b.device.type == "cuda" else " (CPU autocast)"
    t.set(key, reference=f"fp32 (TF32 off), same init (adaLN/head N(0, 0.02)) and batches, {z.check_steps} steps, "
                         f"{z.flavor} L={z.check_seq}{note}",
          value=f"max {max(gaps):.2e} (step 1 {gaps[0]:.2e}, last {gaps[-1]:.2e}; fp32 loss {losses['fp32'][-1]:.4f})",
          bound="2e-2", verdict=verdict(max(gaps), 2e-2))


def _attention_f64(q, k, v, causal):
    """softmax(q k^T / sqrt(d)) v in float64 on (B, L, H, d), written out (no SDPA)."""
    q, k, v = (x.double().transpose(1, 2) for x in (q, k, v))
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        lq, lk = s.shape[-2:]
        s = s.masked_fill(torch.ones(lq, lk, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)


def check_sdpa(b: Bench, t, z: Sizes) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from mdtrain.models.attention import attention
    B, H, L, D = z.attn
    g = torch.Generator(device=b.device).manual_seed(1)
    backends = [("flash", "FLASH_ATTENTION", False), ("efficient", "EFFICIENT_ATTENTION", True),
                ("cudnn", "CUDNN_ATTENTION", True), ("math", "MATH", False)]
    results = {name: [] for name, _, _ in backends}
    for causal in (False, True):
        q, k, v = (torch.randn(B, L, H, D, device=b.device, generator=g, dtype=torch.bfloat16) for _ in range(3))
        gout = torch.randn(B, L, H, D, device=b.device, generator=g, dtype=torch.bfloat16)
        q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
        ref = _attention_f64(q64, k64, v64, causal)
        ref.backward(gout.double())
        for name, attr, cuda_only in backends:
            if cuda_only and b.device.type != "cuda":
                results[name].append(None)
                continue
            backend = getattr(SDPBackend, attr, None)
            if backend is None:
                results[name].append("not in this torch")
                continue
            qq, kk, vv = (x.detach().clone().requires_grad_() for x in (q, k, v))
            try:
                with sdpa_kernel([backend]):
                    out = attention(qq, kk, vv, causal=causal, backend="sdpa")
                    out.backward(gout)
            except RuntimeError as e:
                results[name].append(f"not available ({str(e).splitlines()[0][:60]})")
                continue
            err_out = rel_err(out, ref)
            err_grad = max(rel_err(x.grad, r.grad) for x, r in ((qq, q64), (kk, k64), (vv, v64)))
            results[name].append((err_out, err_grad))
    for name, _, _ in backends:
        key = f"SDPA {name} vs float64 softmax"
        res = results[name]
        if all(r is None for r in res):
            t.close(key, NO_CUDA)
            continue
        if any(isinstance(r, str) for r in res):
            t.set(key, reference="float64 softmax(qk^T/sqrt d)v + autograd",
                  value=next(r for r in res if isinstance(r, str)), bound="", verdict="n/a")
            continue
        worst = max(max(r) for r in res)
        t.set(key, reference=f"float64 softmax(qk^T/sqrt d)v + autograd; bf16 B={B} H={H} L={L} d={D}, via "
                             "mdtrain.models.attention",
              value=f"bidir out {res[0][0]:.1e} grad {res[0][1]:.1e}; causal out {res[1][0]:.1e} grad {res[1][1]:.1e}",
              bound="1e-2", verdict=verdict(worst, 1e-2))


def check_pinned(b: Bench, t, z: Sizes) -> None:
    from mdtrain.config import load_config
    from mdtrain.data.loader import build_loader
    key = "pinned asynchronous input copies"
    batches = 8
    loaders = {}
    for pin in (True, False):
        cfg = load_config(None, [f"data.train={z.data}", f"data.seq_len={z.seq}", f"data.pin_memory={pin}"])
        loaders[pin] = build_loader(cfg.data, "train", z.micro, 0, 1, seed=1, infinite=True)
    it_p, it_u = iter(loaders[True]), iter(loaders[False])
    held, pinned = [], []
    try:
        for _ in range(batches):
            bp, bu = next(it_p), next(it_u)
            for name in ("input_ids", "attention_mask"):
                pinned.append(bp[name].is_pinned() if CUDA else None)
                host = bp[name].clone()  # pageable snapshot taken before the copy is issued
                dev = bp[name].to(b.device, non_blocking=True)
                held.append((dev, host, bu[name]))
        sync(b.device)
        same = all(torch.equal(d.cpu(), h) and torch.equal(h, u) for d, h, u in held)
    finally:
        it_p.close()
        it_u.close()
    pin_txt = "pinned: yes" if all(pinned) and CUDA else ("pinned: NO" if CUDA else "pinned: n/a (no CUDA)")
    t.set(key, reference=f"a pageable snapshot of each batch and an unpinned loader's batch ({batches} steps, "
                         f"{z.micro}x{z.seq}, copies left in flight while the loader runs ahead)",
          value=f"{pin_txt}; device copies equal: {'yes' if same else 'NO'}", bound="equal, pinned",
          verdict="ok" if same and (all(pinned) or not CUDA) else "FAIL")


def check_logits_buffers(b: Bench, t, z: Sizes) -> None:
    from mdtrain.config import load_config
    from mdtrain.objectives import build_objective
    key = "objective: extra fp32 (B,L,V) buffers in loss+backward"
    B, L, V = z.obj
    out = []
    for name in ("mdlm", "ar"):
        cfg = load_config(os.path.join(REPO, "configs", "owt_ar_small.yaml" if name == "ar" else
                                       "owt_mdlm_small.yaml"))
        obj = build_objective(cfg.objective, V, V - 1)
        g = torch.Generator(device=b.device).manual_seed(2)
        logits = torch.randn(B, L, V, device=b.device, generator=g).requires_grad_()
        x0 = torch.randint(0, V - 1, (B, L), device=b.device, generator=g)
        model_fn = lambda x, cond=None, attention_mask=None: logits[:, :x.shape[1]]  # noqa: E731 (ar: L-1)
        sync(b.device)
        if CUDA and b.device.type == "cuda":
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        loss, _ = obj.loss(model_fn, x0)
        loss.backward()
        sync(b.device)
        if CUDA and b.device.type == "cuda":
            out.append((name, (torch.cuda.max_memory_allocated() - base) / logits.numel() / 4))
        del logits, loss
    if not out:
        t.close(key, NO_CUDA + " (the same loss + backward ran on CPU)")
        return
    worst = max(v for _, v in out)
    t.set(key, reference=f"peak CUDA allocation over the held logits, in units of one fp32 {B}x{L}x{V} tensor "
                         "(the logits' own gradient is 1)",
          value="; ".join(f"{n} {v:.2f}" for n, v in out), bound="<= 1.5", verdict=verdict(worst, 1.5))


def check_resume(b: Bench, t, z: Sizes, tmp: str) -> None:
    """6 steps straight (twice: the control) vs 3 steps, save, a new Trainer that resumes, 3 more steps; with
    train.deterministic=true, or without it when the deterministic mode refuses an op on this device (said so)."""
    from mdtrain.trainer import Trainer
    keys = ("resume 3+3 vs 6 steps, bit for bit", "CUDA RNG state restored on resume")

    def cfg(name, det):
        return train_cfg("owt_mdlm_small.yaml", os.path.join(tmp, name), b.device.type,
                         z.resume_model + ["model.dropout=0.1", f"data.train={z.resume_data}",
                                           f"data.seq_len={z.check_seq}", f"train.micro_batch_size={z.check_micro}",
                                           f"train.global_batch_size={2 * z.check_micro}",
                                           f"train.deterministic={str(det).lower()}", "optim.warmup_steps=2",
                                           "train.ema=0.999", "data.num_workers=0"])

    def rng_state():
        return torch.cuda.get_rng_state(b.device) if b.device.type == "cuda" else torch.get_rng_state()

    def weights(tr):
        sd = {k: v.detach().cpu().clone() for k, v in tr.engine.module.state_dict().items()}
        sd.update({f"ema.{k}": v.cpu().clone() for k, v in tr.engine._ema.shadow.items()})
        return sd

    def steps(tr, n):
        return [(o["loss"], o["grad_norm"]) for o in (tr.train_step() for _ in range(n))]

    def attempt(det: bool, tag: str) -> dict:
        res = {}
        for name in ("straight", "control"):
            tr = Trainer(cfg(f"{tag}_{name}", det))
            try:
                head = steps(tr, 3)
                res[f"{name}_rng3"] = rng_state().clone()
                res[name] = head + steps(tr, 3)
                res[f"{name}_w"] = weights(tr)
            finally:
                close_trainer(tr)
        tr = Trainer(cfg(f"{tag}_resumed", det))
        try:
            first = steps(tr, 3)
            tr.save()
        finally:
            close_trainer(tr)
        tr = Trainer(cfg(f"{tag}_resumed", det))
        try:
            res["resumed_at"], res["rng_loaded"] = tr.step, rng_state().clone()
            res["resumed"] = first + steps(tr, 3)
            res["resumed_w"] = weights(tr)
        finally:
            close_trainer(tr)
        return res

    note = "train.deterministic=true"
    try:
        try:
            r = attempt(True, "det")
        except RuntimeError as e:
            if "determinis" not in str(e):
                raise
            note = f"train.deterministic=false: deterministic mode refused ({str(e).splitlines()[0][:80]})"
            b.log(f"resume check: {note}; again without it")
            torch.use_deterministic_algorithms(False)
            r = attempt(False, "nondet")
    finally:
        torch.use_deterministic_algorithms(False)  # train.deterministic=true set it for the whole process
    ref, w_ref = r["straight"], r["straight_w"]
    control = r["control"] == ref and all(torch.equal(w_ref[k], r["control_w"][k]) for k in w_ref)
    same_rows = r["resumed"] == ref
    same_w = all(torch.equal(w_ref[k], r["resumed_w"][k]) for k in w_ref)
    bad = [i + 1 for i, (a, c) in enumerate(zip(r["resumed"], ref)) if a != c]
    t.set(keys[0], reference="6 uninterrupted steps (and a second 6-step run as the determinism control); dropout "
                             f"0.1, EMA, 2 micro-batches per step; {note}",
          value=f"resumed at step {r['resumed_at']}; loss+grad norm equal: "
                f"{'yes' if same_rows else f'NO (steps {bad})'}; weights+EMA equal: {'yes' if same_w else 'NO'}; "
                f"control equal: {'yes' if control else 'NO'}",
          bound="bitwise", verdict="ok" if same_rows and same_w and r["resumed_at"] == 3 else "FAIL")
    dev = "CUDA" if b.device.type == "cuda" else "CPU (no CUDA)"
    same_rng = torch.equal(r["rng_loaded"], r["straight_rng3"])
    t.set(keys[1], reference=f"the {dev} generator state of the straight run after its step 3",
          value=f"equal: {'yes' if same_rng else 'NO'}", bound="bitwise", verdict="ok" if same_rng else "FAIL")


# ============================================================================================ throughput


def _fused_adamw(tr):
    from mdtrain.optim import param_groups
    o = tr.cfg.optim
    return torch.optim.AdamW(param_groups(tr.engine.module, o.weight_decay, o.no_decay), lr=o.lr,
                             betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay, fused=CUDA)


def _bare_step(tr):
    """The same model, objective and engine on one staged batch: no loader, no per-step noise, no EMA, no
    loss all-reduce or finiteness check (the engine's grad-norm read is the one sync left)."""
    from mdtrain.objectives.protocol import make_model_fn
    batch = next(tr.data_iter)
    x0 = batch["input_ids"].to(tr.device)
    attn = batch["attention_mask"].to(tr.device)
    noise = tr._noise(0, 0, x0.shape[0], x0.shape[1])
    tokens = float(attn[:, tr.objective.first_target:].sum())

    def step():
        with tr._autocast():
            loss, _ = tr.objective.loss(make_model_fn(tr.engine.model, attn), x0, attn, noise=noise)
        tr.engine.backward(loss.float())
        tr.engine.step(tr.cfg.optim.grad_clip)
        return {"loss": float(loss), "tokens_step": tokens}
    return step


def measure(b: Bench, z: Sizes, tmp: str, objective: str, micro: int, compiled: bool, peak: float,
            lever: str = "", base: str = "", extra: tuple = ()) -> dict:
    """Median step time of the real Trainer (or a lever's variant of its step) after warm-up, and what follows
    from it. ``base`` (a shipped recipe) and ``extra`` overrides let other benchmarks reuse it (dimamba)."""
    from mdtrain.trainer import Trainer
    base = base or ("owt_ar_small.yaml" if objective == "ar" else "owt_mdlm_small.yaml")
    name = f"tp_{os.path.splitext(base)[0]}_{micro}_{int(compiled)}_{lever}_{abs(hash(extra)) % 10**6}"
    cfg = train_cfg(base, os.path.join(tmp, name), b.device.type,
                    [f"model.flavor={z.flavor}", f"data.train={z.data}", f"data.seq_len={z.seq}",
                     f"train.micro_batch_size={micro}", f"train.global_batch_size={micro}",
                     f"train.compile={str(compiled).lower()}", f"data.num_workers={z.workers}", *extra])
    free_memory()
    tr = Trainer(cfg)
    try:
        if "fused" in lever:
            tr.engine.optimizer = _fused_adamw(tr)
        step = _bare_step(tr) if "bare" in lever else tr.train_step
        times, first_loss, first_s = [], None, None
        for i in range(z.warmup + z.steps):
            if i == z.warmup and b.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync(b.device)
            t0 = time.perf_counter()
            before = tr.progress.tokens
            out = step()
            sync(b.device)
            dt = time.perf_counter() - t0
            # the Trainer's step folds its token count into progress.tokens when it reads (read=True: every call)
            out.setdefault("tokens_step", tr.progress.tokens - before)
            if i == 0:
                first_loss, first_s = out["loss"], dt
            if i >= z.warmup:
                times.append(dt)
        sec = median(times)
        tps = out["tokens_step"] / sec
        mem = torch.cuda.max_memory_allocated() / 2**30 if b.device.type == "cuda" else None
        return {"tps": tps, "ms": 1e3 * sec, "mfu": tr.flops_per_token * tps / peak if peak else None,
                "mem": mem, "first_s": first_s, "loss1": first_loss, "spread": (min(times), max(times)),
                "fpt": tr.flops_per_token}
    finally:
        close_trainer(tr)
        del tr
        free_memory()


def fill(t, key, r: dict, note: str = "") -> None:
    lo, hi = r["spread"]
    t.set(key, **{"tokens/s": r["tps"], "step ms (median)": r["ms"],
                  "MFU": f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a",
                  "peak GiB": f"{r['mem']:.1f}" if r["mem"] is not None else "n/a (CPU)",
                  "first step s": r["first_s"], "step-1 loss": f"{r['loss1']:.4f}",
                  "note": (note + "; " if note else "") + f"min-max {1e3 * lo:.1f}-{1e3 * hi:.1f} ms"})


def run_row(b: Bench, t, key: str, need_s: float, fn, note: str = "") -> None:
    if b.row_guard(t, key, need_s):
        b.guarded(t, key, lambda: fill(t, key, fn(), note))


# ============================================================================================ gpu tests


def gpu_tests(b: Bench, t) -> None:
    """The tests that skip without CUDA, in a subprocess (with mamba-ssm's Triton kernel loaded as here); one row
    per test from pytest's JUnit XML, the transcript into the log."""
    import xml.etree.ElementTree as ET
    files = sorted(f for f in glob.glob(os.path.join(REPO, "tests", "test_*.py"))
                   if "cuda.is_available()" in open(f, encoding="utf-8").read())
    junit = os.path.join(b.out, "gpu_tests.xml")
    code = ("import sys; sys.path[:0] = [sys.argv.pop(1), sys.argv.pop(1)]; import gpu_common; "
            "print('mamba:', gpu_common.load_mamba_triton(), flush=True); import pytest; "
            "sys.exit(pytest.main(sys.argv[1:]))")
    cmd = [sys.executable, "-c", code, os.path.join(REPO, "bench"), REPO, "-q", "-rs", "-p", "no:cacheprovider",
           f"--junitxml={junit}", "-k", "gpu or cuda", *[os.path.relpath(f, REPO) for f in files]]
    timeout = max(5.0, b.time_left() - 3)
    try:
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                           env=dict(os.environ, PYTHONUNBUFFERED="1"))
        text, rc = r.stdout + r.stderr, r.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout or ""
        text, rc = out.decode() if isinstance(out, bytes) else out, "timeout"
    b.log_quiet("----- pytest (GPU-only tests) -----\n" + text + "\n----- end pytest -----")
    summary = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|deselected|error)", ln)]
    t.set("pytest -k 'gpu or cuda'", outcome=summary[-1].strip("= ") if summary else f"exit {rc} (no summary)",
          detail=f"files: {', '.join(os.path.relpath(f, REPO) for f in files)}; exit {rc}")
    if not os.path.exists(junit):
        return
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = case.get("name")
        outcome, detail = "PASSED", f"{float(case.get('time', 0)):.1f} s"
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "SKIPPED"}[tag]
                detail = (el.get("message") or "").replace("\n", " ")[:150]
        t.add_row(name)
        t.set(name, outcome=outcome, detail=detail)
    os.remove(junit)  # the tool brings back few files: the log has the transcript


# ============================================================================================ main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(ap, default_budget=360)
    args = ap.parse_args()
    # train.deterministic (the resume check) needs this before cuBLAS starts; :4096:8 is about the workspace
    # PyTorch picks on Hopper anyway (8 x 4 MiB)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    mamba_status = load_mamba_triton()  # before any model asks for the kernel (the GPU tests' subprocess too)
    b = Bench(args, "gpu_train")
    z = Sizes(args.toy)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references mean fp32
    torch.backends.cudnn.allow_tf32 = False
    tmp = tempfile.mkdtemp(prefix="gpu_train_")
    b.log(f"gpu_train: toy={args.toy} device={b.device} budget={args.budget:.0f}s out={b.out} tmp={tmp}")
    b.log(f"mamba: {mamba_status}")

    env = b.table("env", "Environment", ["item", "value"], ENV_ROWS)
    corr = b.table("correctness", "Correctness of the CUDA paths",
                   ["check", "reference", "value", "bound", "verdict"],
                   ["bf16 autocast loss vs fp32", "SDPA flash vs float64 softmax", "SDPA efficient vs float64 softmax",
                    "SDPA cudnn vs float64 softmax", "SDPA math vs float64 softmax", "pinned asynchronous input copies",
                    "objective: extra fp32 (B,L,V) buffers in loss+backward", "resume 3+3 vs 6 steps, bit for bit",
                    "CUDA RNG state restored on resume", "torch.compile per block vs eager (fp32)"])
    L, m, M = z.seq, z.micro, z.big_micro
    size = "DiT-small" if not args.toy else "debug"
    rows = {
        "mdlm32": f"mdlm {size} eager {m}x{L}", "ar32": f"ar {size} eager {m}x{L}",
        "mdlm64": f"mdlm {size} eager {M}x{L}", "ar64": f"ar {size} eager {M}x{L}",
        "mdlm32c": f"mdlm {size} compiled {m}x{L}", "ar32c": f"ar {size} compiled {m}x{L}",
        "fused": f"lever: mdlm compiled + fused AdamW {m}x{L}",
        "bare": f"lever: mdlm compiled + fused AdamW, bare step {m}x{L}",
        "mdlm64c": f"lever: mdlm compiled {M}x{L}", "target": f"target: mdlm >= {TARGET_TPS:,} tokens/s",
    }
    thr = b.table("throughput", f"Training throughput, bf16 on CUDA (fp32 on CPU), V={z.obj[2]}, median of "
                                f"{z.steps} steps after {z.warmup} warm-up (Trainer.train_step unless a lever says "
                                "otherwise)",
                  ["run", "tokens/s", "step ms (median)", "MFU", "peak GiB", "first step s", "step-1 loss", "note"],
                  list(rows.values()))
    tests = b.table("gpu_tests", "GPU-only tests (skipped on CPU)", ["test", "outcome", "detail"],
                    ["pytest -k 'gpu or cuda'"])
    state = {"peak": None}

    def s_env():
        environment_rows(b, env)
        state["peak"] = measure_ceilings(b, env, args.toy)

    def s_correct():
        checks = [(lambda: check_bf16_vs_fp32(b, corr, z, tmp), ["bf16 autocast loss vs fp32"]),
                  (lambda: check_sdpa(b, corr, z), [k for k in corr.keys if k.startswith("SDPA")]),
                  (lambda: check_pinned(b, corr, z), ["pinned asynchronous input copies"]),
                  (lambda: check_logits_buffers(b, corr, z),
                   ["objective: extra fp32 (B,L,V) buffers in loss+backward"]),
                  (lambda: check_resume(b, corr, z, tmp), ["resume 3+3 vs 6 steps, bit for bit",
                                                           "CUDA RNG state restored on resume"])]
        for fn, keys in checks:
            t0 = time.perf_counter()
            b.guarded(corr, keys, fn)
            b.log(f"check {keys[0]!r}: {time.perf_counter() - t0:.1f} s")

    peak = lambda: state["peak"]  # noqa: E731
    eager_need, comp_need = (3, 10) if args.toy else (12, 75)

    def s_eager():
        run_row(b, thr, rows["mdlm32"], eager_need, lambda: measure(b, z, tmp, "mdlm", m, False, peak()))
        run_row(b, thr, rows["ar32"], eager_need, lambda: measure(b, z, tmp, "ar", m, False, peak()))
        run_row(b, thr, rows["mdlm64"], eager_need, lambda: measure(b, z, tmp, "mdlm", M, False, peak()))
        run_row(b, thr, rows["ar64"], eager_need, lambda: measure(b, z, tmp, "ar", M, False, peak()))

    def s_compiled():
        run_row(b, thr, rows["mdlm32c"], comp_need, lambda: measure(b, z, tmp, "mdlm", m, True, peak()),
                "first step includes compiling")
        run_row(b, thr, rows["fused"], eager_need, lambda: measure(b, z, tmp, "mdlm", m, True, peak(), "fused"),
                "AdamW(fused=True on CUDA) instead of foreach=False")
        run_row(b, thr, rows["bare"], eager_need, lambda: measure(b, z, tmp, "mdlm", m, True, peak(), "fused,bare"),
                "batch and noise staged, no EMA, no loss all-reduce")
        run_row(b, thr, rows["ar32c"], comp_need, lambda: measure(b, z, tmp, "ar", m, True, peak()),
                "first step includes compiling")
        run_row(b, thr, rows["mdlm64c"], comp_need, lambda: measure(b, z, tmp, "mdlm", M, True, peak()),
                "new shape: first step recompiles")

    def s_compile_check():
        check_compile(b, corr, z)

    b.section("env", 40, [(env, k) for k in ENV_ROWS], s_env)
    b.section("correctness", 75, [(corr, k) for k in corr.keys if "compile" not in k], s_correct)
    b.section("throughput_eager", 70, [(thr, rows[k]) for k in ("mdlm32", "ar32", "mdlm64", "ar64")], s_eager)
    b.section("gpu_tests", 45, [(tests, "pytest -k 'gpu or cuda'")], lambda: gpu_tests(b, tests))
    b.section("throughput_compiled", 150, [(thr, rows[k]) for k in ("mdlm32c", "fused", "bare", "ar32c", "mdlm64c")],
              s_compiled, min_start=20)
    b.section("compile_check", 60, [(corr, "torch.compile per block vs eager (fp32)")], s_compile_check,
              min_start=20)
    target_row(thr, rows, b.device.type)
    return b.finish()


def target_row(thr, rows, device_type) -> None:
    best = None
    for k in ("mdlm32", "mdlm64", "mdlm32c", "fused", "bare", "mdlm64c"):
        v = thr.cells[rows[k]].get("tokens/s", "")
        try:
            x = float(v.replace(",", ""))
        except ValueError:
            continue
        if best is None or x > best[0]:
            best = (x, rows[k])
    if best is None:
        thr.close(rows["target"], "no MDLM row was measured")
        return
    met = best[0] >= TARGET_TPS and device_type == "cuda"
    thr.set(rows["target"], **{"tokens/s": f"{best[0]:,.0f}", "note": ("met" if met else "missed") +
                               f" (best: {best[1]}; the other rows are the levers measured)"})


def check_compile(b: Bench, t, z: Sizes) -> None:
    from mdtrain.config import load_config
    from mdtrain.modeling import build_objective_and_model
    from mdtrain.objectives.protocol import make_model_fn
    from mdtrain.parallel.blocks import wrap_blocks
    key = "torch.compile per block vs eager (fp32)"
    cfg = load_config(os.path.join(REPO, "configs", "owt_mdlm_small.yaml"), z.compile_model + ["model.dropout=0.0"])
    B, L = z.compile_shape
    V = z.obj[2]
    torch.manual_seed(3)
    eager, objective = build_objective_and_model(cfg, V, V - 1, L)
    eager = eager.to(b.device)
    randomize_zero_params(eager)
    compiled = wrap_blocks(copy.deepcopy(eager), compile=True)
    g = torch.Generator(device=b.device).manual_seed(4)
    x0 = torch.randint(0, V - 1, (B, L), device=b.device, generator=g)
    noise = {"t": torch.rand(B, generator=g, device=b.device, dtype=torch.float64),
             "mask": torch.rand(B, L, generator=g, device=b.device, dtype=torch.float64)}
    res = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        t0 = time.perf_counter()
        loss, _ = objective.loss(make_model_fn(model), x0, noise=noise)
        loss.backward()
        sync(b.device)
        res[name] = (float(loss), {n: p.grad.detach().clone() for n, p in model.named_parameters()},
                     time.perf_counter() - t0)
    le, ge, _ = res["eager"]
    lc, gc_, secs = res["compiled"]
    loss_gap = abs(lc - le) / abs(le)
    grad_gap = max(rel_err(gc_[n], ge[n]) for n in ge if ge[n].norm() > 0)
    t.set(key, reference=f"eager fp32 (TF32 off), same weights, tokens and noise, B={B} L={L}, "
                         f"{len(eager.blocks)} blocks",
          value=f"loss {loss_gap:.1e}; worst parameter grad {grad_gap:.1e}; first compiled step {secs:.0f} s",
          bound="loss 1e-5, grad 1e-3",
          verdict="ok" if loss_gap <= 1e-5 and grad_gap <= 1e-3 else "FAIL")


if __name__ == "__main__":
    sys.exit(main())
