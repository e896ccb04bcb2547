"""Large runs on paper: bytes each rank communicates per step and the predicted step time of every parallel layout,
computed from mdtrain's own model shapes, tensor-parallel layout and FLOP counts, and checked against the bytes
the engines really send on gloo.

    python bench/comm_plan.py                  # the plan: small, medium, 1.3b, 7b x 8, 64, 256, 1024 GPUs
    python bench/comm_plan.py --check          # real engine steps at 2 and 4 gloo ranks: predicted vs measured

What each engine sends in one optimizer step (found by reading the engines and confirmed by ``--check``), with Ψ the
trainable parameters a rank holds (its tensor-parallel piece), n the data-parallel size and t the TP size:

* ddp: one all-reduce of every gradient (fp32: the engine keeps fp32 weights under bf16 autocast).
* fsdp (FSDP2, one unit per block plus the root): per micro-batch each unit is all-gathered in forward and again in
  backward (``reshard_after_forward``, bf16 params) and its gradients are reduce-scattered (fp32 reduction).
  Every parameter is padded along dim 0 to a multiple of n.
* zero1 / zero2 (DeepSpeed): the gradients are all-reduced (DeepSpeed's multi-rank bucket all-reduce, also at
  stage 2), then the updated bf16 parameters are all-gathered; communication in bf16 (DeepSpeed's default).
* zero3 (DeepSpeed): per micro-batch the bf16 parameters are all-gathered and the gradients reduce-scattered.
  DeepSpeed keeps gathered parameters between forward and backward while fewer than
  ``stage3_max_live_parameters`` (1e9) are live. Past that (the 1.3b and 7b flavors), forward and backward each
  gather. Parameters under ``stage3_param_persistence_threshold`` (1e5 elements) stay gathered and are re-gathered
  once per step.
* ×tp (Megatron-core layers, no sequence parallelism): per micro-batch of T tokens and B sequences, all-reduces
  of T·d activations after every row-parallel layer (attention out, MLP fc2) and the vocab-parallel embedding in
  forward. There is one for each column-parallel layer's input gradient (qkv, fc1, the head) in backward, and one
  of B·cond for each adaLN input. The adaLN outputs (B·6d per block, B·2d final) are all-gathered. The
  vocab-parallel log-probabilities all-reduce 3·T fp32 values. The data-parallel engine then syncs only the
  rank's TP piece.

Cost model. A ring collective over g ranks puts, on each rank's link, 2(g−1)/g·S for an all-reduce of S bytes
and (g−1)/g·S for an all-gather (S = the gathered output) or a reduce-scatter (S = the input). Latency and
protocol overhead are ignored, so small messages at 1,024 GPUs are optimistic. A group inside one node (8 GPUs,
TP innermost) runs at NVLink speed. A group that spans nodes runs at the per-GPU network speed (one 400 Gb/s NIC
per GPU, as in a DGX H100). Compute = FLOPs per token ("exact" count of ``mdtrain.models.flops``) × tokens / (MFU ×
peak). Overlap: ddp hides its all-reduce behind the last micro-batch's backward pass (2/3 of its compute), fsdp
and zero3 hide theirs
behind the whole step (prefetch, ``overlap_comm``), zero1/2 hide nothing (mdtrain's generated DeepSpeed config
leaves ``overlap_comm`` off), and TP traffic is always on the critical path. The serial column adds everything.
Model states per GPU follow the ZeRO paper's accounting (Rajbhandari et al. 2020, §5.1: bf16 weights and
gradients, fp32 master + Adam moments, K = 12). For ddp and fsdp, which keep fp32 weights and gradients, it is 16
bytes per parameter. A layout is marked "mem" when its states exceed --state-gb; activations need the rest.
"""
from __future__ import annotations

import argparse
import collections
import math
import os
import sys
from dataclasses import dataclass

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GPUS_PER_NODE = 8
ZERO3_MAX_LIVE = 10 ** 9      # DeepSpeed stage3_max_live_parameters (default)
ZERO3_PERSIST = 10 ** 5       # DeepSpeed stage3_param_persistence_threshold (default)
SCALAR = 64                   # collectives of at most this many bytes are step scalars (norms, flags)

# flavor -> (global batch in sequences of seq_len 1024, micro-batch cap in sequences per DP rank). The global
# batches: MDLM trains small and medium with 512 x 1024 tokens (Sahoo et al. 2024, §4.1), GPT-3 XL used 1M tokens
# and LLaMA-7B 4M. The caps assume activation checkpointing (torchtitan runs Llama-3 8B at 16k tokens per GPU
# micro-batch on 80 GB). A TP group keeps the same cap: without sequence parallelism every TP rank holds the
# whole residual stream, which is what checkpointing saves.
PLAN_MODELS = {"small": (512, 32), "medium": (512, 32), "1.3b": (2048, 16), "7b": (4096, 16)}
NEAR = 1.02  # layouts within 2% of the best throughput count as equal; the one moving the fewest bytes wins


@dataclass(frozen=True)
class Dtypes:
    """Bytes per element of what each collective carries."""
    grad_ddp: int = 4     # ddp gradients (fp32 weights)
    param_fsdp: int = 2   # FSDP2 MixedPrecisionPolicy param_dtype bf16
    grad_fsdp: int = 4    # ... reduce_dtype fp32
    zero: int = 2         # DeepSpeed communication_data_type (bf16 model -> bf16)
    act_row: int = 2      # TP: row-parallel outputs under bf16 autocast
    act_in: int = 4       # TP: input grads of the residual stream (fp32 under autocast) and the embedding output
    act_cond: int = 2     # TP: adaLN inputs and outputs (bf16 under autocast)
    logprob: int = 4      # TP: vocab-parallel log-prob reductions (fp32)

    @classmethod
    def fp32(cls) -> "Dtypes":
        return cls(*([4] * 8))


@dataclass
class Shapes:
    """What the traffic depends on, read off a model built on the meta device."""
    units: list              # FSDP units: per unit, the shapes of its trainable parameters
    local: list              # trainable parameter shapes of one TP rank (= all of them at tp 1)
    n_layers: int
    d_model: int
    cond_dim: int
    mod_widths: list         # adaLN output widths (per block, then the final one)
    flops_per_token: float
    params: int


def model_shapes(cfg, vocab_size: int, seq_len: int, tp: int = 1) -> Shapes:
    import torch

    from mdtrain.models import build_model
    from mdtrain.models.flops import count_params, flops_per_token
    from mdtrain.parallel.tensor_parallel_layout import ModelLayout

    with torch.device("meta"):
        model = build_model(cfg, vocab_size, seq_len)
    named = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    in_blocks = [[tuple(p.shape) for p in b.parameters() if p.requires_grad] for b in model.blocks]
    block_names = {f"blocks.{i}.{n}" for i, b in enumerate(model.blocks) for n, _ in b.named_parameters()}
    root = [s for n, s in named.items() if n not in block_names]
    if tp > 1:  # the pieces tensor_parallel cuts (tensor_parallel_layout): split, replicated, padded vocab
        layout = ModelLayout.from_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()})
        local = [s for n, s in layout.local_shapes(tp).items() if layout.full_name(n) in named]
    else:
        local = list(named.values())
    mods = [m.out_features for n, m in model.named_modules() if n.endswith("adaLN_modulation") or n == "final_adaLN"]
    dims = model.dims
    return Shapes(units=in_blocks + [root], local=local, n_layers=dims.n_layers, d_model=dims.d_model,
                  cond_dim=dims.cond_dim, mod_widths=mods,
                  flops_per_token=flops_per_token(cfg, vocab_size, seq_len)["exact"],
                  params=count_params(model)["total"])


def numel(shape) -> int:
    return math.prod(shape)


def padded_dim0(shape, n: int) -> int:
    """FSDP2 shards dim 0 in n equal pieces, padding it up."""
    return -(-shape[0] // n) * n * numel(shape[1:]) if shape else n


@dataclass
class Coll:
    kind: str        # all_reduce, all_gather (payload = gathered output), reduce_scatter (payload = input)
    group: str       # dp or tp
    payload: int     # bytes of one call
    calls: int       # per optimizer step
    what: str


def ring_bytes(c: Coll, g: int, reduce_scatter_as_all_reduce: bool = False) -> float:
    """Bytes one rank sends for ``c`` over a ring of ``g`` ranks (gloo's reduce-scatter costs an all-reduce)."""
    if g <= 1:
        return 0.0
    f = (g - 1) / g
    rs_factor = 2 * f if reduce_scatter_as_all_reduce else f
    return c.calls * c.payload * {"all_reduce": 2 * f, "all_gather": f, "reduce_scatter": rs_factor}[c.kind]


@dataclass
class Layout:
    engine: str      # ddp, fsdp, fsdp-keep (reshard_after_forward=false), zero1, zero2, zero3
    dp: int
    tp: int = 1

    @property
    def name(self) -> str:
        return self.engine + (f"×tp{self.tp}" if self.tp > 1 else "")


def traffic(sh: Shapes, lay: Layout, micro_seqs: int, seq_len: int, accum: int, dt: Dtypes,
            zero3_max_live: int = ZERO3_MAX_LIVE, zero3_persist: int = ZERO3_PERSIST) -> list[Coll]:
    """Every collective of one optimizer step on one rank (``micro_seqs`` sequences per micro-batch per DP rank)."""
    n, out = lay.dp, []
    psi = sum(numel(s) for s in sh.local)
    if lay.engine == "ddp":
        out.append(Coll("all_reduce", "dp", psi * dt.grad_ddp, 1, "gradients"))
    elif lay.engine in ("fsdp", "fsdp-keep"):
        if lay.tp > 1:
            raise ValueError("fsdp x tp is refused by the engine")
        gathers = 2 if lay.engine == "fsdp" else 1  # reshard_after_forward=false keeps them from fwd to bwd
        for u, shapes in enumerate(sh.units):
            size = sum(padded_dim0(s, n) for s in shapes)
            name = "root" if u == len(sh.units) - 1 else f"block {u}"
            out.append(Coll("all_gather", "dp", size * dt.param_fsdp, gathers * accum, f"{name} params"))
            out.append(Coll("reduce_scatter", "dp", size * dt.grad_fsdp, accum, f"{name} gradients"))
    elif lay.engine in ("zero1", "zero2"):
        out.append(Coll("all_reduce", "dp", psi * dt.zero, 1, "gradients"))
        out.append(Coll("all_gather", "dp", -(-psi // (2 * n)) * 2 * n * dt.zero, 1, "updated params"))
    elif lay.engine == "zero3":
        if lay.tp > 1:
            raise ValueError("zero3 x tp is refused by the engine")
        persist = [s for s in sh.local if numel(s) < zero3_persist]
        big = [s for s in sh.local if numel(s) >= zero3_persist]
        gathers = 1 if sum(numel(s) for s in big) <= zero3_max_live else 2
        if persist:
            out.append(Coll("all_gather", "dp", sum(-(-numel(s) // n) * n for s in persist) * dt.zero, 1,
                            "persistent params (after the step)"))
        if big:
            out.append(Coll("all_gather", "dp", sum(-(-numel(s) // n) * n for s in big) * dt.zero, gathers * accum,
                            "params" + (" (fwd + bwd)" if gathers == 2 else "")))
        out.append(Coll("reduce_scatter", "dp", psi * dt.zero, accum, "gradients"))
    else:
        raise ValueError(f"unknown engine {lay.engine}")
    if lay.tp > 1:
        t_tok, b = micro_seqs * seq_len, micro_seqs
        d, L = sh.d_model, sh.n_layers
        out += [Coll("all_reduce", "tp", t_tok * d * dt.act_row, 2 * L * accum, "row-parallel outputs (fwd)"),
                Coll("all_reduce", "tp", t_tok * d * dt.act_in, accum, "vocab-parallel embedding (fwd)"),
                Coll("all_reduce", "tp", t_tok * d * dt.act_in, (2 * L + 1) * accum,
                     "column-parallel input grads (bwd)"),
                Coll("all_reduce", "tp", b * sh.cond_dim * dt.act_cond, len(sh.mod_widths) * accum,
                     "adaLN input grads (bwd)"),
                Coll("all_reduce", "tp", t_tok * dt.logprob, 3 * accum, "vocab-parallel log-probs (fwd)")]
        out += [Coll("all_gather", "tp", b * w * dt.act_cond, accum, f"adaLN outputs ({w})") for w in sh.mod_widths]
    return out


def group_size(lay: Layout, group: str) -> int:
    return lay.dp if group == "dp" else lay.tp


def link_gbs(lay: Layout, group: str, nvlink_gbs: float, net_gbs: float) -> float:
    """A TP group (innermost, <= 8 ranks) stays in a node; a DP group spans nodes once dp * tp > 8."""
    inside = lay.tp <= GPUS_PER_NODE if group == "tp" else lay.dp * lay.tp <= GPUS_PER_NODE
    return nvlink_gbs if inside else net_gbs


def state_gb(sh: Shapes, lay: Layout) -> float:
    psi = sum(numel(s) for s in sh.local)
    n = lay.dp
    per = {"ddp": 16 * psi, "fsdp": 16 * psi / n, "zero1": 4 * psi + 12 * psi / n,
           "zero2": 2 * psi + 14 * psi / n, "zero3": 16 * psi / n}[lay.engine.replace("-keep", "")]
    if lay.engine == "fsdp-keep":
        per += 2 * psi  # every unit's gathered bf16 params stay until its backward
    return per / 1e9


def plan_row(sh: Shapes, lay: Layout, micro_seqs: int, seq_len: int, accum: int, a: argparse.Namespace) -> dict:
    colls = traffic(sh, lay, micro_seqs, seq_len, accum, Dtypes())
    by = collections.defaultdict(float)
    secs = collections.defaultdict(float)
    for c in colls:
        g = group_size(lay, c.group)
        sent = ring_bytes(c, g)
        by[c.group] += sent
        secs[c.group] += sent / (link_gbs(lay, c.group, a.nvlink_gbs, a.net_gbps / 8) * 1e9)
    tokens = micro_seqs * seq_len * accum / lay.tp  # per GPU (a TP group shares its micro-batches)
    compute = sh.flops_per_token * tokens / (a.mfu * a.peak_tflops * 1e12)
    # ddp syncs in the last micro-batch's backward only; fsdp / zero3 communicate during every micro-batch
    hide = {"ddp": 2 / 3 * compute / accum, "fsdp": compute, "fsdp-keep": compute,
            "zero3": compute}.get(lay.engine, 0.0)
    step = compute + max(0.0, secs["dp"] - hide) + secs["tp"]
    serial = compute + secs["dp"] + secs["tp"]
    return {"layout": lay.name, "gpus": lay.dp * lay.tp, "micro": micro_seqs, "accum": accum,
            "global": micro_seqs * accum * lay.dp, "state_gb": state_gb(sh, lay), "dp_gb": by["dp"] / 1e9,
            "tp_gb": by["tp"] / 1e9, "t_dp": secs["dp"], "t_tp": secs["tp"], "compute": compute, "step": step,
            "serial": serial, "mfu": a.mfu * compute / step, "fits": state_gb(sh, lay) <= a.state_gb}


def batch_split(global_seqs: int, cap: int, dp: int) -> tuple[int, int]:
    """(micro-batch sequences, accumulation) of one DP rank: its share of the global batch (at least one
    sequence) in micro-batches of at most ``cap``."""
    seqs = max(1, global_seqs // dp)
    accum = -(-seqs // cap)
    return -(-seqs // accum), accum


def plan_rows(flavor: str, gpus: int, a: argparse.Namespace, shapes: dict) -> list[dict]:
    global_seqs, cap = PLAN_MODELS[flavor]
    rows = []
    for t in (1, 2, 4, 8):
        engines = ("ddp", "fsdp", "fsdp-keep", "zero1", "zero2", "zero3") if t == 1 else ("ddp", "zero1")
        for eng in engines:
            lay = Layout(eng, gpus // t, t)
            micro, accum = batch_split(global_seqs, cap, lay.dp)
            rows.append(plan_row(shapes[t], lay, micro, a.seq_len, accum, a))
    return rows


def print_plan(a: argparse.Namespace) -> None:
    from mdtrain.models import ModelConfig

    print(f"assumptions: H100 SXM peak {a.peak_tflops:g} TFLOPS bf16 at MFU {a.mfu:.0%}; NVLink {a.nvlink_gbs:g} GB/s "
          f"per GPU inside a node of {GPUS_PER_NODE}; {a.net_gbps:g} Gb/s per GPU between nodes; seq_len {a.seq_len}; "
          f"vocab {a.vocab:,}; model states <= {a.state_gb:g} GB per GPU; ring collectives, no latency")
    best, summary = {}, {}
    for flavor, (global_seqs, cap) in PLAN_MODELS.items():
        cfg = ModelConfig(name="dit", flavor=flavor)
        shapes = {t: model_shapes(cfg, a.vocab, a.seq_len, tp=t) for t in (1, 2, 4, 8)}
        base = shapes[1]
        print(f"\n## {flavor}: {base.params / 1e6:,.1f}M parameters, {base.flops_per_token / 1e9:.2f} GFLOP/token; "
              f"global batch {global_seqs} x {a.seq_len} tokens, micro-batch <= {cap} sequences per GPU")
        print("| GPUs | layout | micro x accum | states GB/GPU | DP GB/rank/step | TP GB/rank/step | DP s | TP s | "
              "compute s | step s | serial s | MFU |")
        print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for gpus in a.gpus:
            rows = plan_rows(flavor, gpus, a, shapes)
            for r in rows:
                mark = "" if r["fits"] else " (mem)"
                glob = "" if r["global"] * r["gpus"] // max(1, r["gpus"]) == global_seqs else f" (global {r['global']})"
                print(f"| {gpus} | {r['layout']}{mark} | {r['micro']} x {r['accum']}{glob} | {r['state_gb']:.1f} | "
                      f"{r['dp_gb']:.2f} | {r['tp_gb']:.2f} | {r['t_dp']:.3f} | {r['t_tp']:.3f} | "
                      f"{r['compute']:.3f} | {r['step']:.3f} | {r['serial']:.3f} | {r['mfu']:.1%} |")
            summary.setdefault(flavor, {})[gpus] = rows
            # rank by MFU (= tokens/s per GPU): the global batch grows where it is under one sequence per rank
            ok = [r for r in rows if r["fits"]]
            top = max((r["mfu"] for r in ok), default=None)
            near = [r for r in ok if r["mfu"] * NEAR >= top]
            best[(flavor, gpus)] = min(near, key=lambda r: (r["dp_gb"] + r["tp_gb"], r["state_gb"])) if ok else None
    print(f"\n## recommended layout (highest predicted MFU, i.e. tokens/s, whose model states fit; within "
          f"{NEAR - 1:.0%} of it, the one moving the fewest bytes)")
    print("| model | " + " | ".join(f"{g} GPUs" for g in a.gpus) + " |")
    print("|---|" + "---|" * len(a.gpus))
    for flavor in PLAN_MODELS:
        cells = []
        for g in a.gpus:
            r = best[(flavor, g)]
            cells.append("none fits" if r is None else
                         f"{r['layout']}: {r['step']:.3f} s/step, {r['mfu']:.0%} MFU, "
                         f"{r['dp_gb'] + r['tp_gb']:.1f} GB/rank")
        print(f"| {flavor} | " + " | ".join(cells) + " |")
    print("\n## summary: bytes sent per rank per step (DP + TP, GB) and predicted step time (s, MFU); "
          "(mem): model states do not fit")
    for flavor, by_gpus in summary.items():
        print(f"\n{flavor}\n| layout | " + " | ".join(f"{g} GPUs" for g in a.gpus) + " |")
        print("|---|" + "---|" * len(a.gpus))
        for i, r0 in enumerate(by_gpus[a.gpus[0]]):
            cells = []
            for g in a.gpus:
                r = by_gpus[g][i]
                cells.append(f"{r['dp_gb'] + r['tp_gb']:.1f} GB, {r['step']:.3f} s, {r['mfu']:.0%}"
                             + ("" if r["fits"] else " (mem)"))
            print(f"| {r0['layout']} | " + " | ".join(cells) + " |")


# --------------------------------------------------------------------------------------------------------------
# --check: real engine steps on gloo


CHECK_VOCAB, CHECK_LEN, CHECK_B = 64, 32, 4


def _check_cfg():
    from mdtrain.models import ModelConfig
    return ModelConfig(name="dit", flavor="debug", dropout=0.0)


def _wchar() -> int:
    with open("/proc/self/io") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("wchar:"))


def _counter(labels: dict):
    """A dispatch mode recording every c10d collective: (kind, group label, payload bytes)."""
    import torch
    import torch.distributed as dist
    from torch.utils._python_dispatch import TorchDispatchMode

    kinds = {"allreduce_": "all_reduce", "allreduce_coalesced_": "all_reduce", "_allgather_base_": "all_gather",
             "allgather_": "all_gather", "allgather_into_tensor_coalesced_": "all_gather",
             "_reduce_scatter_base_": "reduce_scatter", "reduce_scatter_": "reduce_scatter",
             "reduce_scatter_tensor_coalesced_": "reduce_scatter", "broadcast_": "broadcast", "reduce_": "reduce"}

    def nbytes(a) -> int:
        if isinstance(a, torch.Tensor):
            return a.numel() * a.element_size()
        if isinstance(a, (list, tuple)):
            return sum(nbytes(b) for b in a)
        return 0

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.log = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ns, _, op = func._schema.name.partition("::")
            if ns == "c10d" and op in kinds:
                kind = kinds[op]
                pg = next(x for x in args if type(x).__name__ == "ScriptObject" and "ProcessGroup" in str(x._type()))
                pg = dist.ProcessGroup.unbox(pg)
                # payload: the tensor reduced, the gathered output, the scattered input (args[0] / args[1] by op)
                tensors = [x for x in args if isinstance(x, (torch.Tensor, list))]
                payload = nbytes(tensors[0]) if kind in ("all_reduce", "broadcast", "reduce", "all_gather") \
                    else nbytes(tensors[1])
                # DeepSpeed clones the data-parallel group under its own name: anything but the TP group is dp
                self.log.append((kind, labels.get(pg.group_name, "dp"), pg.size(), payload))
            return func(*args, **(kwargs or {}))

    return Count()


def _check_rank(rank: int, world: int, specs: list) -> list:
    """In every rank: for each (engine, zero_stage, tp), one warm-up-free measured step after two warm-up steps."""
    import json
    import tempfile
    from types import SimpleNamespace

    import torch

    from mdtrain.config import ParallelConfig
    from mdtrain.modeling import build_objective_and_model
    from mdtrain.objectives.config import ObjectiveConfig
    from mdtrain.parallel import build_engine, init_distributed

    results = []
    for spec in specs:
        engine, stage, tp = spec[:3]
        ds_json = ""
        if len(spec) > 3:  # DeepSpeed overrides (the large-model regime of ZeRO-3, emulated on a small model)
            ds_json = os.path.join(tempfile.mkdtemp(), "ds.json")
            with open(ds_json, "w") as fh:
                json.dump({"zero_optimization": spec[3]}, fh)
        if tp > 1 and world % tp:
            continue
        ctx = init_distributed(tp=tp)
        torch.manual_seed(0)
        cfg = SimpleNamespace(model=_check_cfg(), objective=ObjectiveConfig(name="mdlm"))
        model, objective = build_objective_and_model(cfg, CHECK_VOCAB, CHECK_VOCAB - 1, CHECK_LEN)
        labels = {}
        if tp > 1:  # as the trainer does: the objective gets the vocab-parallel log-prob reader
            from mdtrain.parallel.tensor_parallel import apply_tensor_parallel, tp_info
            model = apply_tensor_parallel(model, ctx, objective)
            labels[tp_info(model).group.group_name] = "tp"
        pcfg = ParallelConfig(engine=engine, zero_stage=stage, tp=tp, deepspeed_config=ds_json)
        eng = build_engine(pcfg, model, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3), ctx,
                           precision="fp32", grad_accum=1, micro_batch_size=CHECK_B)
        g = torch.Generator().manual_seed(ctx.dp_rank)
        x = torch.randint(0, CHECK_VOCAB - 1, (CHECK_B, CHECK_LEN), generator=g)

        from mdtrain.objectives.protocol import make_model_fn

        def step():
            loss, _ = objective.loss(make_model_fn(eng.model), x)
            eng.backward(loss)
            eng.step(1.0)

        step(), step()  # DDP rebuilds its buckets in step 2; DeepSpeed settles its partitions
        counter = _counter(labels)
        before = _wchar()
        with counter:
            step()
        sent = _wchar() - before
        results.append({"engine": engine, "stage": stage, "tp": tp, "dp": ctx.dp_size, "wchar": sent,
                        "log": counter.log, "overrides": spec[3] if len(spec) > 3 else None})
        if hasattr(eng, "close"):
            eng.close()
        _reset_tp(tp)
    return results


def _reset_tp(tp: int) -> None:
    """Let the next spec build another TP size in the same process (mdtrain keeps one context per process)."""
    import mdtrain.parallel.dist as pdist
    if tp > 1:
        from megatron.core import parallel_state
        parallel_state.destroy_model_parallel()
        groups = sys.modules.get("deepspeed.utils.groups")
        if groups is not None:  # DeepSpeed keeps the last model-parallel unit it was given
            groups.mpu = None
    pdist._CTX = None


CHECK_SPECS = [("ddp", 0, 1), ("fsdp", 0, 1), ("deepspeed", 1, 1), ("deepspeed", 2, 1), ("deepspeed", 3, 1),
               ("ddp", 0, 2), ("deepspeed", 1, 2)]


def engine_name(engine: str, stage: int) -> str:
    return f"zero{stage}" if engine == "deepspeed" else engine


def compare(result: dict) -> dict:
    """Predicted vs measured for one measured step: payload bytes per (kind, group) of the non-scalar collectives,
    and bytes on the wire (gloo: a reduce-scatter costs an all-reduce) against the kernel's count of socket writes."""
    lay = Layout(engine_name(result["engine"], result["stage"]), result["dp"], result["tp"])
    sh = model_shapes(_check_cfg(), CHECK_VOCAB, CHECK_LEN, tp=lay.tp)
    colls = traffic(sh, lay, CHECK_B, CHECK_LEN, 1, Dtypes.fp32())
    predicted = collections.Counter()
    wire = 0.0
    for c in colls:
        g = group_size(lay, c.group)
        if g > 1 and c.payload > SCALAR:
            predicted[(c.kind, c.group)] += c.payload * c.calls
        wire += ring_bytes(c, g, reduce_scatter_as_all_reduce=True)
    measured = collections.Counter()
    scalars, calls = 0, 0
    for kind, group, size, payload in result["log"]:
        if size <= 1:
            continue
        calls += 1
        if payload <= SCALAR:
            scalars += payload
        else:
            measured[(kind, group)] += payload
    return {"layout": lay.name, "world": lay.dp * lay.tp, "predicted": dict(predicted), "measured": dict(measured),
            "wire": wire, "wchar": result["wchar"], "calls": calls, "scalars": scalars}


# ZeRO-3 as it runs a model above stage3_max_live_parameters: limits lowered so the debug model is "large"
LARGE_ZERO3 = ("deepspeed", 3, 1, {"stage3_param_persistence_threshold": 0, "stage3_max_live_parameters": 1000,
                                   "stage3_max_reuse_distance": 1000, "stage3_prefetch_bucket_size": 1000})


def large_zero3_gathered(result: dict) -> float:
    """All-gathered bytes of a LARGE_ZERO3 step / the model's parameter bytes (the plan assumes 2: fwd + bwd)."""
    sh = model_shapes(_check_cfg(), CHECK_VOCAB, CHECK_LEN)
    gathered = sum(p for kind, _, size, p in result["log"] if kind == "all_gather" and size > 1)
    return gathered / (sum(numel(s) for s in sh.local) * 4)


def run_check(worlds=(2, 4), specs=tuple(CHECK_SPECS)) -> list[dict]:
    from mdtrain.testing import run_distributed

    rows = []
    for world in worlds:
        per_rank = run_distributed(_check_rank, world, list(specs), timeout=900)
        for i in range(len(per_rank[0])):
            if per_rank[0][i]["overrides"] is not None:
                rows.append({"world": world, "large_zero3": large_zero3_gathered(per_rank[0][i])})
                continue
            row = compare(per_rank[0][i])
            row["wchar"] = sum(r[i]["wchar"] for r in per_rank) / world  # mean over ranks
            rows.append(row)
    return rows


def print_check(rows: list[dict]) -> None:
    for r in rows:
        if "large_zero3" in r:
            print(f"zero3 with DeepSpeed's live-parameter limits lowered ({LARGE_ZERO3[3]}), {r['world']} ranks: "
                  f"all-gathered {r['large_zero3']:.3f} x the parameter bytes per step (the plan takes 2 above 1e9)")
    rows = [r for r in rows if "large_zero3" not in r]
    print("| ranks | layout | collective (group) | predicted payload B | measured payload B |")
    print("|---:|---|---|---:|---:|")
    for r in rows:
        for key in sorted(set(r["predicted"]) | set(r["measured"])):
            print(f"| {r['world']} | {r['layout']} | {key[0]} ({key[1]}) | {r['predicted'].get(key, 0):,} | "
                  f"{r['measured'].get(key, 0):,} |")
    print("\n| ranks | layout | predicted wire B/rank (gloo) | measured socket writes B/rank | ratio | collectives | "
          "step scalars B |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['world']} | {r['layout']} | {r['wire']:,.0f} | {r['wchar']:,.0f} | {r['wchar'] / r['wire']:.4f} "
              f"| {r['calls']} | {r['scalars']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="measure real engine steps at 2 and 4 gloo ranks")
    ap.add_argument("--gpus", type=lambda s: [int(x) for x in s.split(",")], default=[8, 64, 256, 1024])
    ap.add_argument("--mfu", type=float, default=0.40, help="model FLOPs utilisation of the compute")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM dense bf16")
    ap.add_argument("--nvlink-gbs", type=float, default=450.0, help="GB/s per GPU per direction inside a node")
    ap.add_argument("--net-gbps", type=float, default=400.0, help="Gb/s per GPU between nodes")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=50258, help="GPT-2's 50,257 + the mask token")
    ap.add_argument("--state-gb", type=float, default=60.0, help="model-state budget per GPU (H100 80 GB)")
    a = ap.parse_args()
    if a.check:
        print_check(run_check(specs=tuple(CHECK_SPECS[:5]) + (LARGE_ZERO3,) + tuple(CHECK_SPECS[5:])))
    else:
        print_plan(a)


if __name__ == "__main__":
    main()
