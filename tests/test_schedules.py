"""Noise schedules against closed forms written here with mpmath (50 digits), finite differences, and the numbers
computed from the schedules' closed forms (MDLM's noise_schedule.py); float64 accuracy at t → 0 and t → 1."""

import mpmath as mp
import pytest
import torch

from mdtrain.objectives.schedules import NAMES, build_schedule, importance_sampling_weight


mp.mp.dps = 50

# α(t) in high precision, straight from the papers' definitions (Sahoo et al. 2024 §3 and MDLM's noise_schedule.py; Shi et al.
# 2024 §2 and MD4's schedules).
E3, E4 = mp.mpf("1e-3"), mp.mpf("1e-4")
ALPHA = {
    "loglinear": lambda t: 1 - (1 - E3) * t,
    "cosine": lambda t: E3 + (1 - E3) * mp.cos(mp.pi * t / 2),
    "cosinesqr": lambda t: E3 + (1 - E3) * mp.cos(mp.pi * t / 2) ** 2,
    "linear_sigma": lambda t: mp.exp(-(E3 + t * (7 - E3))),
    "geometric_sigma": lambda t: mp.exp(-(E3 ** (1 - t) * 1 ** t)),
    "md4_linear": lambda t: (1 - 2 * E4) * (1 - t) + E4,
    "md4_cosine": lambda t: (1 - 2 * E4) * (1 - mp.cos(mp.pi / 2 * (1 - t))) + E4,
    "md4_poly3": lambda t: (1 - 2 * E4) * (1 - t ** 3) + E4,
    "md4_poly0.5": lambda t: (1 - 2 * E4) * (1 - mp.sqrt(t)) + E4,
}
TIMES = ["0", "1e-12", "1e-6", "0.1", "0.5", "0.9", "0.999999", "0.999999999999", "1"]


def _rel(a, b):
    b = mp.mpf(b)
    return abs(mp.mpf(float(a)) - b) / max(abs(b), mp.mpf("1e-300"))


@pytest.mark.parametrize("name", sorted(ALPHA))
def test_schedule_matches_high_precision_closed_form(name):
    sch = build_schedule(name)
    alpha = ALPHA[name]
    for ts in TIMES:
        t = mp.mpf(float(ts))  # exactly the float64 input (1 − t must not differ from the code's)
        if name == "md4_poly0.5" and t == 0:
            continue  # α′ is infinite at 0 for K < 1
        tt = torch.tensor(float(t), dtype=torch.float64)
        a, da = alpha(t), mp.diff(alpha, t) if 0 < t < 1 else None
        assert _rel(sch.alpha(tt), a) < 1e-12, (name, ts)
        assert _rel(sch.mask_prob(tt), 1 - a) < 1e-12, (name, ts)
        assert _rel(sch.sigma(tt), -mp.log(a)) < 1e-10, (name, ts)
        if da is not None:
            assert _rel(sch.dalpha(tt), da) < 1e-10, (name, ts)
            assert _rel(sch.weight(tt), da / (1 - a)) < 1e-9, (name, ts)
            assert _rel(sch.dsigma(tt), -da / a) < 1e-9, (name, ts)


def test_mask_prob_keeps_relative_accuracy_near_zero():
    """1 − α at t = 1e-12 is ~1e-12 (MDLM) or ε + tiny (MD4): no cancellation against α ≈ 1."""
    t = torch.tensor(1e-12, dtype=torch.float64)
    assert _rel(build_schedule("loglinear").mask_prob(t), (1 - E3) * mp.mpf("1e-12")) < 1e-14
    assert _rel(build_schedule("cosine").mask_prob(t), (1 - E3) * (1 - mp.cos(mp.pi * mp.mpf("1e-12") / 2))) < 1e-12
    assert float(build_schedule("loglinear").weight(t)) == pytest.approx(-1e12, rel=1e-14)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "md4_polyK"] + ["md4_poly2", "md4_poly0.5"])
def test_derivatives_match_finite_differences(name):
    sch = build_schedule(name)
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-6
    fd_alpha = (sch.alpha(t + h) - sch.alpha(t - h)) / (2 * h)
    fd_sigma = (sch.sigma(t + h) - sch.sigma(t - h)) / (2 * h)
    torch.testing.assert_close(sch.dalpha(t), fd_alpha, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(sch.dsigma(t), fd_sigma, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(sch.weight(t), sch.dalpha(t) / (1 - sch.alpha(t)), rtol=1e-10, atol=0)


def test_mdlm_reference_numbers():
    """Values of the loglinear / cosine schedules, worked out by hand from their closed forms."""
    ll = build_schedule("loglinear")
    t = torch.tensor([1e-3, 0.01, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    torch.testing.assert_close(ll.dsigma(t) / torch.expm1(ll.sigma(t)), 1 / t, rtol=1e-12, atol=0)
    torch.testing.assert_close(-ll.weight(t), 1 / t, rtol=1e-12, atol=0)
    mc = 1 - torch.exp(-ll.sigma(torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)))
    torch.testing.assert_close(mc, torch.tensor([0.0999, 0.4995, 0.999], dtype=torch.float64), rtol=1e-9, atol=0)
    assert ll.sigma_max == pytest.approx(6.9078, abs=1e-4) and ll.sigma_min == pytest.approx(1e-3)
    u = torch.tensor([0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    torch.testing.assert_close(ll.importance_sampling_t(u),
                               torch.tensor([0.0010, 0.0056, 0.0316, 0.178, 1.0], dtype=torch.float64),
                               rtol=2e-2, atol=0)
    tt = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(build_schedule("cosine").dsigma(tt),
                               torch.tensor([0.2485, 1.5686, 9.8546], dtype=torch.float64), rtol=0, atol=1e-4)
    torch.testing.assert_close(build_schedule("cosinesqr").dsigma(tt),
                               torch.tensor([0.4971, 3.1353, 19.0558], dtype=torch.float64), rtol=0, atol=1e-4)


def test_md4_linear_weight_is_finite_at_zero():
    """MD4's linear schedule with its ε: w(t) = −(1−2ε)/(ε + (1−2ε)t), about −9998 at t = 0."""
    w = build_schedule("md4_linear").weight(torch.tensor(0.0, dtype=torch.float64))
    assert float(w) == pytest.approx(-(1 - 2e-4) / 1e-4, rel=1e-12)


def test_importance_sampling_is_an_exact_change_of_variables():
    """With t = IS(u), the integrand weight α′(t)·dt/du/(1−α) is the constant f_0 − f_T."""
    for name in ("loglinear", "linear_sigma"):
        sch = build_schedule(name)
        u = torch.linspace(0.01, 0.99, 11, dtype=torch.float64)
        h = 1e-6
        dtdu = (sch.importance_sampling_t(u + h) - sch.importance_sampling_t(u - h)) / (2 * h)
        w = sch.weight(sch.importance_sampling_t(u)) * dtdu
        torch.testing.assert_close(w, torch.full_like(w, importance_sampling_weight(sch)), rtol=1e-6, atol=0)


def test_build_schedule_errors_name_the_fix():
    with pytest.raises(ValueError, match="linear_sigma"):
        build_schedule("linear")
    with pytest.raises(ValueError, match="md4_poly3"):
        build_schedule("md4_poly")
    with pytest.raises(ValueError, match="sigma_min"):
        build_schedule("loglinear", sigma_min=0.1)
    assert build_schedule("md4_poly3", eps=0.0).eps == 0.0
    assert build_schedule("linear_sigma", sigma_max=10.0).sigma_max == 10.0
