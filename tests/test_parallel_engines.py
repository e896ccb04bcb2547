"""Data-parallel engines on real gloo ranks: 2 ranks equal one process fed the same global batch; exact resume;
resharding; EMA against a float64 recomputation; export against the single-process model.

Every multi-rank case compares with ``reference_run``, a plain single-process torch loop (no engine code).
"""
from __future__ import annotations

import contextlib
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mdtrain.config import ParallelConfig
from mdtrain.testing import run_distributed

VOCAB, D, L = 37, 24, 8          # odd sizes: uneven FSDP / ZeRO shards
GLOBAL, MICRO = 8, 2              # global batch; accumulation = GLOBAL / (dp_size * MICRO)
MAX_NORM, DECAY, WD = 1.0, 0.8, 0.1
SKIP = {1}                        # this step is skipped (engine.step(skip=True))


# ---------------------------------------------------------------------------------------------------------------------
# toy model, data, loss, optimizer: shared by the ranks and the reference

class ToyBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.ada = nn.Linear(d, d)
        self.fc1 = nn.Linear(d, 3 * d)
        self.fc2 = nn.Linear(3 * d, d)

    def forward(self, h, c):
        return h + self.fc2(F.gelu(self.fc1(self.norm(h) * (1 + self.ada(c)[:, None]))))


class ToyModel(nn.Module):
    def __init__(self, n_blocks=2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.t_proj = nn.Linear(1, D)
        self.blocks = nn.ModuleList(ToyBlock(D) for _ in range(n_blocks))
        self.norm_out = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x, cond, attention_mask=None):
        c = F.silu(self.t_proj(cond[:, None].to(self.t_proj.weight.dtype)))
        h = self.embed(x) * (1 + self.scale)
        for block in self.blocks:
            h = block(h, c)
        return self.head(self.norm_out(h))


def make_model(seed: int, kind: str = "toy") -> nn.Module:
    torch.manual_seed(seed)
    if kind == "dit":  # the project's DiT at its CPU-sized flavor, dropout off
        from mdtrain.models import ModelConfig, build_model
        return build_model(ModelConfig(name="dit", flavor="debug", dropout=0.0), vocab_size=VOCAB, seq_len=L)
    return ToyModel()


def make_optimizer(model: nn.Module) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name or "embed" in name else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=1e-2, betas=(0.9, 0.99))


def lr_at(step: int, peak: float) -> float:
    return peak * (step + 1) / 3


def global_batch(step: int, size: int):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randint(0, VOCAB, (size, L), generator=g)
    t = torch.rand(size, generator=g)
    return x, t, (3 * x + 1) % VOCAB


def loss_share(logits, y, global_size):
    return F.cross_entropy(logits.float().reshape(-1, VOCAB), y.reshape(-1), reduction="sum") / (global_size * L)


def accum_for(dp_size: int) -> int:
    return GLOBAL // (dp_size * MICRO)


def train(engine, ctx, steps, ema=True, lr=1e-2):
    """The trainer's loop shape: dp rank r takes its slice of each global batch in accum micro-batches."""
    accum = accum_for(ctx.dp_size)
    losses, norms = [], []
    for s in steps:
        engine.set_lr(lr_at(s, lr))
        x, t, y = global_batch(s, GLOBAL)
        base = ctx.dp_rank * accum * MICRO
        total = torch.zeros((), dtype=torch.float64)
        for m in range(accum):
            sl = slice(base + m * MICRO, base + (m + 1) * MICRO)
            with engine.no_sync() if m < accum - 1 else contextlib.nullcontext():
                loss = loss_share(engine.model(x[sl], t[sl]), y[sl], GLOBAL)
                engine.backward(loss)
            total += loss.detach().double()
        losses.append(float(ctx.all_reduce_sum(total)))
        norms.append(engine.step(MAX_NORM, skip=s in SKIP))
        if ema and s not in SKIP:
            engine.ema_update(DECAY)
    return losses, norms


@torch.no_grad()
def eval_loss(engine, ctx, step=99):
    """Loss of a fixed global batch through engine.model, without gradients (every rank takes its slice)."""
    x, t, y = global_batch(step, GLOBAL)
    per = GLOBAL // ctx.dp_size
    sl = slice(ctx.dp_rank * per, (ctx.dp_rank + 1) * per)
    return float(ctx.all_reduce_sum(loss_share(engine.model(x[sl], t[sl]), y[sl], GLOBAL).double()))


def reference_run(steps, kind="toy", order="rank", lr=1e-2):
    """Plain single-process torch: the whole global batch, no engine. Returns losses, norms, model, f64 EMA.

    The gradient is summed in the order the engines at 2 ranks sum it (a near-total cancellation summed in another
    order can flip sign, and AdamW turns that into an lr-sized weight difference): ``order="rank"`` accumulates each
    rank's micro-batches, then adds the ranks (DDP, ZeRO); ``"micro"`` adds the ranks per micro-batch, then
    accumulates (FSDP, which reduce-scatters every micro-batch)."""
    model = make_model(0, kind)
    opt = make_optimizer(model)
    ema = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    ranks, accum = 2, accum_for(2)
    losses, norms = [], []
    for s in steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(s, lr)
        x, t, y = global_batch(s, GLOBAL)
        total, grads = 0.0, {}
        for r in range(ranks):
            for m in range(accum):
                sl = slice((r * accum + m) * MICRO, (r * accum + m + 1) * MICRO)
                loss = loss_share(model(x[sl], t[sl]), y[sl], GLOBAL)
                loss.backward()
                total += float(loss.detach().double())
                grads[r, m] = {p: p.grad for p in model.parameters()}
                opt.zero_grad(set_to_none=True)
        for p in model.parameters():
            if order == "rank":
                parts = [_sum_in_order([grads[r, m][p] for m in range(accum)]) for r in range(ranks)]
            else:
                parts = [_sum_in_order([grads[r, m][p] for r in range(ranks)]) for m in range(accum)]
            p.grad = _sum_in_order(parts)
        losses.append(total)
        if s in SKIP:
            norms.append(float("nan"))
        else:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)))
            opt.step()
            with torch.no_grad():
                for n, p in model.named_parameters():
                    ema[n].mul_(DECAY).add_(p.double(), alpha=1 - DECAY)
        opt.zero_grad(set_to_none=True)
    return losses, norms, model, ema


@contextlib.contextmanager
def single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _sum_in_order(ts):
    out = ts[0]
    for t in ts[1:]:
        out = out + t
    return out


def pcfg_for(spec: dict) -> ParallelConfig:
    return ParallelConfig(engine=spec["engine"], zero_stage=spec.get("stage", 0),
                          offload_optimizer=spec.get("offload", False))


def build(spec, ctx, seed=0):
    from mdtrain.parallel import build_engine
    return build_engine(pcfg_for(spec), make_model(seed, spec.get("model", "toy")), make_optimizer, ctx,
                        precision=spec.get("precision", "fp32"), grad_accum=accum_for(ctx.dp_size),
                        micro_batch_size=MICRO)


def assert_close_sd(got: dict, want: dict, atol: float, what: str):
    assert set(got) == set(want), f"{what}: keys differ: {sorted(set(got) ^ set(want))}"
    for k in want:
        g, w = np.asarray(got[k], dtype=np.float64), np.asarray(want[k], dtype=np.float64)
        assert g.shape == w.shape, f"{what}[{k}]: shape {g.shape} != {w.shape}"
        err = np.abs(g - w).max() if g.size else 0.0
        assert err <= atol, f"{what}[{k}]: max |diff| {err:.3g} > {atol}"


def assert_equal_sd(got: dict, want: dict, what: str):
    assert set(got) == set(want), f"{what}: keys differ"
    for k in want:
        assert np.array_equal(np.asarray(got[k]), np.asarray(want[k])), f"{what}[{k}] is not bit-identical"


# ---------------------------------------------------------------------------------------------------------------------
# 2 ranks == 1 process; save -> fresh engine -> load -> bit-identical continuation; EMA; export

def _engine_worker(rank, world, spec, ckpt):
    from mdtrain.parallel import init_distributed
    ctx = init_distributed()
    engine = build(spec, ctx)
    engine.ema_init()
    losses, norms = train(engine, ctx, range(0, 3))
    client = {"step": 3, "rank": rank, "rng": torch.get_rng_state(), "nested": {"pos": [rank, 7], "name": "x"}}
    engine.save_checkpoint(ckpt, client, async_save=spec.get("async", False))
    at_save = engine.full_state_dict(ema=True)
    after_losses, _ = train(engine, ctx, range(3, 5))  # an async save is still writing meanwhile
    engine.wait_checkpoint()
    full, full_ema = engine.full_state_dict(), engine.full_state_dict(ema=True)
    live = eval_loss(engine, ctx)
    with engine.ema_swapped():  # the forward must see the EMA weights (gathered / re-partitioned by the engine)
        swapped = eval_loss(engine, ctx)
    evals = (live, swapped, eval_loss(engine, ctx))
    engine.close()

    engine2 = build(spec, ctx, seed=1)  # a different initialisation: everything must come from the checkpoint
    engine2.ema_init()
    loaded = engine2.load_checkpoint(ckpt)
    resumed_losses, _ = train(engine2, ctx, range(3, 5))
    full2, full_ema2 = engine2.full_state_dict(), engine2.full_state_dict(ema=True)
    engine2.close()
    client_ok = (loaded["step"] == 3 and loaded["rank"] == rank and torch.equal(loaded["rng"], client["rng"])
                 and loaded["nested"] == client["nested"])
    return dict(losses=losses + after_losses, norms=norms, resumed=resumed_losses, full=full, full_ema=full_ema,
                full2=full2, full_ema2=full_ema2, client_ok=client_ok, evals=evals, at_save=at_save)


ENGINES = {
    "ddp": {"engine": "ddp"},
    "fsdp-async-save": {"engine": "fsdp", "async": True},
    "zero0": {"engine": "deepspeed", "stage": 0},
    "zero1": {"engine": "deepspeed", "stage": 1},
    "zero2": {"engine": "deepspeed", "stage": 2},
    "zero3": {"engine": "deepspeed", "stage": 3},
}


def run_reference(kind="toy", order="rank", lr=1e-2):
    with single_thread():  # the toy shapes gain nothing from threads, and shared CI cores make them crawl
        losses, norms, model, ema = reference_run(range(5), kind, order, lr)
    return dict(losses=losses, norms=norms, params={k: v.detach().numpy() for k, v in model.state_dict().items()},
                ema=ema)


@pytest.fixture(scope="module")
def reference():
    return run_reference()


@pytest.mark.parametrize("name", list(ENGINES))
def test_two_ranks_match_one_process_and_resume_exactly(name, reference, tmp_path):
    spec = ENGINES[name]
    tol = 1e-5 if spec.get("stage") == 3 else 1e-6
    ckpt = str(tmp_path / "ckpt")
    out = run_distributed(_engine_worker, 2, spec, ckpt, timeout=240)
    for r in out:
        np.testing.assert_allclose(r["losses"], reference["losses"], rtol=0, atol=tol)
        done = [i for i in range(3) if i not in SKIP]
        assert math.isnan(r["norms"][1]), "a skipped step reports a NaN grad norm"
        np.testing.assert_allclose([r["norms"][i] for i in done], [reference["norms"][i] for i in done], rtol=1e-5)
        assert r["client_ok"], "client_state did not round-trip for this rank"
        # the uninterrupted run and the resumed one are bit-identical: losses, weights, EMA
        assert r["resumed"] == r["losses"][3:], f"resumed losses {r['resumed']} != {r['losses'][3:]}"
    main = out[0]
    assert all(r["full"] == {} for r in out[1:]), "full_state_dict is rank 0's only"
    assert_close_sd(main["full"], reference["params"], tol, "final weights vs single process")
    ema_want = {k: v.numpy() for k, v in reference["ema"].items()}
    ema_want["scale"] = reference["params"]["scale"]  # buffers are exported as they are
    assert_close_sd(main["full_ema"], ema_want, tol, "EMA vs float64 recomputation")
    assert_equal_sd(main["full2"], main["full"], "weights after resume")
    assert_equal_sd(main["full_ema2"], main["full_ema"], "EMA after resume")
    # forward under ema_swapped() == the reference model holding the float64 EMA; restored afterwards
    live, swapped, restored = main["evals"]
    np.testing.assert_allclose([live, swapped], [reference_eval(reference["params"]), reference_eval(ema_want)],
                               rtol=0, atol=10 * tol)
    assert restored == live and swapped != live
    if spec["engine"] == "deepspeed":  # export path: one process, no process group
        from mdtrain.parallel.engines.zero import consolidated_state_dict
        assert_equal_sd(consolidated_state_dict(ckpt, make_model(0).state_dict(), ema=True), main["at_save"],
                        "offline EMA export")


def test_single_process_engine_is_plain_training(reference, tmp_path):
    """No launcher, no process group: the ddp engine is plain training and still checkpoints and resumes."""
    from mdtrain.parallel import init_distributed
    ctx = init_distributed()
    try:
        assert ctx.world_size == 1 and ctx.mesh is None and not ctx.distributed
        with single_thread():
            engine = build(ENGINES["ddp"], ctx)
            engine.ema_init()
            losses, _ = train(engine, ctx, range(3))
            engine.save_checkpoint(str(tmp_path), {"step": 3})
            more, _ = train(engine, ctx, range(3, 5))
            engine2 = build(ENGINES["ddp"], ctx, seed=1)
            engine2.ema_init()
            assert engine2.load_checkpoint(str(tmp_path)) == {"step": 3}
            resumed, _ = train(engine2, ctx, range(3, 5))
        np.testing.assert_allclose(losses + more, reference["losses"], rtol=0, atol=1e-6)
        assert resumed == more
        # a non-finite gradient norm drops the step: weights and AdamW state stay as they were
        before = engine2.full_state_dict()
        moments = [v.clone() for st in engine2.optimizer.state.values() for v in st.values()]
        x, t, y = global_batch(0, GLOBAL)
        engine2.backward(loss_share(engine2.model(x, t), y, GLOBAL) * float("inf"))
        assert not math.isfinite(engine2.step(MAX_NORM))
        assert_equal_sd(engine2.full_state_dict(), before, "weights after a non-finite step")
        after = [v for st in engine2.optimizer.state.values() for v in st.values()]
        assert all(torch.equal(a, b) for a, b in zip(after, moments))
        assert all(p.grad is None for p in engine2.module.parameters())
        assert_equal_sd(engine2.full_state_dict(ema=True), engine.full_state_dict(ema=True), "EMA after resume")
    finally:
        ctx.destroy()


# ---------------------------------------------------------------------------------------------------------------------
# resharding: a checkpoint from N ranks loads on M ranks with model, optimizer and EMA intact

def full_optimizer_state(engine) -> dict:
    """FSDP/DDP: the consolidated AdamW state, flattened to {"fqn:key": tensor} (rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    osd = get_optimizer_state_dict(engine.module, engine.optimizer,
                                   options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # clone: un-sharded entries (the AdamW step) come back as the live tensors
    return {f"{fqn}:{k}": v.clone() for fqn, st in osd.get("state", {}).items() for k, v in st.items()}


def _reshard_worker(rank, world, spec, load_from, save_to, steps):
    """Optionally load ``load_from``; report the state; train ``steps``; optionally save to ``save_to``."""
    from mdtrain.parallel import init_distributed
    ctx = init_distributed()
    engine = build(spec, ctx, seed=1 if load_from else 0)
    engine.ema_init()
    if load_from:
        client = engine.load_checkpoint(load_from)
        assert client == {"rank": 0}, f"a different world size hands rank 0's client state to all, got {client}"

    def snapshot():
        optim = full_optimizer_state(engine) if spec["engine"] != "deepspeed" else {}
        return dict(model=engine.full_state_dict(), ema=engine.full_state_dict(ema=True), optim=optim)

    loaded = snapshot() if load_from else None  # (a fresh AdamW has no state to look at)
    losses, _ = train(engine, ctx, steps)
    if save_to:
        engine.save_checkpoint(save_to, {"rank": rank})
    saved = snapshot()
    engine.close()
    return dict(loaded=loaded, losses=losses, saved=saved)


def _check_same_state(got, want, tol, what):
    assert_close_sd(got["model"], want["model"], tol, f"{what}: model")
    assert_close_sd(got["ema"], want["ema"], tol, f"{what}: EMA")
    assert_close_sd(got["optim"], want["optim"], tol, f"{what}: optimizer")


def test_fsdp_reshards_2_to_1_to_2(reference, tmp_path):
    spec = {"engine": "fsdp"}
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    os.makedirs(a), os.makedirs(b)
    two = run_distributed(_reshard_worker, 2, spec, None, a, range(0, 3), timeout=240)[0]
    one = run_distributed(_reshard_worker, 1, spec, a, b, range(3, 4), timeout=240)[0]
    _check_same_state(one["loaded"], two["saved"], 0.0, "2 -> 1 ranks")
    assert len(two["saved"]["optim"]) == 3 * len(two["saved"]["model"]) - 3, "AdamW state covers every parameter"
    back = run_distributed(_reshard_worker, 2, spec, b, None, range(4, 5), timeout=240)[0]
    _check_same_state(back["loaded"], one["saved"], 0.0, "1 -> 2 ranks")
    # and training goes on as if nothing happened: the steps match the single-process reference
    np.testing.assert_allclose(two["losses"] + one["losses"] + back["losses"], reference["losses"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("stage,before,after", [(3, 2, 1), (2, 1, 2)])
def test_deepspeed_checkpoint_converts_to_another_world_size(stage, before, after, reference, tmp_path):
    """ZeRO partitions depend on the world size: the engine converts through DeepSpeed's universal format, which
    keeps the optimizer state (the next step matches the uninterrupted reference)."""
    spec = {"engine": "deepspeed", "stage": stage}
    tol = 1e-5 if stage == 3 else 1e-6
    first = run_distributed(_reshard_worker, before, spec, None, str(tmp_path), range(0, 3), timeout=240)[0]
    second = run_distributed(_reshard_worker, after, spec, str(tmp_path), None, range(3, 5), timeout=240)[0]
    assert_equal_sd(second["loaded"]["model"], first["saved"]["model"], "weights after conversion")
    assert_equal_sd(second["loaded"]["ema"], first["saved"]["ema"], "EMA after conversion")
    np.testing.assert_allclose(first["losses"] + second["losses"], reference["losses"], rtol=0, atol=tol)
    assert_close_sd(second["saved"]["model"], reference["params"], tol, "weights after 2 more steps")
    assert not [p for p in os.listdir(tmp_path.parent) if p.startswith(".universal-")], "conversion left files"
    # offline, in this process without a process group (export): zero_to_fp32 weights and the re-cut EMA
    from mdtrain.parallel.engines.zero import consolidated_state_dict
    model_state = make_model(0).state_dict()
    assert_equal_sd(consolidated_state_dict(str(tmp_path), model_state), first["saved"]["model"], "offline weights")
    assert_equal_sd(consolidated_state_dict(str(tmp_path), model_state, ema=True), first["saved"]["ema"],
                    "offline EMA")


# ---------------------------------------------------------------------------------------------------------------------
# the project's DiT under FSDP; bf16 paths on toy shapes

def _train_worker(rank, world, specs, steps):
    from mdtrain.parallel import init_distributed
    ctx = init_distributed()
    out = []
    for spec in specs:
        engine = build(spec, ctx)
        losses, _ = train(engine, ctx, steps, ema=False, lr=spec.get("lr", 1e-2))
        out.append(dict(losses=losses, full=engine.full_state_dict()))
        engine.close()
    return out


def test_fsdp_debug_dit_matches_one_process():
    # FSDP computes the clipping norm from shards, so its gradients differ from the reference by an ulp; at a high
    # LR, AdamW on the zero-initialised adaLN weights amplifies that to 1e-5 within 5 steps. A DiT-like LR does not.
    ref = run_reference("dit", order="micro", lr=1e-3)
    spec = {"engine": "fsdp", "model": "dit", "lr": 1e-3}
    out = run_distributed(_train_worker, 2, [spec], range(5), timeout=240)[0][0]
    np.testing.assert_allclose(out["losses"], ref["losses"], rtol=0, atol=1e-6)
    assert_close_sd(out["full"], ref["params"], 1e-6, "DiT weights vs single process")


def test_bf16_smoke(reference):
    """bf16 is ~100x slower than fp32 on CPU: two steps on toy shapes, checked against the fp32 reference."""
    specs = [{"engine": "fsdp", "precision": "bf16"}, {"engine": "deepspeed", "stage": 2, "precision": "bf16"}]
    out = run_distributed(_train_worker, 2, specs, range(2), timeout=240)[0]
    for spec, got in zip(specs, out):
        np.testing.assert_allclose(got["losses"], reference["losses"][:2], rtol=0, atol=2e-2, err_msg=str(spec))
        assert got["losses"] != reference["losses"][:2], f"{spec}: losses are fp32-exact, bf16 was not used"
        assert all(v.dtype == np.float32 for v in got["full"].values()), "exports are fp32"
        assert_close_sd(got["full"], reference_after(2), 5e-2, f"{spec} weights")


def reference_eval(state: dict) -> float:
    model = make_model(0)
    model.load_state_dict({k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in state.items()})
    x, t, y = global_batch(99, GLOBAL)
    with torch.no_grad(), single_thread():
        return float(loss_share(model(x, t), y, GLOBAL).double())


def reference_after(steps: int) -> dict:
    with single_thread():
        model = reference_run(range(steps))[2]
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------------------
# DeepSpeed pieces that need no processes

def test_deepspeed_checkpoint_files_must_be_plain(tmp_path):
    """DeepSpeed unpickles its files fully; the engine first proves they reference only known-safe types."""
    from mdtrain.parallel.engines.zero import verify_pickles
    torch.save({"module": {"w": torch.ones(2)}, "ds_version": "0.19.8"}, tmp_path / "mp_rank_00_model_states.pt")
    verify_pickles(str(tmp_path))
    torch.save({"evil": contextlib.ExitStack()}, tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(RuntimeError, match="refusing to load .*zero_pp_rank_0"):
        verify_pickles(str(tmp_path))


def test_deepspeed_config_generated_and_overridden(tmp_path):
    import json
    from mdtrain.parallel.engines.zero import deepspeed_config
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}, "train_batch_size": 999,
                                "bf16": {"enabled": True}, "steps_per_print": 10}))
    pcfg = ParallelConfig(engine="deepspeed", zero_stage=3, offload_optimizer=True, deepspeed_config=str(user))
    cfg = deepspeed_config(pcfg, "fp32", grad_accum=4, micro_batch_size=2, dp_size=8, device=torch.device("cpu"))
    assert cfg["train_batch_size"] == 64 and cfg["gradient_accumulation_steps"] == 4, "batch keys follow the trainer"
    assert cfg["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": False},
                                        "reduce_bucket_size": 1000}, "the JSON is merged, not substituted"
    assert cfg["bf16"] == {"enabled": False} and cfg["steps_per_print"] == 10, "precision is the trainer's"
    user.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ValueError, match="remove 'optimizer'"):
        deepspeed_config(pcfg, "fp32", 1, 1, 1, torch.device("cpu"))
    with pytest.raises(ValueError, match="zero_stage=0 trains in fp32 only"):
        deepspeed_config(ParallelConfig(engine="deepspeed", zero_stage=0), "bf16", 1, 1, 1, torch.device("cpu"))
