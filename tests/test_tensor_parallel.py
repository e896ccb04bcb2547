"""Tensor parallelism (Megatron-core layers) against the single-process model, on real gloo ranks.

One 2-rank job (module fixture; Megatron's import dominates its cost) checks: TP=2 forward and backward of DiT
(mdlm and md4 blocks), the causal transformer and bidirectional Mamba against the unsplit model, through the real
objectives; the vocab-parallel log-softmax pieces against the full ones with the mask logit suppressed; sampling's
gathered logits and KV-cache decoding; dropout randomness (replicated stream shared by TP ranks, TP-region masks
replayed exactly by activation checkpointing); and per-TP-rank checkpoints re-laid-out 1 -> 2 (in the job) and
2 -> 1 (in this process). Layout and config checks run without any process group.
"""
import copy
import math

import numpy as np
import pytest
import torch

from mdtrain.configtools import ConfigError
from mdtrain.models import ModelConfig, build_model
from mdtrain.parallel.tensor_parallel_layout import ModelLayout, check_config

V, L, B = 37, 16, 2  # an odd vocabulary: the last TP rank holds a zero-padded vocab shard
MASK = 36
# backbone, block variant, objective: SUBS (mask logit suppressed), GenMD4 (softmax expectation of its learned
# per-class powers, a replicated parameter), AR, D3PM (gathers the mask logit too, no suppression)
MODELS = [("dit", "mdlm", "mdlm"), ("dit", "md4", "genmd4"), ("causal", "mdlm", "ar"), ("dimamba", "mdlm", "d3pm")]


def _model(name, variant, dropout=0.0):
    """A debug-size model with every parameter perturbed away from its (partly zero) initialisation."""
    torch.manual_seed(0)
    m = build_model(ModelConfig(name=name, variant=variant, flavor="debug", dropout=dropout), V, L)
    with torch.no_grad():
        for i, p in enumerate(m.parameters()):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(100 + i)) * 0.05)
    return m


def _objective(name):
    from mdtrain.objectives import ObjectiveConfig, build_objective
    return build_objective(ObjectiveConfig(name=name), V, MASK)


def _loss(model_fn, objective):
    x0 = torch.randint(0, MASK, (B, L), generator=torch.Generator().manual_seed(7))
    noise = {k: torch.rand((B, *s), generator=torch.Generator().manual_seed(11), dtype=torch.float64)
             for k, s in objective.noise_spec(L).items()}
    loss, _ = objective.loss(model_fn, x0, None, noise=noise)
    return loss


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))


def _tp2_job(rank, world, tmp):
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from mdtrain.parallel.dist import init_distributed
    from mdtrain.parallel.tensor_parallel import apply_tensor_parallel, sampling_model_fn, tp_info
    from mdtrain.parallel.tensor_parallel_state import full_state_dict, gather_full, load_resharded, \
        rename_for_checkpoint
    from mdtrain.parallel.tensor_parallel_vocab import VocabShard, reader

    ctx = init_distributed("gloo", tp=world)
    out = {}
    # --- forward / backward equality through the objectives ---------------------------------------------------
    for name, variant, obj in MODELS:
        model, objective, ref_objective = _model(name, variant), _objective(obj), _objective(obj)
        ref = copy.deepcopy(model)
        ref_loss = _loss(lambda x, c, m=ref: m(x, c), ref_objective)
        ref_loss.backward()
        apply_tensor_parallel(model, ctx, objective)
        loss = _loss(lambda x, c, m=model: m(x, c), objective)
        loss.backward()
        info = tp_info(model)
        grads = gather_full({n: p.grad for n, p in model.named_parameters()}, info.layout, info.group)
        grads.update({f"objective.{n}": p.grad for n, p in objective.named_parameters()})
        want_grads = {n: p.grad for n, p in ref.named_parameters()}
        want_grads.update({f"objective.{n}": p.grad for n, p in ref_objective.named_parameters()})
        x = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(3))
        cond = torch.rand(B, generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            full_logits = sampling_model_fn(model)(x, cond)
            want = ref(x, cond)
        out[f"{name}-{variant}"] = {
            "loss": (float(loss), float(ref_loss)), "logits": (full_logits, want),
            "grads": {n: (grads[n], g) for n, g in want_grads.items()},
            "local_width": model(x, cond).shape[-1]}
        if name == "causal":  # KV-cache decoding through the TP model, gathered logits
            fn = sampling_model_fn(model)
            with torch.no_grad():
                a, cache = fn.decode_step(x[:, :5], None)
                b, _ = fn.decode_step(x[:, 5:7], cache)
            out["decode"] = (torch.cat([a, b], 1), want[:, :7])
    # --- the vocab-parallel pieces on random logits -----------------------------------------------------------
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 4, V, generator=g, dtype=torch.float64) * 3
    index = torch.stack([torch.randint(0, MASK, (3, 4), generator=g), torch.full((3, 4), MASK)], -1)
    values = torch.rand(V, generator=g, dtype=torch.float64)
    shard = VocabShard.of(V, rank, world, tp_info(model).group)
    loc = logits[..., shard.start:shard.start + shard.width].clone().requires_grad_(True)
    vals = values.clone().requires_grad_(True)
    vp = reader(shard)
    gath, lse = vp.gather_lse(loc, index, MASK)
    e = vp.softmax_expectation(loc, vals, MASK)
    ((gath[..., 0] - lse).sum() + 0.3 * lse.sum() + e.sum()).backward()
    out["vocab"] = {"gathered": gath.detach(), "lse": lse.detach(), "expectation": e.detach(),
                    "grad_local": loc.grad, "grad_values": vals.grad, "start": shard.start, "width": shard.width}
    # the rank's reader reads full-width logits (gathered ones, another model's) like the single-device one
    out["dispatch_full"] = vp.target_logprob(logits, index[..., 0], MASK)
    # --- dropout randomness -----------------------------------------------------------------------------------
    out["rng"] = _rng_checks(ctx, rank)
    # --- checkpoints: this job writes TP=2, reads what the parent wrote at TP=1 --------------------------------
    import torch.distributed.checkpoint as dcp
    model, _ = _trained(ctx, 2)
    info = tp_info(model)
    opt = model._opt
    msd, osd = get_state_dict(model, opt)
    ema = {n: p.detach().float() * 0.5 for n, p in model.named_parameters()}
    dcp.save(rename_for_checkpoint({"model": msd, "optim": osd, "ema": ema}, info.layout, info.rank, 2),
             checkpoint_id=f"{tmp}/tp2")
    out["written"] = {"model": full_state_dict(model, info),
                      "exp_avg": gather_full({n: opt.state[p]["exp_avg"] for n, p in model.named_parameters()},
                                             info.layout, info.group),
                      "ema": gather_full(ema, info.layout, info.group)}
    fresh, _ = _trained(ctx, 0)
    opt2 = fresh._opt
    msd, osd = get_state_dict(fresh, opt2)
    state = load_resharded(f"{tmp}/tp1", info.layout, 1, info.rank, 2,
                           {"model": msd, "optim": osd, "ema": {n: p.detach().float() for n, p in
                                                                fresh.named_parameters()}})
    set_state_dict(fresh, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    out["read"] = {"model": {n: v.detach().clone() for n, v in fresh.state_dict().items()},
                   "exp_avg": {n: opt2.state[p]["exp_avg"] for n, p in fresh.named_parameters()},
                   "step": {n: float(opt2.state[p]["step"]) for n, p in fresh.named_parameters()},
                   "ema": state["ema"]}
    dist.barrier()
    return out


def _trained(ctx, steps):
    """A Mamba model (mixed split/replicated tensors) with AdamW after ``steps`` steps; TP if ctx.tp_size > 1."""
    model = _model("dimamba", "mdlm")
    objective = _objective("mdlm")
    if ctx is not None and ctx.tp_size > 1:
        from mdtrain.parallel.tensor_parallel import apply_tensor_parallel
        apply_tensor_parallel(model, ctx, objective)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        _loss(lambda x, c: model(x, c), objective).backward()
        opt.step()
        opt.zero_grad()
    model._opt = opt
    return model, opt


def _rng_checks(ctx, rank):
    """Dropout on: (a) the hidden state before the head is identical on both TP ranks although their generators
    were seeded differently; (b) activation checkpointing replays the TP-region (attention) dropout masks."""
    import torch.distributed as dist

    from mdtrain.parallel.blocks import wrap_blocks
    from mdtrain.parallel.tensor_parallel import apply_tensor_parallel

    res = {}
    grads = []
    for ckpt in (False, True):
        model = _model("dit", "md4", dropout=0.3)  # md4: attention dropout inside the TP region, channel dropout
        objective = _objective("md4")
        apply_tensor_parallel(model, ctx, objective)
        if ckpt:
            wrap_blocks(model, checkpoint=True)
        seen = []
        model.final_norm.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
        model.train()
        torch.manual_seed(1000 + 17 * rank)  # as if seeded per global rank
        _loss(lambda x, c: model(x, c), objective).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        both = [torch.empty_like(seen[0]) for _ in range(2)]
        dist.all_gather(both, seen[0])
        res[f"hidden_equal_{ckpt}"] = bool(torch.equal(both[0], both[1]))
    res["ckpt_grad_diff"] = float((grads[0] - grads[1]).abs().max())
    res["grad_scale"] = float(grads[0].abs().max())
    return res


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    from torch.distributed.checkpoint.state_dict import get_state_dict
    import torch.distributed.checkpoint as dcp

    from mdtrain.testing import run_distributed

    tmp = str(tmp_path_factory.mktemp("tp"))
    model, opt = _trained(None, 1)  # the TP=1 checkpoint the job re-splits
    msd, osd = get_state_dict(model, opt)
    ema = {n: p.detach().float() * 0.25 for n, p in model.named_parameters()}
    dcp.save({"model": msd, "optim": osd, "ema": ema}, checkpoint_id=f"{tmp}/tp1", no_dist=True)
    written = {"model": {n: v.detach().clone() for n, v in model.state_dict().items()},
               "exp_avg": {n: opt.state[p]["exp_avg"].clone() for n, p in model.named_parameters()},
               "ema": ema, "step": {n: float(opt.state[p]["step"]) for n, p in model.named_parameters()}}
    results = run_distributed(_tp2_job, 2, tmp, timeout=400)
    return {"ranks": results, "tmp": tmp, "tp1": written}


# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [f"{n}-{v}" for n, v, _ in MODELS])
def test_tp2_forward_and_backward_equal_the_single_process_model(tp2, key):
    for r in tp2["ranks"]:
        res = r[key]
        loss, ref = res["loss"]
        assert loss == pytest.approx(ref, rel=1e-5, abs=1e-6)
        assert _rel(*res["logits"]) < 1e-5
        for n, (got, want) in res["grads"].items():
            assert got.shape == want.shape, n
            assert _rel(got, want) < 1e-5, (n, _rel(got, want))
    if key == "dit-md4":  # GenMD4's learned powers: a replicated parameter fed by the vocab-parallel expectation
        assert "objective.schedule.w_raw" in tp2["ranks"][0][key]["grads"]
    # each rank computes only its vocabulary columns: 19 + 18 of 37
    assert [r[key]["local_width"] for r in tp2["ranks"]] == [19, 18]


def test_tp_kv_cache_decoding_gives_the_full_models_logits(tp2):
    for r in tp2["ranks"]:
        assert _rel(*r["decode"]) < 1e-5


def test_vocab_parallel_logprob_equals_the_full_one_with_the_mask_suppressed(tp2):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 4, V, generator=g, dtype=torch.float64) * 3
    index = torch.stack([torch.randint(0, MASK, (3, 4), generator=g), torch.full((3, 4), MASK)], -1)
    values = torch.rand(V, generator=g, dtype=torch.float64)
    # float64 reference written out: the mask logit is -inf, the normaliser runs over the other classes
    x = logits.clone().requires_grad_(True)
    vals = values.clone().requires_grad_(True)
    masked = x.masked_fill(torch.arange(V) == MASK, -math.inf)
    lse = torch.logsumexp(masked, -1)
    gathered = masked.gather(-1, index)
    e = (torch.softmax(masked, -1) * vals).sum(-1)
    ((gathered[..., 0] - lse).sum() + 0.3 * lse.sum() + e.sum()).backward()
    grad_cols = []
    for r in tp2["ranks"]:
        v = r["vocab"]
        assert np.allclose(v["lse"], lse.detach(), rtol=1e-12, atol=1e-12)
        assert np.allclose(v["gathered"][..., 0], gathered[..., 0].detach(), rtol=1e-12, atol=1e-12)
        assert np.all(np.isneginf(v["gathered"][..., 1]))  # the suppressed class is gathered as -inf
        assert np.allclose(v["expectation"], e.detach(), rtol=1e-12, atol=1e-12)
        assert np.allclose(v["grad_values"], vals.grad, rtol=1e-10, atol=1e-12)  # replicated values: full grad
        grad_cols.append(v["grad_local"][..., :v["width"]])
        assert np.allclose(r["dispatch_full"], (gathered[..., 0] - lse).detach(), rtol=1e-12, atol=1e-12)
    assert np.allclose(np.concatenate(grad_cols, -1), x.grad, rtol=1e-10, atol=1e-12)
    assert np.all(np.concatenate(grad_cols, -1)[..., MASK] == 0)  # no gradient into the mask logit


def test_dropout_replicated_stream_is_shared_and_region_masks_replay_under_checkpointing(tp2):
    for r in tp2["ranks"]:
        rng = r["rng"]
        assert rng["hidden_equal_False"] and rng["hidden_equal_True"]
        assert rng["ckpt_grad_diff"] <= 1e-5 * max(1.0, rng["grad_scale"])


def test_checkpoint_written_at_tp1_is_resplit_at_tp2(tp2):
    layout = ModelLayout.from_shapes({k: v.shape for k, v in tp2["tp1"]["model"].items()})
    for rank, r in enumerate(tp2["ranks"]):
        read = r["read"]
        for family in ("model", "exp_avg", "ema"):
            want = layout.shard_state_dict(tp2["tp1"][family], rank, 2)
            assert sorted(read[family]) == sorted(want), family
            for n, w in want.items():
                assert np.array_equal(read[family][n], w), (family, n)
        for n, s in read["step"].items():
            assert s == tp2["tp1"]["step"][layout.full_name(n)]


def test_checkpoint_written_at_tp2_loads_into_one_process(tp2):
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from mdtrain.parallel.tensor_parallel_state import load_consolidated, load_resharded

    written = tp2["ranks"][0]["written"]
    model, opt = _trained(None, 0)
    layout = ModelLayout.from_shapes({k: v.shape for k, v in model.state_dict().items()})
    msd, osd = get_state_dict(model, opt)
    state = load_resharded(f"{tp2['tmp']}/tp2", layout, 2, 0, 1,
                           {"model": msd, "optim": osd, "ema": {n: p.detach().float()
                                                               for n, p in model.named_parameters()}})
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for n, v in model.state_dict().items():
        assert np.array_equal(v, written["model"][n]), n
    for n, p in model.named_parameters():
        assert np.array_equal(opt.state[p]["exp_avg"], written["exp_avg"][n]), n
        assert np.array_equal(state["ema"][n], written["ema"][n]), n
    # export path: weights (or EMA weights) of the single-device model, no process group
    cons = load_consolidated(f"{tp2['tmp']}/tp2", model.state_dict(), ema=False, tp_size=2, has_ema=True)
    cons_ema = load_consolidated(f"{tp2['tmp']}/tp2", model.state_dict(), ema=True, tp_size=2, has_ema=True)
    for n in written["model"]:
        assert np.array_equal(cons[n], written["model"][n])
        assert np.array_equal(cons_ema[n], written["ema"][n])


# ----------------------------------------------------------------------------------------------------------------
# no process group


@pytest.mark.parametrize("name", ["dit", "dimamba", "causal"])
@pytest.mark.parametrize("tp", [2, 4])
def test_layout_cuts_and_merges_back_exactly(name, tp):
    m = _model(name, "mdlm")
    full = m.state_dict()
    layout = ModelLayout.from_shapes({k: v.shape for k, v in full.items()})
    assert not layout.check(tp)
    pieces = [layout.shard_state_dict(full, r, tp) for r in range(tp)]
    shapes = layout.local_shapes(tp)
    for p in pieces:
        assert {k: tuple(v.shape) for k, v in p.items()} == shapes
    merged = layout.merge_state_dicts(pieces)
    assert sorted(merged) == sorted(full)
    for k in full:
        assert torch.equal(merged[k], full[k]), k
    # vocabulary: ceil(V / tp) rows per rank, real rows in order, zero padding at the end
    emb = torch.cat([p["embed.weight"] for p in pieces])
    assert torch.equal(emb[:V], full["embed.weight"]) and torch.all(emb[V:] == 0)


def test_mamba_in_proj_keeps_b_and_c_rows_replicated():
    m = _model("dimamba", "mdlm")
    full = m.state_dict()
    layout = ModelLayout.from_shapes({k: v.shape for k, v in full.items()})
    w = full["blocks.0.mixer.in_proj.weight"]
    di, nh = m.blocks[0].mixer.d_inner, m.blocks[0].mixer.n_heads
    z, x, bc, dt = w.split([di, di, w.shape[0] - 2 * di - nh, nh])
    for r in range(2):
        p = layout.shard_state_dict(full, r, 2)
        h, hh = di // 2, nh // 2
        assert torch.equal(p["blocks.0.mixer.in_proj.weight"],
                           torch.cat([z[r * h:(r + 1) * h], x[r * h:(r + 1) * h], dt[r * hh:(r + 1) * hh]]))
        assert torch.equal(p["blocks.0.mixer.in_proj.bc_weight"], bc)


def test_config_accepts_every_engine_with_tp_and_rejects_unsplittable_models():
    from mdtrain.config import load_config
    for engine in (["parallel.engine=deepspeed", "parallel.zero_stage=2"], ["parallel.engine=fsdp"],
                   ["parallel.engine=deepspeed", "parallel.zero_stage=3"], ["parallel.engine=ddp"]):
        check_config(load_config(None, ["parallel.tp=2"] + engine))
    with pytest.raises(ConfigError, match="n_heads=4 is not divisible by tp=3"):
        check_config(load_config(None, ["parallel.tp=3", "model.flavor=debug"]))
