"""Samplers against a known target: with the exact posterior of a small explicit joint as the network, the samples'
empirical distribution must match the joint (total variation at a fixed seed); a deliberately wrong network must
not. ddpm_cache gives the same samples as ddpm with far fewer network evaluations, also at batch > 1."""
import math

import pytest
import torch

from mdtrain.objectives import ObjectiveConfig, build_objective
from mdtrain.objectives.samplers import sample
from mdtrain.objectives.samplers.categorical import categorical, nucleus
from mdtrain.objectives.samplers.masked import time_grid
from mdtrain.objectives.toy import CachedAR, ExactJoint


NT, L = 3, 3
MASK, VOCAB = NT, NT + 1
JOINT = ExactJoint.random(NT, L, seed=0, vocab_size=VOCAB, mask_id=MASK)
N = 4000
TV_MAX = 0.06  # ~2x the TV of N exact draws from a 27-cell distribution


def objective(name, **kw):
    return build_objective(ObjectiveConfig(name=name, **kw), VOCAB, MASK)


def net(name):
    offset = math.log(VOCAB - 1) if name == "sedd" else 0.0
    return lambda x, cond: JOINT.denoiser(x, cond, offset=offset)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_exact_draws_set_the_scale():
    assert JOINT.tv(JOINT.draw(N, gen(1))) < TV_MAX / 1.5


@pytest.mark.parametrize("name,sampler,opts", [
    ("mdlm", "ddpm", {}),
    ("mdlm", "ddpm_cache", {}),
    ("mdlm", "ddpm_cache", {"grid": "cosine"}),
    ("md4", "ancestral", {}),
    ("mdlm", "analytic", {}),
    ("sedd", "analytic", {}),
    ("sedd", "ddpm", {}),
    ("d3pm", "ddpm", {}),
    ("genmd4", "ddpm", {}),
    ("mdlm", "ddpm_cache", {"noise_removal": "ancestral"}),
])
def test_masked_samplers_reproduce_the_joint(name, sampler, opts):
    o = objective(name)
    x, info = sample(o, net(name), N, L, 200, gen(), sampler=sampler, **opts)
    assert x.shape == (N, L) and (x < NT).all()
    assert JOINT.tv(x) < TV_MAX, JOINT.tv(x)
    assert info["nfe"] >= 1 and info["nfe_per_sample"].shape == (N,)


def test_a_wrong_denoiser_is_caught():
    """Negative control: per-position marginals (ignoring context) sample the product distribution."""
    def marginal_net(x, cond):
        return JOINT.denoiser(torch.full_like(x, MASK), cond)

    x, _ = sample(objective("mdlm"), marginal_net, N, L, 200, gen())
    assert JOINT.tv(x) > 2 * TV_MAX


def test_ddpm_cache_same_samples_far_fewer_evaluations_at_batch_gt_1():
    o = objective("mdlm")
    calls = {"rows": 0}

    def counting_net(x, cond):
        calls["rows"] += x.shape[0]
        return JOINT.denoiser(x, cond)

    x1, i1 = sample(o, counting_net, 512, L, 300, gen(3), sampler="ddpm")
    rows_ddpm, calls["rows"] = calls["rows"], 0
    x2, i2 = sample(o, counting_net, 512, L, 300, gen(3), sampler="ddpm_cache")
    # same generator stream, same network outputs -> the very same samples
    assert torch.equal(x1, x2)
    assert i2["nfe_per_sample"].max() <= L + 1  # tokens never re-mask: at most one evaluation per change + 1
    assert calls["rows"] == int(i2["nfe_per_sample"].sum()) < rows_ddpm / 20
    assert int(i1["nfe_per_sample"].sum()) == rows_ddpm


def test_ddpm_cache_evaluates_every_step_when_the_network_sees_time():
    o = objective("mdlm", time_conditioning=True)
    x1, i1 = sample(o, net("mdlm"), 64, L, 50, gen(4), sampler="ddpm")
    x2, i2 = sample(o, net("mdlm"), 64, L, 50, gen(4), sampler="ddpm_cache")
    assert torch.equal(x1, x2) and torch.equal(i1["nfe_per_sample"], i2["nfe_per_sample"])


def test_infilling_keeps_given_tokens_and_samples_the_conditional():
    o = objective("mdlm")
    template = torch.tensor([MASK, 2, MASK])
    x, _ = sample(o, net("mdlm"), N, L, 200, gen(5), prefix=template)
    assert (x[:, 1] == 2).all()
    cond = JOINT.p * (JOINT.seqs[:, 1] == 2)
    assert JOINT.tv(x, cond / cond.sum()) < TV_MAX
    x, _ = sample(o, net("mdlm"), 16, L, 20, gen(6), template=torch.tensor([[1]]).expand(16, 1))
    assert (x[:, 0] == 1).all()


@pytest.mark.parametrize("stride,strides", [(1, 2), (2, 1)])
def test_semi_autoregressive_extends_a_markov_chain_exactly(stride, strides):
    """Windows of a stationary Markov chain: conditioning each new window on the overlap gives the longer chain."""
    P = torch.tensor([[0.85, 0.15], [0.3, 0.7]])
    window = ExactJoint.markov(P, L, vocab_size=3, mask_id=2)
    total = L + stride * strides
    target = ExactJoint.markov(P, total, vocab_size=3, mask_id=2)
    o = build_objective(ObjectiveConfig(name="mdlm"), 3, 2)
    x, info = sample(o, window.denoiser, N, L, 200, gen(7), sampler="ddpm_cache", stride_length=stride,
                     num_strides=strides)
    assert x.shape == (N, total)
    assert target.tv(x) < TV_MAX, target.tv(x)
    assert info["nfe_per_sample"].max() <= (strides + 1) * (L + 1)


def test_ar_sampler_with_and_without_kv_cache():
    bos = NT
    joint = ExactJoint(JOINT.p, NT, L, vocab_size=NT + 2, mask_id=NT + 1, bos_id=bos)
    o = build_objective(ObjectiveConfig(name="ar"), NT + 2, NT + 1)
    cached = CachedAR(joint)
    x1, i1 = sample(o, cached, N, L + 1, 0, gen(8), sampler="auto", bos_id=bos)
    x2, i2 = sample(o, joint.ar_logits, N, L + 1, 0, gen(8), sampler="ar", bos_id=bos)
    assert torch.equal(x1, x2) and (x1[:, 0] == bos).all()
    assert cached.decode_calls == i1["nfe"] == L and cached.calls == 0 and i2["nfe"] == L
    assert joint.tv(x1[:, 1:]) < TV_MAX
    # prefix: the given first real token is kept and the rest follows p(x | x_1)
    x3, _ = sample(o, cached, N, L + 1, 0, gen(9), prefix=torch.tensor([bos, 1]))
    cond = joint.p * (joint.seqs[:, 0] == 1)
    assert (x3[:, 1] == 1).all() and joint.tv(x3[:, 1:], cond / cond.sum()) < TV_MAX
    # nucleus: with a tiny top_p only the most likely first token survives
    x4, _ = sample(o, cached, 200, L + 1, 0, gen(10), top_p=1e-3, bos_id=bos)
    first = torch.stack([(joint.p * (joint.seqs[:, 0] == v)).sum() for v in range(NT)]).argmax()
    assert (x4[:, 1] == first).all()
    with pytest.raises(ValueError, match="BOS"):
        sample(o, cached, 2, L + 1, 0, gen())


def test_nucleus_and_float64_categorical():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64))
    kept = torch.isfinite(nucleus(logits, 0.75))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(nucleus(logits, 0.85)).sum() == 3 and torch.isfinite(nucleus(logits, 1.0)).all()
    p = torch.tensor([0.7, 0.2999, 1e-4], dtype=torch.float64)
    draws = categorical(torch.log(p).expand(200000, 3), gen(11))
    counts = torch.bincount(draws, minlength=3).double()
    expect = 200000 * p
    assert ((counts - expect).abs() <= 4 * expect.sqrt()).all(), counts
    assert categorical(torch.tensor([[0.0, -math.inf]]).expand(1000, 2), gen(12)).eq(0).all()


def test_sampler_arguments_are_checked():
    o = objective("mdlm")
    with pytest.raises(ValueError, match="does not fit"):
        sample(o, net("mdlm"), 2, L, 10, gen(), sampler="ar")
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(o, net("mdlm"), 2, L, 10, gen(), sampler="maskgit")
    with pytest.raises(ValueError, match="analytic"):
        sample(objective("genmd4"), net("mdlm"), 2, L, 10, gen(), sampler="analytic")
    with pytest.raises(ValueError, match="semi-AR"):
        sample(o, net("mdlm"), 2, L, 10, gen(), stride_length=1)
    x, info = sample(o, net("mdlm"), 3, L, 10, gen(), noise_removal="none", t_min=0.5)
    assert (x == MASK).any() and info["t_min"] == 0.5  # stopped half way, masks left in place


def test_analytic_tau_leaping_is_the_exact_posterior_for_an_exact_denoiser():
    """With normalised scores k·p_θ, SEDD's staggered-score step reveals with probability
    expm1(Δσ)/expm1(σ_t) = (α_s − α_t)/(1 − α_t): the ddpm step. Same stream -> (nearly) the same samples."""
    x1, _ = sample(objective("mdlm"), net("mdlm"), 1000, L, 50, gen(13), sampler="ddpm", noise_removal="ancestral")
    x2, _ = sample(objective("sedd"), net("sedd"), 1000, L, 50, gen(13), sampler="analytic")
    assert (x1 == x2).all(1).double().mean() > 0.99


@pytest.mark.parametrize("name,sampler", [("mdlm", "ddpm"), ("mdlm", "ddpm_cache"), ("md4", "ancestral"),
                                          ("mdlm", "analytic"), ("d3pm", "ddpm"), ("sedd", "analytic")])
def test_reverse_process_has_the_forward_marginal_at_every_time(name, sampler):
    """Stopped at time t, the fraction of still-masked tokens is the forward process's 1 − α(t): the reveal
    probabilities follow the schedule (the token values alone cannot show this with an exact denoiser)."""
    o = objective(name)
    x, info = sample(o, net(name), N, L, 100, gen(14), sampler=sampler, t_min=0.3, noise_removal="none")
    t_end = time_grid(100, 0.3, info["grid"])[-1]
    p = float(o.schedule.mask_prob(t_end))
    frac = float((x == MASK).double().mean())
    assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / x.numel()), (frac, p)
