"""GenMD4's learnable schedule: finite surrogate gradients, the RLOO estimator's unbiasedness and zero-mean
baseline checked by enumerating every mask pattern, per-token masking rates, NELBO reported apart from the surrogate."""
import itertools

import pytest
import torch

from mdtrain.objectives import ObjectiveConfig, build_objective, draw_noise


V, MASK = 5, 4


def genmd4(seed=0):
    o = build_objective(ObjectiveConfig(name="genmd4"), V, MASK)
    with torch.no_grad():
        o.schedule.w_raw.copy_(torch.randn(V, generator=torch.Generator().manual_seed(seed)))
    return o


def table_net(seed=1):
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(seed), requires_grad=True)
    pos = torch.randn(8, V, generator=torch.Generator().manual_seed(seed + 1))
    return table, (lambda x, cond: table[x] + pos[: x.shape[1]])


def test_surrogate_gradient_is_finite_and_reaches_the_powers():
    o = genmd4()
    table, net = table_net()
    x0 = torch.randint(0, V - 1, (16, 8), generator=torch.Generator().manual_seed(2))
    loss, m = o.loss(net, x0, generator=torch.Generator().manual_seed(3))
    loss.backward()
    g = o.schedule.w_raw.grad
    assert torch.isfinite(g).all() and torch.isfinite(table.grad).all()
    assert (g[:MASK] != 0).all() and g[MASK] == 0  # the mask's power is never used
    assert {"nll_sum", "tokens", "rloo_sum", "power_min", "power_max", "power_mean"} <= set(m)


def test_loss_is_the_two_sample_surrogate_and_nll_excludes_it():
    o = genmd4()
    _, net = table_net()
    x0 = torch.randint(0, V - 1, (4, 8), generator=torch.Generator().manual_seed(4))
    noise = draw_noise(o.noise_spec(8), 4, torch.Generator().manual_seed(5), o.stratified_keys)
    loss, m = o.loss(net, x0, noise=noise)
    t = 1e-3 + (1 - 1e-3) * noise["t"]
    valid = torch.ones_like(x0, dtype=torch.bool)
    with torch.no_grad():
        z = [o.corrupt(x0, t, noise[k]) for k in ("mask", "mask2")]
        ell = [o.diffusion_terms(net(zi, t.float()), x0, zi, t, valid).sum(1) for zi in z]
        lq = [o.log_q(x0, zi, t, valid) for zi in z]
        recon = o.recon(x0, valid).sum(1)
    rloo = 0.5 * (ell[0] - ell[1]) * (lq[0] - lq[1])
    nelbo = 0.5 * (ell[0] + ell[1]) + recon
    torch.testing.assert_close(float(m["nll_sum"]), float(nelbo.sum()), rtol=1e-5, atol=0)
    torch.testing.assert_close(float(m["rloo_sum"]), float(rloo.sum()), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.item(), float((nelbo + rloo).sum()) / x0.numel(), rtol=1e-5, atol=0)
    assert abs(float(m["rloo_sum"])) > 1e-3  # the surrogate's value differs from the NELBO


def test_rloo_gradient_is_unbiased_and_its_baseline_has_zero_mean():
    """Enumerate all masks z of one sequence: E_{z1,z2}[∇ surrogate] = ∇ E_z[ℓ_w(z)] (pathwise + score parts),
    and the leave-one-out baseline contributes E[ℓ(z2)·∇log q(z1)] = E[ℓ]·E[∇log q] = 0."""
    o = genmd4(seed=7)
    _, net = table_net(seed=8)
    x0 = torch.tensor([[0, 2, 3]])
    t = torch.tensor([0.4], dtype=torch.float64)
    valid = torch.ones_like(x0, dtype=torch.bool)
    pats = [torch.tensor([p]) for p in itertools.product([False, True], repeat=3)]
    zs = [torch.where(p, MASK, x0) for p in pats]
    logits = [net(z, t.float()).detach() for z in zs]
    w = o.schedule.w_raw

    def ell(k):
        return o.diffusion_terms(logits[k], x0, zs[k], t, valid).sum()

    def logq(k):
        return o.log_q(x0, zs[k], t, valid).sum()

    exact = torch.autograd.grad(sum(torch.exp(logq(k)) * ell(k) for k in range(len(zs))), w)[0]
    q = torch.stack([torch.exp(logq(k)) for k in range(len(zs))]).detach()
    assert float(q.sum()) == pytest.approx(1.0, abs=1e-6)
    surrogate = sum(q[a] * q[b] * (0.5 * (ell(a) + ell(b)) + 0.5 * (ell(a) - ell(b)).detach() * (logq(a) - logq(b)))
                    for a in range(len(zs)) for b in range(len(zs)))
    expected = torch.autograd.grad(surrogate, w)[0]
    torch.testing.assert_close(expected, exact, rtol=1e-4, atol=1e-6)
    score_mean = torch.autograd.grad(sum(q[k] * logq(k) for k in range(len(zs))), w)[0]
    assert score_mean.abs().max() < 1e-6
    assert exact.abs()[[0, 2, 3]].min() > 1e-4  # a real gradient for every token value present


def test_masking_rate_follows_each_token_values_power():
    o = build_objective(ObjectiveConfig(name="genmd4"), V, MASK)
    powers = torch.tensor([0.5, 1.0, 2.0, 4.0, 1.0])
    with torch.no_grad():
        o.schedule.w_raw.copy_(torch.log(torch.expm1(powers)))
    x0 = torch.arange(4).repeat(50000, 1)
    t = torch.full((50000,), 0.5, dtype=torch.float64)
    xt = o.corrupt(x0, t, torch.rand(50000, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64))
    rate = (xt == MASK).double().mean(0)
    torch.testing.assert_close(rate, (1 - 1e-4) * 0.5 ** powers[:4].double(), rtol=0, atol=0.01)
