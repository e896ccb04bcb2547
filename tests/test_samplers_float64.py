"""Categorical draws in float64, and the float32 Gumbel pitfall (Zheng et al. 2024, arXiv 2409.02908, §5).

A Gumbel-max draw picks argmax(l + g), g = −log(−log u). float32 uniforms sit on a 2^-24 grid, so g ≤ 16.6 and a
class whose weight is below ~e^-17 of the leader's is (almost) never drawn — in the reference's ddpm step (the
mask class against tokens weighted by Δα ≈ 1e-3) that silently truncates the token distribution's tail. Drawing
such rare events directly would take ~10^9 draws, so the check below reaches them by importance sampling: it
forces one tail class's uniform into the top 2^-20 of [0, 1) and reweights. The float64 draw matches the exact
probability; the same estimate for a float32 Gumbel-max (on float32's uniform grid) is off by >2x.
"""
import math

import torch

from mdtrain.objectives.samplers.categorical import categorical, gumbel_argmax, uniform

DELTA, K = 18.0, 64  # K tail classes, each e^-18 of the head: the region float32 cannot reach
EPS = 2.0 ** -20     # the forced uniform lies in [1 − EPS, 1)


def tail_probability(draw, n=100_000, seed=0) -> float:
    """Unbiased importance-sampling estimate of P(argmax ∈ tail) for logits [0, −Δ × K] under ``draw(logits, u)``.

    Proposal: one tail class j (uniform) gets u_j ~ U[1 − EPS, 1), the rest U[0, 1); weight K·EPS / #(tail u's in
    the top region). Outcomes with no tail uniform in the top region are left out: there every tail noise is
    below −log(EPS) = 13.9, which beats the head only if the head's noise is below 13.9 − Δ = −4.1, i.e.
    u_head < exp(−e^4.1) ≈ 1e-27."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.cat([torch.zeros(1), torch.full((K,), -DELTA)]).double().expand(n, K + 1)
    u = torch.rand(n, K + 1, generator=g, dtype=torch.float64)
    j = torch.randint(1, K + 1, (n,), generator=g)
    v = 1 - torch.rand(n, generator=g, dtype=torch.float64)  # (0, 1]
    u[torch.arange(n), j] = 1 - EPS * v
    top = (u[:, 1:] >= 1 - EPS).sum(1).double()
    won = draw(logits, u) > 0
    return float((won.double() * K * EPS / top).mean())


EXACT = K * math.exp(-DELTA) / (1 + K * math.exp(-DELTA))


def float32_grid(u):
    """What torch.rand(dtype=float32) would have produced from the same draw: u truncated to the 2^-24 grid."""
    return torch.floor(u * 2.0 ** 24) / 2.0 ** 24


def float32_gumbel_max(logits, u):
    u32 = float32_grid(u).float()
    return (logits.float() - torch.log(-torch.log(u32))).argmax(-1)


def test_float64_gumbel_max_reaches_the_tail_float32_does_not():
    ours = tail_probability(gumbel_argmax)
    assert abs(ours / EXACT - 1) < 0.1, (ours, EXACT)  # ~1600 weighted hits: 4 standard deviations
    # the same estimate for float32 Gumbel-max: float32 arithmetic, or float64 arithmetic on float32 uniforms
    f32 = tail_probability(float32_gumbel_max)
    f32_uniforms = tail_probability(lambda logits, u: gumbel_argmax(logits, float32_grid(u)))
    assert f32 < EXACT / 2 and f32_uniforms < EXACT / 2, (f32, f32_uniforms, EXACT)


def test_categorical_is_gumbel_max_of_float64_uniforms_off_the_float32_grid():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2000, 50, generator=g, dtype=torch.float64) * 1e-3  # near-ties: any other noise differs
    state = g.get_state()
    drawn = categorical(logits.float(), g)
    g.set_state(state)
    assert torch.equal(drawn, gumbel_argmax(logits.float(), torch.rand(logits.shape, generator=g,
                                                                        dtype=torch.float64)))
    # the uniforms resolve below float32's 2^-24 spacing (which is what caps float32's noise at 16.6)
    u = uniform(100_000, torch.Generator().manual_seed(2), "cpu")
    assert u.dtype == torch.float64 and float(((u * 2.0 ** 24) % 1 != 0).double().mean()) > 0.99
    u32 = torch.rand(100_000, generator=torch.Generator().manual_seed(2)).double()
    assert float(((u32 * 2.0 ** 24) % 1 != 0).double().mean()) == 0.0  # the check tells float32 apart


def test_categorical_matches_a_peaked_large_vocabulary():
    """End to end through the generator: one class holds half the mass, 2047 others share the rest (∝ 1/rank,
    down to ~7e-5 each); the head and 8 tail bins of equal mass, chi-square with 8 dof at p = 0.001."""
    V, n = 2048, 3000
    tail = 1.0 / torch.arange(1, V, dtype=torch.float64)
    p = torch.cat([torch.tensor([0.5], dtype=torch.float64), 0.5 * tail / tail.sum()])
    before = (torch.cumsum(p, 0) - p - 0.5).clamp_min(0)  # tail mass of the more likely tail classes
    bin_of = torch.where(torch.arange(V) == 0, 0, 1 + torch.clamp((before / 0.5 * 8).floor().long(), max=7))
    mass = torch.zeros(9, dtype=torch.float64).scatter_add_(0, bin_of, p)

    def chi2(temperature):
        draws = categorical(torch.log(p).expand(n, V) / temperature, torch.Generator().manual_seed(3))
        counts = torch.bincount(bin_of[draws], minlength=9).double()
        return float(((counts - n * mass) ** 2 / (n * mass)).sum())

    assert chi2(1.0) < 26.1
    assert chi2(0.9) > 26.1  # a 10% lower temperature — what truncating the tail amounts to — is caught
