"""Keyed, deferred initialisation (``mdtrain/models/init.py``, ``mdtrain/parallel/meta_init.py``) in one process:

* every distribution kind against its closed form (moments, bounds) and against torch's own initialiser;
* every backbone's ``init_plan`` covers exactly its parameters and gives PyTorch's / Flax's distributions;
* a piece computed on its own (a TP rank's cut, an FSDP row block, a ZeRO-3 flat partition) equals the same
  elements of the whole tensor, the whole tensor being cut by ``tensor_parallel_layout``'s data path;
* a model built on the meta device and materialised equals the eagerly built one, bit for bit.

The multi-rank equality (1 process, FSDP2 at 2 ranks, ZeRO-3 at 2 ranks, TP=2) is ``test_meta_init_ranks.py``.
"""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from mdtrain.models import ModelConfig, build_model
from mdtrain.models.init import (HASH_CHUNK, DeferredInit, Init, init_full_, keyed_uniform, keyed_values,
                                 lecun_trunc_normal, param_key, torch_linear)
from mdtrain.parallel.meta_init import Piece, fill_piece, materialize_whole
from mdtrain.parallel.tensor_parallel_layout import ModelLayout

V, L = 37, 16
BACKBONES = [("dit", "mdlm"), ("dit", "md4"), ("causal", "mdlm"), ("dimamba", "mdlm"), ("dimamba", "md4")]


def _cfg(name, variant="mdlm", **kw):
    return ModelConfig(name=name, variant=variant, flavor="debug", mamba_d_state=8, **kw)


def _draw(init, n=200_000, key=12345):
    return keyed_values(init, key, torch.arange(n), dtype=torch.float64).numpy()


# ------------------------------------------------------------------------------------------------ distributions


def test_uniform_bits_are_uniform_and_independent():
    u = keyed_uniform(7, torch.arange(400_000)).numpy()
    assert 0 < u.min() and u.max() < 1
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.01          # neighbours
    other = keyed_uniform(param_key(0, "b"), torch.arange(400_000)).numpy()
    assert abs(np.corrcoef(u, other)[0, 1]) < 0.01               # another parameter's stream
    # elements beyond 2**32 are keyed by their high bits too
    hi = keyed_uniform(7, torch.arange(50_000) + (1 << 33)).numpy()
    assert stats.kstest(hi, "uniform").pvalue > 1e-3 and abs(np.corrcoef(u[:50_000], hi)[0, 1]) < 0.02


@pytest.mark.parametrize("init,dist", [
    (Init("uniform", -0.3, 0.5), stats.uniform(-0.3, 0.8)),
    (Init("normal", 0.1, std=0.2), stats.norm(0.1, 0.2)),
    (Init("trunc_normal", -0.04, 0.04, 0.02), stats.truncnorm(-2, 2, scale=0.02)),
    (Init("log_of_uniform", 1.0, 16.0), stats.uniform(1.0, 15.0)),  # checked on exp(x)
])
def test_each_kind_follows_its_distribution(init, dist):
    x = _draw(init)
    if init.kind == "log_of_uniform":
        x = np.exp(x)
    assert stats.kstest(x, dist.cdf).pvalue > 1e-3
    assert dist.support()[0] - 1e-7 <= x.min() and x.max() <= dist.support()[1] + 1e-7


def test_mamba_dt_bias_is_softplus_inverse_of_log_uniform_dt():
    x = torch.from_numpy(_draw(Init("mamba_dt", 1e-3, 0.1)))
    dt = torch.nn.functional.softplus(x).numpy()
    assert stats.kstest(np.log(dt), stats.uniform(math.log(1e-3), math.log(0.1) - math.log(1e-3)).cdf).pvalue > 1e-3


def test_keyed_inits_match_torchs_own_initialisers():
    """Same distribution as nn.Linear's default and nn.init.trunc_normal_ (two-sample KS on 1e5 draws each)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(300, 400)
    ours = keyed_values(torch_linear(300), 3, torch.arange(lin.weight.numel())).numpy()
    assert stats.ks_2samp(ours, lin.weight.detach().reshape(-1).numpy()).pvalue > 1e-3
    ref = torch.empty(120_000)
    spec = lecun_trunc_normal(256, scale=0.5)
    torch.nn.init.trunc_normal_(ref, std=spec.std, a=spec.a, b=spec.b)
    assert stats.ks_2samp(keyed_values(spec, 4, torch.arange(120_000)).numpy(), ref.numpy()).pvalue > 1e-3


def test_values_do_not_depend_on_how_the_index_is_cut():
    """Any block of indices, in any order, in any chunking, gives the same values bit for bit (also for the
    transcendental inverse CDFs, whose kernels would otherwise differ between vector body and scalar tail)."""
    spec = lecun_trunc_normal(64)
    n = HASH_CHUNK + 1000
    whole = keyed_values(spec, 9, torch.arange(n))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    assert torch.equal(keyed_values(spec, 9, perm), whole[perm])
    for a, b in ((0, 5), (3, 70), (999, HASH_CHUNK + 7), (HASH_CHUNK - 1, n)):
        assert torch.equal(keyed_values(spec, 9, torch.arange(a, b)), whole[a:b])
    padded = keyed_values(spec, 9, torch.tensor([4, -1, 2]))
    assert padded[1] == 0 and padded[0] == whole[4] and padded[2] == whole[2]


# ------------------------------------------------------------------------------------------------ the plans


@pytest.mark.parametrize("name,variant", BACKBONES)
def test_plan_covers_every_parameter_with_the_papers_distributions(name, variant):
    torch.manual_seed(0)
    model = build_model(_cfg(name, variant), V, L)
    plan = model.init_plan()
    assert set(plan) == {n for n, _ in model.named_parameters()}
    d = model.dims.d_model
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and not ("adaLN" in n or n == "head"):
            w = plan[f"{n}.weight"]
            if variant == "mdlm":  # PyTorch's default Linear init (MDLM keeps it)
                assert (w.kind, w.b) == ("uniform", pytest.approx(1 / math.sqrt(m.in_features)))
            else:  # Flax LeCun normal, MLP scale 2 / n_layers (MD4)
                scale = 2.0 / model.dims.n_layers if ".mlp." in f".{n}." else 1.0
                assert w.kind == "trunc_normal"
                assert w.std * 0.87962566103423978 == pytest.approx(math.sqrt(scale / m.in_features))
    zeroed = [n for n in plan if "adaLN" in n or n.startswith("head.")]
    assert zeroed and all(plan[n] == Init("const", 0.0) for n in zeroed)
    emb = plan["embed.weight"]
    assert (emb.kind == "normal" and emb.std == pytest.approx(1 / math.sqrt(d))) if variant == "md4" else \
        (emb.kind == "uniform" and emb.b == pytest.approx(1 / math.sqrt(d)))
    # the values follow the plan: bounds reached, zeros where adaLN-Zero says so
    for n, p in model.named_parameters():
        spec = plan[n]
        if spec.kind == "uniform" and p.numel() > 500:
            assert p.abs().max() <= spec.b and p.abs().max() > 0.95 * spec.b, n
        if spec.kind == "const":
            assert torch.all(p == spec.a), n


def test_unet_plan_covers_every_parameter():
    model = build_model(ModelConfig(name="unet", flavor="debug", image_shape=[4, 4, 3]), 20, 48)
    plan = model.init_plan()
    assert set(plan) == {n for n, _ in model.named_parameters()}
    assert plan["head.weight"] == Init("const", 0.0) and plan["blocks.0.conv2.weight"] == Init("const", 0.0)
    assert plan["conv_in.weight"].kind == "trunc_normal"


def test_init_weights_is_keyed_by_seed_and_name():
    a = build_model(_cfg("dit"), V, L)
    a.init_weights(5)
    b = build_model(_cfg("dit"), V, L)
    b.init_weights(5)
    c = build_model(_cfg("dit"), V, L)
    c.init_weights(6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["blocks.0.attn.qkv.weight"], sc["blocks.0.attn.qkv.weight"])
    # two parameters of the same shape and distribution are not copies of each other
    assert not torch.equal(sa["blocks.0.attn.qkv.weight"], sa["blocks.1.attn.qkv.weight"])


# ------------------------------------------------------------------------------------------------ pieces


def _whole(name, variant, seed=11):
    model = build_model(_cfg(name, variant), V, L)
    model.init_weights(seed)
    return model, DeferredInit(seed, model.init_plan())


@pytest.mark.parametrize("name,variant", [("dit", "md4"), ("dimamba", "mdlm")])
@pytest.mark.parametrize("tp", [2, 4])
def test_tp_pieces_equal_the_cut_of_the_whole_tensor(name, variant, tp):
    """fill_piece from (full name, dim, index) vs tensor_parallel_layout's data cut of the initialised model;
    also every FSDP row block and ZeRO-3 flat partition (2 and 3 data-parallel ranks) of every TP-local tensor."""
    model, init = _whole(name, variant)
    full = model.state_dict()
    layout = ModelLayout.from_shapes({k: v.shape for k, v in full.items()})
    for rank in range(tp):
        local = layout.shard_state_dict(full, rank, tp)
        for local_name, want in local.items():
            f, dim, index = layout.cut(local_name, rank, tp)
            piece = Piece(f, tuple(layout.shapes[f]), tuple(want.shape), dim, index)
            got = torch.empty_like(want)
            fill_piece(got, piece, init)
            assert torch.equal(got, want), (local_name, rank, tp)
            flat = want.reshape(-1)
            for dp in (2, 3):
                rows = -(-want.shape[0] // dp)
                row = flat.numel() // max(1, want.shape[0])
                for r in range(dp):  # FSDP2: rows [r * rows, ...) of the local tensor
                    lo, hi = min(want.shape[0], r * rows), min(want.shape[0], (r + 1) * rows)
                    block = torch.empty((hi - lo, *want.shape[1:]))
                    fill_piece(block, piece, init, start=lo * row)
                    assert torch.equal(block, want[lo:hi]), (local_name, "fsdp", r)
                part = -(-flat.numel() // dp)
                for r in range(dp):  # ZeRO-3: flat [r * part, ...) of the local tensor
                    n = max(0, min(part, flat.numel() - r * part))
                    chunk = torch.empty(n)
                    fill_piece(chunk, piece, init, start=r * part)
                    assert torch.equal(chunk, flat[r * part:r * part + n]), (local_name, "zero3", r)


@pytest.mark.parametrize("name,variant,extra", [(n, v, []) for n, v in BACKBONES] + [
    ("llama", "mdlm", ["model.llama.tie_embeddings=true", "model.llama.n_kv_heads=2"]),
    ("llama", "mdlm", ["model.llama.norm=layernorm", "model.llama.mlp=gelu_tanh", "model.llama.qkv_bias=true"])])
def test_meta_build_materialised_equals_the_eager_build(name, variant, extra):
    from mdtrain.config import load_config
    from mdtrain.modeling import build_deferred, build_objective_and_model

    objective = "ar" if name == "causal" else "genmd4" if variant == "md4" else "mdlm"
    cfg = load_config(None, [f"model.name={name}", f"model.variant={variant}", "model.flavor=debug",
                             "model.mamba_d_state=8", f"objective.name={objective}", *extra])
    eager, _ = build_objective_and_model(cfg, V, V - 1, L, init_seed=99)
    meta, _, init = build_deferred(cfg, V, V - 1, L, init_seed=99)
    backbone = [n for n, _ in meta.named_parameters() if not n.startswith("objective.")]
    assert all(p.device.type == "meta" for n, p in meta.named_parameters() if n in backbone)
    assert all(p.device.type == "cpu" for n, p in meta.named_parameters() if n not in backbone)  # objective: real
    materialize_whole(meta, init, torch.device("cpu"))
    if name == "llama" and cfg.model.llama.tie_embeddings:
        assert meta.head.weight is meta.embed.weight  # the tie survives materialisation
    assert set(init.plan) == {n for n, p in meta.named_parameters() if not n.startswith("objective.")}
    want, got = eager.state_dict(), meta.state_dict()
    assert sorted(want) == sorted(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k


def test_init_full_fills_every_element_of_a_large_tensor():
    t = torch.full((3, HASH_CHUNK + 5), float("nan"))
    init_full_(t, Init("uniform", 1.0, 2.0), 3)
    assert torch.isfinite(t).all() and t.min() >= 1.0 and t.max() < 2.0
