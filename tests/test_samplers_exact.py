"""First-hitting, ReMDM and LLaDA's random-order sampler against a known target: with the exact posterior of a small
explicit joint as the network they must reproduce the joint (total variation at a fixed seed), a network that
ignores context must not; their reveal (and remask) rates must keep the forward process's marginals; ReMDM at
strength 0 is ddpm token for token."""
import math

import pytest
import torch

from mdtrain.objectives import ObjectiveConfig, build_objective
from mdtrain.objectives.samplers import sample
from mdtrain.objectives.samplers.common import time_for_mask_prob
from mdtrain.objectives.samplers.masked import time_grid
from mdtrain.objectives.schedules import build_schedule
from mdtrain.objectives.toy import ExactJoint

NT, L = 3, 3
MASK, VOCAB = NT, NT + 1
JOINT = ExactJoint.random(NT, L, seed=0, vocab_size=VOCAB, mask_id=MASK)
N = 4000
TV_MAX = 0.06  # ~2x the TV of N exact draws from a 27-cell distribution (tests/test_samplers.py)


def objective(name, **kw):
    return build_objective(ObjectiveConfig(name=name, **kw), VOCAB, MASK)


def net(name):
    offset = math.log(VOCAB - 1) if name == "sedd" else 0.0
    return lambda x, cond: JOINT.denoiser(x, cond, offset=offset)


def marginal_net(x, cond):
    """Negative control: per-position marginals whatever the context (samples the product distribution)."""
    return JOINT.denoiser(torch.full_like(x, MASK), cond)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


EXACT = [
    ("mdlm", "first_hitting", 0, {}),
    ("md4", "first_hitting", 0, {}),
    ("sedd", "first_hitting", 0, {}),
    ("mdlm", "remdm", 200, {"remdm_schedule": "cap", "remdm_eta": 0.1}),
    ("mdlm", "remdm", 200, {"remdm_schedule": "rescale", "remdm_eta": 0.5}),
    ("mdlm", "remdm", 200, {"remdm_schedule": "conf"}),
    ("mdlm", "remdm", 200, {"remdm_schedule": "loop", "remdm_eta": 0.2}),
    ("md4", "remdm", 200, {"remdm_schedule": "rescale", "remdm_eta": 0.3, "grid": "cosine"}),
    # one token per step in a uniformly random order = any-order autoregression: exact
    ("mdlm", "llada", L, {"remasking": "random", "temperature": 1.0}),
    ("mdlm", "llada", L, {"remasking": "random", "temperature": 1.0, "block_length": 2}),
]


@pytest.mark.parametrize("name,sampler,steps,opts", EXACT)
def test_exact_samplers_reproduce_the_joint_and_catch_a_wrong_denoiser(name, sampler, steps, opts):
    o = objective(name)
    x, info = sample(o, net(name), N, L, steps, gen(), sampler=sampler, **opts)
    assert x.shape == (N, L) and (x < NT).all()
    assert JOINT.tv(x) < TV_MAX, JOINT.tv(x)
    y, _ = sample(o, marginal_net, N, L, steps, gen(), sampler=sampler, **opts)
    assert JOINT.tv(y) > 2 * TV_MAX, JOINT.tv(y)


def test_first_hitting_makes_one_call_per_token_and_groups_fewer():
    x, info = sample(objective("mdlm"), net("mdlm"), 64, L, 0, gen(1), sampler="first_hitting")
    assert (info["nfe_per_sample"] == L).all() and info["nfe"] == L  # every call reveals one token per sequence
    template = torch.tensor([MASK, 2, MASK])
    x, info = sample(objective("mdlm"), net("mdlm"), N, L, 0, gen(2), sampler="first_hitting", prefix=template)
    assert (x[:, 1] == 2).all() and (info["nfe_per_sample"] == 2).all()
    cond = JOINT.p * (JOINT.seqs[:, 1] == 2)
    assert JOINT.tv(x, cond / cond.sum()) < TV_MAX
    x, info = sample(objective("mdlm"), net("mdlm"), 64, L, 0, gen(3), sampler="first_hitting", tokens_per_call=2)
    assert (info["nfe_per_sample"] == math.ceil(L / 2)).all() and (x < NT).all()
    # the token revealed first sits at a uniformly random position (any fixed order would also be exact for an
    # exact denoiser, so the TV test cannot see this)
    states = []
    sample(objective("mdlm"), lambda x, c: states.append(x.clone()) or JOINT.denoiser(x, c), N, L, 0, gen(9),
           sampler="first_hitting")
    first = (states[1] != MASK).double().sum(0)
    assert float(((first - N / L) ** 2 / (N / L)).sum()) < 13.8  # chi-square, 2 dof, p = 0.001


@pytest.mark.parametrize("name,schedule", [("mdlm", "loglinear"), ("mdlm", "cosine"), ("md4", "md4_linear"),
                                           ("md4", "md4_cosine")])
def test_first_hitting_times_are_exact_and_reach_a_time_conditioned_network(name, schedule):
    """With n masks at time t the first reveal happens at s with (m(s)/m(t))^n ~ U(0, 1), m = 1 − α; the
    network must see that s. Check the first call's time (read back from the cond it receives) is so
    distributed: a Kolmogorov-Smirnov distance well inside the 1%-level bound 1.63/sqrt(n)."""
    o = objective(name, schedule=schedule, time_conditioning=True)
    seen = []

    def recording_net(x, cond):
        seen.append((int((x == MASK).sum(1)[0]), cond.double().clone()))
        return JOINT.denoiser(x, cond)

    sample(o, recording_net, 2000, L, 0, gen(4), sampler="first_hitting")
    n, cond = seen[0]
    assert n == L
    # invert the conditioning: sigma(t) (mdlm) or t (md4) -> m(t)
    if name == "mdlm":
        m = -torch.expm1(-cond)  # 1 − α = 1 − exp(−σ)
    else:
        m = o.schedule.mask_prob(cond)
    m1 = float(o.schedule.mask_prob(torch.tensor(1.0, dtype=torch.float64)))

    def ks_uniform(v):
        v, _ = torch.sort(v)
        ecdf = torch.arange(1, v.numel() + 1, dtype=torch.float64) / v.numel()
        return float(torch.maximum((ecdf - v).abs(), (ecdf - 1 / v.numel() - v).abs()).max())

    bound = 1.63 / math.sqrt(m.numel())
    assert ks_uniform((m / m1) ** L) < bound
    # the statistic tells the exact law from its neighbours (the clock of n − 1 or n + 1 tokens)
    assert ks_uniform((m / m1) ** (L - 1)) > 2 * bound and ks_uniform((m / m1) ** (L + 1)) > 2 * bound


@pytest.mark.parametrize("sampler,opts", [
    ("first_hitting", {}),
    ("remdm", {"remdm_schedule": "cap", "remdm_eta": 0.2}),
    ("remdm", {"remdm_schedule": "rescale", "remdm_eta": 0.7}),
])
def test_remasking_and_first_hitting_keep_the_forward_marginal(sampler, opts):
    """Stopped at t = 0.3, the fraction still masked is the forward process's 1 − α(t) (ReMDM, Wang et al. 2025,
    Prop. 3.1: remasking keeps the marginals; first hitting: its event times are exact)."""
    o = objective("mdlm")
    x, info = sample(o, net("mdlm"), N, L, 100, gen(5), sampler=sampler, t_min=0.3, noise_removal="none", **opts)
    t_end = 0.3 if sampler == "first_hitting" else time_grid(100, 0.3, "uniform")[-1]
    p = float(o.schedule.mask_prob(torch.tensor(float(t_end), dtype=torch.float64)))
    frac = float((x == MASK).double().mean())
    assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / x.numel()), (frac, p)


def test_remdm_loop_holds_alpha_during_the_loop():
    """In (t_off, t_on] ReMDM-loop keeps α at alpha_on: remasked tokens balance revealed ones."""
    o = objective("mdlm")
    x, _ = sample(o, net("mdlm"), N, L, 100, gen(6), sampler="remdm", remdm_schedule="loop", remdm_eta=0.3,
                  remdm_alpha_on=0.7, t_min=0.3, noise_removal="none")
    p = 1 - 0.7
    frac = float((x == MASK).double().mean())
    assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / x.numel()), frac


@pytest.mark.parametrize("name,schedule,grid,opts", [
    ("mdlm", "cap", "uniform", {}),
    ("mdlm", "rescale", "uniform", {"top_p": 0.9}),
    ("mdlm", "conf", "uniform", {}),
    ("md4", "cap", "cosine", {"prefix": torch.tensor([MASK, 1, MASK])}),
    ("mdlm", "rescale", "uniform", {"stride_length": 1, "num_strides": 2}),
])
def test_remdm_at_strength_zero_is_ddpm_token_for_token(name, schedule, grid, opts):
    o = objective(name)
    calls = {"n": 0}

    def counting(x, cond):
        calls["n"] += 1
        return net(name)(x, cond)

    a, ia = sample(o, counting, 500, L, 50, gen(7), sampler="ddpm", grid=grid, **opts)
    b, ib = sample(o, counting, 500, L, 50, gen(7), sampler="remdm", remdm_schedule=schedule, remdm_eta=0.0,
                   grid=grid, **opts)
    assert torch.equal(a, b) and ia["nfe"] == ib["nfe"] and torch.equal(ia["nfe_per_sample"], ib["nfe_per_sample"])
    # and a positive strength does change them (the comparison can fail)
    c, _ = sample(o, counting, 500, L, 50, gen(7), sampler="remdm", remdm_schedule=schedule, remdm_eta=0.5,
                  grid=grid, **opts)
    assert not torch.equal(a, c)


def test_remdm_never_remasks_given_tokens():
    o = objective("mdlm")
    given = torch.tensor([2, MASK, MASK])
    seen_given = []

    def watching(x, cond):
        seen_given.append(bool((x[:, 0] == 2).all()))
        return JOINT.denoiser(x, cond)

    x, _ = sample(o, watching, N, L, 100, gen(8), sampler="remdm", remdm_schedule="rescale", remdm_eta=0.9,
                  prefix=given)
    assert all(seen_given) and (x[:, 0] == 2).all()
    cond = JOINT.p * (JOINT.seqs[:, 0] == 2)
    assert JOINT.tv(x, cond / cond.sum()) < TV_MAX


@pytest.mark.parametrize("name,eps", [("loglinear", 1e-3), ("cosine", 1e-3), ("md4_linear", 1e-4),
                                      ("md4_cosine", 1e-4), ("linear_sigma", None)])
def test_time_for_mask_prob_inverts_the_schedule(name, eps):
    sched = build_schedule(name, eps=eps)
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    m = sched.mask_prob(t)
    back = time_for_mask_prob(sched, m)
    assert torch.allclose(sched.mask_prob(back), m, rtol=1e-12, atol=1e-15)
    if name == "loglinear":  # closed form: m = (1 − ε)t
        assert torch.allclose(time_for_mask_prob(sched, m), m / (1 - eps), rtol=1e-12, atol=1e-15)


def test_new_samplers_reject_what_they_cannot_do():
    with pytest.raises(ValueError, match="first_hitting needs one masking schedule"):
        sample(objective("genmd4"), net("mdlm"), 2, L, 10, gen(), sampler="first_hitting")
    with pytest.raises(ValueError, match="remdm needs"):
        sample(objective("d3pm"), net("mdlm"), 2, L, 10, gen(), sampler="remdm")
    with pytest.raises(ValueError, match="remdm loop needs"):
        sample(objective("mdlm"), net("mdlm"), 2, L, 10, gen(), sampler="remdm", remdm_schedule="loop",
               remdm_t_on=0.1, remdm_t_off=0.2)
    with pytest.raises(ValueError, match="does not use threshold"):
        sample(objective("mdlm"), net("mdlm"), 2, L, 10, gen(), sampler="ddpm", threshold=0.5)
    with pytest.raises(ValueError, match="does not use remdm_eta"):
        sample(objective("mdlm"), net("mdlm"), 2, L, 10, gen(), sampler="first_hitting", remdm_eta=0.1)
    with pytest.raises(ValueError, match="guidance needs a condition"):
        sample(objective("mdlm"), net("mdlm"), 2, L, 10, gen(), sampler="ddpm", guidance=1.0)
    with pytest.raises(ValueError, match="at least one step per block"):
        sample(objective("mdlm"), net("mdlm"), 2, L, 1, gen(), sampler="llada", block_length=1)


@pytest.mark.parametrize("sampler,steps", [("ddpm", 20), ("ddpm_cache", 20), ("first_hitting", 0), ("remdm", 20),
                                           ("llada", 6), ("fast_dllm", 0)])
def test_every_masked_sampler_reads_shifted_logits_one_row_late(sampler, steps):
    """objective.shift: the logits at row i score position i + 1. A network whose row i is sure of token
    (i + 1) mod 3 must give token j mod 3 at every position j ≥ 1 (and the first token is the given BOS)."""
    o = build_objective(ObjectiveConfig(name="mdlm", shift=True), VOCAB, MASK)

    def fn(x, cond):
        rows = torch.arange(x.shape[1])
        out = torch.full((*x.shape, VOCAB), -30.0)
        out[:, rows, (rows + 1) % NT] = 30.0
        return out

    with pytest.raises(ValueError, match="give the first token"):
        sample(o, fn, 2, 6, steps, gen(), sampler=sampler)
    x, _ = sample(o, fn, 2, 6, steps, gen(), sampler=sampler, bos_id=2)
    assert (x[:, 0] == 2).all() and torch.equal(x[:, 1:], (torch.arange(1, 6) % NT).expand(2, 5))
