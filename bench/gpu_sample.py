"""Issue 26 in one prepared run: sampling speed of a DiT-small MDLM (random weights), mamba-ssm's Triton SSD kernel
against mdtrain's PyTorch scan, and mdtrain's DiT side by side with the MDLM reference implementation's.

    python3 bench/gpu_sample.py [--mdlm-ref .ref/mdlm/dit.py] [--out DIR] [--budget 360] [--skip ...] [--toy]

Sections, in the order they run (each with its own budget; ``--skip`` takes their names):
  env                 device, driver, versions; bf16 matmul peak and copy bandwidth
  sampling_b16        16 samples of L = 1024 at T = 1000, one batch of 16, bf16 autocast: ddpm, ddpm_cache,
                      first_hitting (when mdtrain.objectives.samplers offers it), analytic (SEDD's); and ddpm in fp32
                      at T = 100 (what ``mdtrain sample`` runs today: no autocast)
  reference           forward + backward at DiT-small, micro-batch 32 x 1024, bf16: mdtrain's DiT, then the MDLM
                      reference DiT (kuleshov-group/mdlm models/dit.py, given by --mdlm-ref) with its two flash-attn
                      calls served by SDPA and a PyTorch rotary (the stand-ins below), in the same process
  mamba               the Triton SSD kernel vs the PyTorch scan on the same inputs against a float64 scan (fp32 and
                      bf16 outputs, fp32 gradients), their fwd+bwd times, and the dimamba backbone's training tokens/s
                      with each at MDLM's tiny-dimamba size (14 x 512, 8 heads, L = 1024)
  sampling_b1         the same samplers at batch 1, as many of the 16 samples as the section's budget allows
  sampling_graphs     ddpm / ddpm_cache with the network replayed from CUDA graphs (one per batch shape)
  sampling_compile    ddpm with torch.compile'd network, alone and inside a CUDA graph
  reference_compiled  mdtrain's DiT with train.compile-style per-block compile, against the reference's eager time

The weights are random (speed only): PyTorch's init plus N(0, 0.02) for the zero-initialised adaLN and head, so
the logits are not uniform. Sampled sequences are checked to hold no mask token (every position written).

The reference code is never part of this repository. A session that has a GPU places it in a git-excluded folder
that travels with ``carry`` (bench/README.md has the recipe) and passes ``--mdlm-ref``; without it those rows say
"not available". ``--toy`` runs every path at tiny shapes on a CPU (CUDA-only calls say "skipped (no CUDA)").
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
import types
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_common import (ENV_ROWS, NO_CUDA, REPO, Bench, common_args, environment_rows,  # noqa: E402
                        free_memory, load_mamba_triton, measure_ceilings, median, randomize_zero_params, rel_err,
                        sync, time_calls, verdict)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


class Sizes:
    def __init__(self, toy: bool):
        self.toy = toy
        self.flavor = "debug" if toy else "small"
        self.L, self.V = (16, 64) if toy else (1024, 50258)
        self.T, self.T_fp32 = (10, 5) if toy else (1000, 100)
        self.n, self.batch = (4, 4) if toy else (16, 16)
        self.ref_micro = 2 if toy else 32
        self.ref_dims = (64, 4, 2, 32) if toy else (768, 12, 12, 128)  # hidden, heads, blocks, cond
        self.warmup, self.repeats = (1, 2) if toy else (3, 10)
        self.scan = (2, 32, 4, 8, 8) if toy else (8, 1024, 16, 64, 64)  # b, l, h, p, n
        self.mamba_model = ([] if toy else ["model.flavor=tiny", "model.n_layers=14", "model.n_heads=8"])


# ============================================================================================ the network


def sampling_model(b: Bench, z: Sizes):
    from mdtrain.config import load_config
    from mdtrain.modeling import build_objective_and_model
    cfg = load_config(os.path.join(REPO, "configs", "owt_mdlm_small.yaml"), [f"model.flavor={z.flavor}",
                                                                            "model.dropout=0.0"])
    torch.manual_seed(0)
    model, objective = build_objective_and_model(cfg, z.V, z.V - 1, z.L)
    randomize_zero_params(model)
    return model.to(b.device).eval(), objective


def autocast(device, bf16: bool, cache: bool = True):
    if bf16 and device.type == "cuda":  # no weight-cast cache inside a CUDA-graph capture (torch.cuda.graph's note)
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache)
    return torch.autocast(device.type, enabled=False)


class Eager:
    """model_fn of a module under the chosen precision (``mdtrain sample`` itself runs fp32, no autocast)."""

    def __init__(self, model, device, bf16: bool):
        self.model, self.device, self.bf16 = model, device, bf16

    def __call__(self, x, cond=None, attention_mask=None):
        with autocast(self.device, self.bf16, cache=False):  # one forward per region: the cache saves nothing
            return self.model(x, cond, attention_mask).float()


class CompiledAt:
    """The compiled network for batch size ``batch``; any other batch size (the final noise removal evaluates only
    the sequences that still hold masks) runs eagerly rather than triggering a recompilation inside the timed run.
    ``fallbacks`` counts those calls."""

    def __init__(self, compiled: Eager, eager: Eager, batch: int):
        self.compiled, self.eager, self.batch, self.device = compiled, eager, batch, eager.device
        self.fallbacks = 0

    def __call__(self, x, cond=None, attention_mask=None):
        if x.shape[0] == self.batch:
            return self.compiled(x, cond, attention_mask)
        self.fallbacks += 1
        return self.eager(x, cond, attention_mask)


class Graphed:
    """model_fn that replays the network from a CUDA graph captured once per input shape (ddpm_cache's
    sub-batches get one graph each). Inputs are copied into static buffers and the output is cloned out, so a
    later replay never changes logits a sampler still holds. Without CUDA the same buffer path runs with no
    capture, so it is exercised on a CPU too."""

    def __init__(self, inner: Eager):
        self.inner, self.device = inner, inner.device
        self.capture = inner.device.type == "cuda"
        self.graphs: dict = {}

    def _make(self, x, cond):
        st = SimpleNamespace(x=x.clone(), cond=None if cond is None else cond.clone(), graph=None, out=None)
        if self.capture:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the capture stream (cuBLAS handles, autotuning)
                for _ in range(2):
                    self.inner(st.x, st.cond)
            torch.cuda.current_stream().wait_stream(side)
            st.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(st.graph):
                st.out = self.inner(st.x, st.cond)
        self.graphs[tuple(x.shape)] = st
        return st

    def __call__(self, x, cond=None, attention_mask=None):
        if attention_mask is not None:
            raise ValueError("Graphed: no padding masks (sampling from scratch has none)")
        st = self.graphs.get(tuple(x.shape)) or self._make(x, cond)
        st.x.copy_(x)
        if cond is not None:
            st.cond.copy_(cond)
        if st.graph is None:
            return self.inner(st.x, st.cond).clone()
        st.graph.replay()
        return st.out.clone()


def run_sampler(b: Bench, z: Sizes, objective, model_fn, sampler: str, batch: int, steps: int, n: int) -> dict:
    """Sample ``n`` sequences in batches of ``batch`` while the section has time for another batch."""
    from mdtrain.objectives.samplers import sample
    done, wall, nfe, per = 0, 0.0, 0, []
    while done < n:
        if done and b.time_left() < 1.3 * wall / done * batch:
            break
        gen = torch.Generator(device=b.device).manual_seed(1000 + done)
        sync(b.device)
        t0 = time.perf_counter()
        tokens, info = sample(objective, model_fn, batch, z.L, steps, gen, sampler, device=b.device)
        sync(b.device)
        wall += time.perf_counter() - t0
        left = int((tokens == objective.mask_id).sum())
        if left:
            raise AssertionError(f"{sampler}: {left} positions still masked after sampling")
        done += batch
        nfe += info["nfe"]
        per.append(float(info["nfe_per_sample"].double().mean()))
    return {"done": done, "wall": wall, "nfe": nfe, "nfe_per": sum(per) / len(per)}


def sample_row(b: Bench, t, key: str, z: Sizes, objective, model_fn, sampler: str, batch: int, steps: int,
               note: str = "", need_s: float = 5.0) -> None:
    from mdtrain.objectives.samplers import SAMPLERS
    if sampler not in SAMPLERS:
        t.close(key, f"not available: mdtrain.objectives.samplers has no '{sampler}' on this tree")
        return
    if not b.row_guard(t, key, need_s):
        return

    def row():
        r = run_sampler(b, z, objective, model_fn, sampler, batch, steps, z.n)
        t.set(key, samples=f"{r['done']} of {z.n}", NFE=f"{r['nfe']} calls", **{
            "NFE/sample": f"{r['nfe_per']:.0f}", "wall s": r["wall"], "s/sample": r["wall"] / r["done"],
            "tokens/s": r["done"] * z.L / r["wall"], "note": note})
    b.guarded(t, key, row)


# ============================================================================================ reference


def _rotary_qkv(qkv, cos, sin, cos_k=None, sin_k=None, interleaved=False, inplace=False, seqlen_offsets=0,
                num_heads_q=None):
    """Stand-in for flash_attn.layers.rotary.apply_rotary_emb_qkv_: qkv (B, S, 3, H, D); the first 2·cos.shape[-1]
    dims of q and k are rotated GPT-NeoX style (halves), v is left alone; computed in fp32, returned in qkv's dtype
    (a new tensor: the reference uses the return value)."""
    if interleaved or cos_k is not None or (not isinstance(seqlen_offsets, int) or seqlen_offsets):
        raise NotImplementedError("rotary stand-in: only the reference's call (non-interleaved, no offsets)")
    half = cos.shape[-1]
    c = cos.float()[None, :, None, :]
    s = sin.float()[None, :, None, :]

    def rot(x):
        x = x.float()
        x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
        return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c, rest], dim=-1)

    q, k, v = qkv.unbind(2)
    return torch.stack([rot(q).to(qkv.dtype), rot(k).to(qkv.dtype), v], dim=2)


def _varlen_qkvpacked(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False, **unused):
    """Stand-in for flash_attn_varlen_qkvpacked_func when every sequence has ``max_seqlen`` tokens (the reference's
    ``seqlens=None`` path): qkv (B·S, 3, H, D) -> (B·S, H, D) through scaled_dot_product_attention."""
    total, _, heads, dim = qkv.shape
    batch = cu_seqlens.numel() - 1
    if batch * max_seqlen != total:
        raise NotImplementedError("attention stand-in: only sequences of equal length")
    q, k, v = qkv.view(batch, max_seqlen, 3, heads, dim).permute(2, 0, 3, 1, 4)  # each (B, H, S, D)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=softmax_scale)
    return out.transpose(1, 2).reshape(total, heads, dim)


def _stand_in_modules() -> dict:
    fa = types.ModuleType("flash_attn")
    layers = types.ModuleType("flash_attn.layers")
    rotary = types.ModuleType("flash_attn.layers.rotary")
    iface = types.ModuleType("flash_attn.flash_attn_interface")
    rotary.apply_rotary_emb_qkv_ = _rotary_qkv
    iface.flash_attn_varlen_qkvpacked_func = _varlen_qkvpacked
    fa.layers, layers.rotary, fa.flash_attn_interface = layers, rotary, iface
    fa.__stand_in__ = "SDPA"
    mods = {"flash_attn": fa, "flash_attn.layers": layers, "flash_attn.layers.rotary": rotary,
            "flash_attn.flash_attn_interface": iface}
    try:
        import omegaconf  # noqa: F401
    except ImportError:  # the reference imports it, but builds from the attribute config we pass
        oc = types.ModuleType("omegaconf")

        class OmegaConf:
            @staticmethod
            def create(*a, **k):
                raise RuntimeError("omegaconf stand-in: pass the reference an attribute config, not a dict")
        oc.OmegaConf = OmegaConf
        mods["omegaconf"] = oc
    return mods


def load_reference(path: str):
    """Import the MDLM reference's models/dit.py from ``path`` with the stand-ins above in place of flash-attn (and
    of omegaconf when it is missing); sys.modules is restored afterwards, so nothing else sees them."""
    from mdtrain.models.attention import flash_attn_module
    flash_attn_module()  # mdtrain decides about the real flash-attn before any stand-in exists (memoised)
    mods = _stand_in_modules()
    saved = {k: sys.modules.get(k) for k in mods}
    sys.modules.update(mods)
    try:
        spec = importlib.util.spec_from_file_location("mdlm_reference_dit", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return mod


def ref_config(z: Sizes, dropout: float = 0.1):
    hidden, heads, blocks, cond = z.ref_dims
    return SimpleNamespace(model=SimpleNamespace(hidden_size=hidden, n_heads=heads, n_blocks=blocks, cond_dim=cond,
                                                 dropout=dropout, scale_by_sigma=True))


def fwd_bwd_timer(b: Bench, z: Sizes, forward, params):
    """Seconds of forward + cross-entropy + backward (bf16 autocast on CUDA) on one fixed random batch."""
    g = torch.Generator(device=b.device).manual_seed(5)
    x = torch.randint(0, z.V - 1, (z.ref_micro, z.L), device=b.device, generator=g)
    y = torch.randint(0, z.V - 1, (z.ref_micro, z.L), device=b.device, generator=g)

    def step():
        for p in params:
            p.grad = None
        with autocast(b.device, True):
            logits = forward(x)
        F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()
    return time_calls(step, z.warmup, z.repeats, b.device)


def mdtrain_dit(b: Bench, z: Sizes):
    from mdtrain.config import load_config
    from mdtrain.models import build_model
    hidden, heads, blocks, cond = z.ref_dims
    cfg = load_config(os.path.join(REPO, "configs", "owt_mdlm_small.yaml"),
                      [f"model.flavor={z.flavor}", "model.dropout=0.1"])
    torch.manual_seed(0)
    model = build_model(cfg.model, z.V, z.L)
    randomize_zero_params(model)
    return model.to(b.device).train()


def ref_row(t, key, secs, z: Sizes, params: int, note: str) -> float:
    sec = median(secs)
    tps = z.ref_micro * z.L / sec
    t.set(key, **{"tokens/s": tps, "step ms": 1e3 * sec, "params": f"{params / 1e6:.1f}M", "note": note})
    return tps


# ============================================================================================ mamba


def mamba_checks(b: Bench, t, z: Sizes, status: str) -> None:
    from mdtrain.models.mamba import ssd_kernel, ssd_scan, ssd_scan_torch
    have_kernel = b.device.type == "cuda" and ssd_kernel() is not None
    why_not = NO_CUDA if b.device.type != "cuda" else status
    bb, ll, hh, pp, nn = z.scan
    g = torch.Generator(device=b.device).manual_seed(7)
    x = torch.randn(bb, ll, hh, pp, device=b.device, generator=g)
    dt = torch.rand(bb, ll, hh, device=b.device, generator=g) * 0.1
    A = -torch.exp(torch.rand(hh, device=b.device, generator=g) * 2.77)  # -[1, 16], as SSMDirection's init
    B, C = (torch.randn(bb, ll, 1, nn, device=b.device, generator=g) for _ in range(2))
    shape = f"b={bb} l={ll} h={hh} p={pp} n={nn}"

    def f64(*ts):
        return ssd_scan_torch(*(u.detach().double() for u in ts))

    for dtype, tag, bound_k, bound_t in ((torch.float32, "fp32", 1e-2, 1e-5), (torch.bfloat16, "bf16", 2e-2, 2e-2)):
        xi, Bi, Ci = x.to(dtype), B.to(dtype), C.to(dtype)
        ref = f64(xi, dt, A, Bi, Ci)  # float64 on the same (rounded) inputs
        for backend, bound in (("triton", bound_k), ("torch", bound_t)):
            key = f"scan {tag}: {'Triton kernel' if backend == 'triton' else 'PyTorch scan'} vs float64"
            if backend == "triton" and not have_kernel:
                t.close(key, why_not)
                continue

            def row(key=key, backend=backend, bound=bound, xi=xi, Bi=Bi, Ci=Ci, ref=ref):
                err = rel_err(ssd_scan(xi, dt, A, Bi, Ci, backend=backend), ref)
                t.set(key, value=f"{err:.1e}", verdict=verdict(err, bound) + f" (bound {bound:g})",
                      reference=f"float64 chunked scan (tests: = the naive recurrence); {shape}")
            b.guarded(t, key, row)

    w = torch.randn(bb, ll, hh, pp, device=b.device, generator=g)
    leaves64 = [u.detach().double().requires_grad_() for u in (x, dt, A, B, C)]
    (ssd_scan_torch(*leaves64) * w.double()).sum().backward()
    for backend in ("triton", "torch"):
        key = f"scan fp32 gradients: {'Triton kernel' if backend == 'triton' else 'PyTorch scan'} vs float64"
        tkey = f"scan fwd+bwd time: {'Triton kernel' if backend == 'triton' else 'PyTorch scan'}"
        if backend == "triton" and not have_kernel:
            t.close(key, why_not)
            t.close(tkey, why_not)
            continue
        b.guarded(t, [key, tkey], lambda: _scan_grad_rows(b, t, z, key, tkey, backend, (x, dt, A, B, C), leaves64,
                                                          w, shape))


def _scan_grad_rows(b, t, z, key, tkey, backend, inputs, leaves64, w, shape) -> None:
    from mdtrain.models.mamba import ssd_scan
    leaves = [u.detach().clone().requires_grad_() for u in inputs]
    (ssd_scan(*leaves, backend=backend).float() * w).sum().backward()
    errs = [rel_err(u.grad, r.grad) for u, r in zip(leaves, leaves64)]
    t.set(key, value=" ".join(f"{n} {e:.1e}" for n, e in zip(("x", "dt", "A", "B", "C"), errs)),
          reference=f"float64 autograd of the chunked scan; {shape}", verdict=verdict(max(errs), 1e-2))

    def fb():
        for u in leaves:
            u.grad = None
        (ssd_scan(*leaves, backend=backend).float() * w).sum().backward()
    secs = time_calls(fb, z.warmup, z.repeats, b.device)
    t.set(tkey, value=f"{1e3 * median(secs):.2f} ms", reference=f"median of {len(secs)}; {shape}", verdict="")


def dimamba_rows(b: Bench, t, z: Sizes, status: str, tmp: str) -> None:
    from gpu_train import Sizes as TrainSizes, measure
    from mdtrain.models.mamba import ssd_kernel
    tz = TrainSizes(z.toy)
    tz.warmup, tz.steps = (1, 2) if z.toy else (2, 6)  # the kernel autotunes on its first calls
    for backend in ("triton", "torch"):
        key = f"dimamba training tokens/s: {'Triton kernel' if backend == 'triton' else 'PyTorch scan'}"
        if backend == "triton" and not (b.device.type == "cuda" and ssd_kernel() is not None):
            t.close(key, NO_CUDA if b.device.type != "cuda" else status)
            continue
        if not b.row_guard(t, key, 5 if z.toy else 25):
            continue

        def row(key=key, backend=backend):
            r = measure(b, tz, tmp, "mdlm", tz.micro, False, None, base="owt_mdlm_mamba.yaml",
                        extra=(*z.mamba_model, f"model.mamba_backend={backend}"))
            size = "debug" if z.toy else "tiny-dimamba-like 14x512, 8 heads, d_state 64"
            t.set(key, value=f"{r['tps']:,.0f} tokens/s ({r['ms']:.0f} ms/step)",
                  reference=f"Trainer.train_step, {size}, {tz.micro}x{tz.seq}, bf16 on CUDA; median of {tz.steps}",
                  verdict=f"peak {r['mem']:.1f} GiB, first step {r['first_s']:.1f} s" if r["mem"] is not None
                  else f"first step {r['first_s']:.1f} s")
        b.guarded(t, key, row)


# ============================================================================================ main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(ap, default_budget=360)
    ap.add_argument("--mdlm-ref", default="", help="path of the MDLM reference's models/dit.py (bench/README.md)")
    args = ap.parse_args()
    mamba_status = load_mamba_triton()
    b = Bench(args, "gpu_sample")
    z = Sizes(args.toy)
    torch.backends.cuda.matmul.allow_tf32 = False
    tmp = tempfile.mkdtemp(prefix="gpu_sample_")
    b.log(f"gpu_sample: toy={args.toy} device={b.device} budget={args.budget:.0f}s out={b.out}")
    b.log(f"mamba: {mamba_status}")
    B, L, T, dev = z.batch, z.L, z.T, b.device

    env = b.table("env", "Environment", ["item", "value"], ENV_ROWS)
    rows = {
        "ddpm16": f"ddpm B{B} bf16 eager", "cache16": f"ddpm_cache B{B} bf16 eager",
        "fh16": f"first_hitting B{B} bf16 eager", "an16": f"analytic (SEDD) B{B} bf16 eager",
        "fp32": f"ddpm B{B} fp32 eager, T={z.T_fp32}",
        "ddpm1": "ddpm B1 bf16 eager", "cache1": "ddpm_cache B1 bf16 eager", "fh1": "first_hitting B1 bf16 eager",
        "g16": f"ddpm B{B} bf16 CUDA graph", "gc16": f"ddpm_cache B{B} bf16 CUDA graph",
        "g1": "ddpm B1 bf16 CUDA graph", "gc1": "ddpm_cache B1 bf16 CUDA graph",
        "c1": "ddpm B1 bf16 compiled", "cg1": "ddpm B1 bf16 compiled + CUDA graph",
        "c16": f"ddpm B{B} bf16 compiled",
    }
    samp = b.table("sampling", f"Sampling {z.n} sequences of L={L}, T={T} (unless said), DiT-{z.flavor} MDLM, random "
                               f"weights, V={z.V}",
                   ["run", "samples", "NFE", "NFE/sample", "wall s", "s/sample", "tokens/s", "note"],
                   list(rows.values()))
    ref_rows = ["mdtrain DiT fwd+bwd, eager", "MDLM reference DiT fwd+bwd (flash-attn -> SDPA)",
                "ratio mdtrain / reference, eager", "mdtrain DiT fwd+bwd, compiled per block",
                "ratio mdtrain compiled / reference"]
    ref = b.table("reference", f"Side by side with the MDLM reference DiT: forward + cross-entropy + backward, "
                               f"{z.ref_micro}x{L}, bf16 autocast on CUDA, dropout 0.1, median of {z.repeats}",
                  ["run", "tokens/s", "step ms", "params", "note"], ref_rows)
    mrows = [f"scan {p}: {k} vs float64" for p in ("fp32", "bf16") for k in ("Triton kernel", "PyTorch scan")] + \
        [f"scan fp32 gradients: {k} vs float64" for k in ("Triton kernel", "PyTorch scan")] + \
        [f"scan fwd+bwd time: {k}" for k in ("Triton kernel", "PyTorch scan")] + \
        [f"dimamba training tokens/s: {k}" for k in ("Triton kernel", "PyTorch scan")]
    mam = b.table("mamba", f"Mamba-2 SSD scan: mamba-ssm's Triton kernel vs mdtrain's PyTorch scan ({mamba_status})",
                  ["run", "value", "reference", "verdict"], mrows)
    state: dict = {}

    def net():
        if "model" not in state:
            state["model"], state["objective"] = sampling_model(b, z)
        return state["model"], state["objective"]

    def s_b16():
        model, obj = net()
        bf = Eager(model, dev, True)
        sample_row(b, samp, rows["ddpm16"], z, obj, bf, "ddpm", B, T)
        sample_row(b, samp, rows["cache16"], z, obj, bf, "ddpm_cache", B, T)
        sample_row(b, samp, rows["fh16"], z, obj, bf, "first_hitting", B, T, "one call per revealed token")
        sample_row(b, samp, rows["an16"], z, obj, bf, "analytic", B, T, "SEDD tau-leaping")
        sample_row(b, samp, rows["fp32"], z, obj, Eager(model, dev, False), "ddpm", B, z.T_fp32,
                   "what `mdtrain sample` runs today (no autocast)")

    def s_b1():
        model, obj = net()
        bf = Eager(model, dev, True)
        plan = (("ddpm1", "ddpm"), ("cache1", "ddpm_cache"), ("fh1", "first_hitting"))
        for i, (key, sampler) in enumerate(plan):
            with budget_slice(b, len(plan) - i):
                sample_row(b, samp, rows[key], z, obj, bf, sampler, 1, T)

    def s_graphs():
        model, obj = net()
        plan = (("g16", "ddpm", B), ("gc16", "ddpm_cache", B), ("g1", "ddpm", 1), ("gc1", "ddpm_cache", 1))
        for i, (key, sampler, batch) in enumerate(plan):
            with budget_slice(b, len(plan) - i):
                g = Graphed(Eager(model, dev, True))
                sample_row(b, samp, rows[key], z, obj, g, sampler, batch, T)
                if samp.status[rows[key]] == "done":
                    samp.set(rows[key], note=f"{len(g.graphs)} graph(s) captured, capture time in wall" if g.capture
                             else "no capture (no CUDA): the static-buffer path only")
                del g
                free_memory()

    def s_compile():
        model, obj = net()
        compiled = torch.compile(model, dynamic=False, backend=args.compile_backend)
        plan = (("c1", 1, False), ("cg1", 1, True), ("c16", B, False))
        for i, (key, batch, graphed) in enumerate(plan):
            with budget_slice(b, len(plan) - i):
                if not b.row_guard(samp, rows[key], 10 if z.toy else 45):
                    continue
                fn = CompiledAt(Eager(compiled, dev, True), Eager(model, dev, True), batch)
                t0 = time.perf_counter()
                with torch.no_grad():  # compile (or hit the cache) for this shape outside the timed run; twice,
                    for _ in range(2):  # as rotary_tables' cache going from miss to hit is one more recompile
                        fn(torch.full((batch, L), obj.mask_id, device=dev), obj.cond(torch.ones(batch, device=dev)))
                sync(dev)
                warm = time.perf_counter() - t0
                sample_row(b, samp, rows[key], z, obj, Graphed(fn) if graphed else fn, "ddpm", batch, T,
                           f"compile/warm-up {warm:.0f} s, not in wall", need_s=2)
                if samp.status[rows[key]] == "done" and fn.fallbacks:
                    samp.set(rows[key], note=samp.cells[rows[key]]["note"] + f"; {fn.fallbacks} call(s) on a "
                             "smaller batch (final noise removal) ran eager")

    def s_reference():
        def ours():
            model = mdtrain_dit(b, z)
            secs = fwd_bwd_timer(b, z, lambda x: model(x, None), list(model.parameters()))
            state["ours"] = ref_row(ref, ref_rows[0], secs, z, sum(p.numel() for p in model.parameters()),
                                    "mdtrain.models (SDPA; flash-attn not installed)")

        def theirs():
            if not os.path.exists(args.mdlm_ref):
                raise FileNotFoundError(f"--mdlm-ref {args.mdlm_ref}: no such file (bench/README.md: placing it)")
            mod = load_reference(args.mdlm_ref)
            torch.manual_seed(0)
            net = mod.DIT(ref_config(z), vocab_size=z.V)
            randomize_zero_params(net)
            net = net.to(dev).train()
            sigma = torch.zeros(z.ref_micro, device=dev)
            secs = fwd_bwd_timer(b, z, lambda x: net(x, sigma), list(net.parameters()))
            state["theirs"] = ref_row(ref, ref_rows[1], secs, z, sum(p.numel() for p in net.parameters()),
                                      "kuleshov-group/mdlm models/dit.py; its flash-attn varlen attention and rotary "
                                      "served by SDPA and a PyTorch rotary (this script's stand-ins)")

        b.guarded(ref, ref_rows[0], ours)
        free_memory()
        if not args.mdlm_ref:
            for k in ref_rows[1:3]:
                ref.close(k, "not available: no --mdlm-ref (bench/README.md: placing the reference)")
            return
        b.guarded(ref, ref_rows[1:3], theirs)
        if "ours" in state and "theirs" in state:
            ref.set(ref_rows[2], **{"tokens/s": f"{state['ours'] / state['theirs']:.2f}x", "note": "aim: >= 3x"})

    def s_reference_compiled():
        from mdtrain.parallel.blocks import wrap_blocks
        model = wrap_blocks(mdtrain_dit(b, z), compile=True)
        t0 = time.perf_counter()
        secs = fwd_bwd_timer(b, z, lambda x: model(x, None), list(model.parameters()))
        tps = ref_row(ref, ref_rows[3], secs, z, sum(p.numel() for p in model.parameters()),
                      f"torch.compile per block (train.compile); this row took {time.perf_counter() - t0:.0f} s with "
                      "compiling")
        if "theirs" in state:
            ref.set(ref_rows[4], **{"tokens/s": f"{tps / state['theirs']:.2f}x", "note": "aim: >= 3x"})
        else:
            ref.close(ref_rows[4], "no reference time in this run")

    def s_mamba():
        mamba_checks(b, mam, z, mamba_status)
        dimamba_rows(b, mam, z, mamba_status, tmp)

    b.section("env", 30, [(env, k) for k in ENV_ROWS], lambda: (environment_rows(b, env),
                                                                  measure_ceilings(b, env, args.toy)))
    b.section("sampling_b16", 75, [(samp, rows[k]) for k in ("ddpm16", "cache16", "fh16", "an16", "fp32")], s_b16)
    b.section("reference", 40, [(ref, k) for k in ref_rows[:3]], s_reference)
    b.section("mamba", 65, [(mam, k) for k in mrows], s_mamba)
    b.section("sampling_b1", 55, [(samp, rows[k]) for k in ("ddpm1", "cache1", "fh1")], s_b1)
    b.section("sampling_graphs", 45, [(samp, rows[k]) for k in ("g16", "gc16", "g1", "gc1")], s_graphs)
    b.section("sampling_compile", 60, [(samp, rows[k]) for k in ("c1", "cg1", "c16")], s_compile, min_start=20)
    b.section("reference_compiled", 60, [(ref, k) for k in ref_rows[3:]], s_reference_compiled, min_start=30)
    return b.finish()


class budget_slice:
    """Give the next row 1/``parts`` of what is left of the section (``parts`` = rows still to run, so one slow row
    cannot starve the others); the section's own deadline is restored afterwards."""

    def __init__(self, b: Bench, parts: int):
        self.b, self.parts = b, parts

    def __enter__(self):
        self.saved = self.b.section_deadline
        self.b.section_deadline = time.perf_counter() + max(0.0, self.b.time_left()) / self.parts
        return self

    def __exit__(self, *exc):
        self.b.section_deadline = self.saved
        return False


if __name__ == "__main__":
    sys.exit(main())
