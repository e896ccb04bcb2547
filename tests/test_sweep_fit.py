"""Scaling-law analysis: each fitter recovers parameters planted in synthetic data; the report is written (tables
with the fitted numbers, valid PNGs, CSV) and says what is missing instead of crashing on too little data."""
import csv
import json
import math
import struct

import numpy as np
import pytest

from mdtrain.sweep import (analyze, clean_rows, compute_multiplier, fit_isoflop, fit_loss_vs_compute,
                           fit_parametric, fit_power_law, load_rows, write_report)
from mdtrain.sweep.report import fmt

# Chinchilla-like truth for L(N, D) = E + A/N^α + B/D^β (Epoch's refit of Chinchilla, rounded)
TRUE = dict(E=1.8, A=400.0, B=2000.0, alpha=0.34, beta=0.37)


def chinchilla_loss(n, d, E=TRUE["E"], A=TRUE["A"], B=TRUE["B"], alpha=TRUE["alpha"], beta=TRUE["beta"]):
    return E + A / np.asarray(n, float) ** alpha + B / np.asarray(d, float) ** beta


def true_n_opt(c):
    """Closed-form compute-optimal N under C = 6ND for TRUE (Hoffmann et al. eq. 4), written out independently."""
    a, b = TRUE["alpha"], TRUE["beta"]
    g = (a * TRUE["A"] / (b * TRUE["B"])) ** (1 / (a + b))
    return g * (np.asarray(c, float) / 6) ** (b / (a + b))


def sweep_rows(budgets, n_sizes=7, spread=8.0, noise=0.002, factor=16.0, seed=0):
    """Rows of a synthetic AR + MDLM sweep whose MDLM needs exactly ``factor``× the compute of AR for any loss:
    L_mdlm(N, D) = L_ar(N, D/factor), so along C = 6ND the MDLM frontier is the AR frontier at C/factor.
    Each budget's sizes span ``spread``× either side of that objective's true optimum."""
    rng = np.random.default_rng(seed)
    rows = []
    for obj, fac in (("ar", 1.0), ("mdlm", factor)):
        for c in budgets:
            for n in true_n_opt(c / fac) * np.geomspace(1 / spread, spread, n_sizes):
                d = c / (6 * n)
                loss = float(chinchilla_loss(n, d / fac) * math.exp(rng.normal(0, noise)))
                rows.append(dict(objective=obj, flavor=f"n{n:.3g}", params_total=1.25 * n, params_nonembed=n,
                                 budget_flops=c, steps=int(d // 65536), tokens=d, loss=loss, wall_s=12.5,
                                 commit="0123abc"))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Parametric fit (Chinchilla approach 3)
# ---------------------------------------------------------------------------------------------------------------

def _parametric_data(noise, seed=0, outlier=None):
    rng = np.random.default_rng(seed)
    n, d = np.array([(n, c / (6 * n)) for c in np.geomspace(1e17, 1e20, 5) for n in np.geomspace(1e7, 1e9, 8)]).T
    loss = chinchilla_loss(n, d) * np.exp(rng.normal(0, noise, len(n)))
    if outlier is not None:
        loss[outlier] *= 1.3
    return n, d, loss


def test_parametric_fit_recovers_known_parameters_from_noisy_data():
    n, d, loss = _parametric_data(noise=0.005)
    f = fit_parametric(n, d, loss, n_boot=50, seed=0)
    assert f.status == "ok", f.message
    # tolerances ≈ 1.3–1.5× the worst error over 30 noise seeds at 0.5% multiplicative noise
    assert abs(f.E - TRUE["E"]) < 0.1
    assert abs(math.log(f.A / TRUE["A"])) < 0.6   # A trades off against α: loosest
    assert abs(math.log(f.B / TRUE["B"])) < 0.2
    assert abs(f.alpha - TRUE["alpha"]) < 0.045
    assert abs(f.beta - TRUE["beta"]) < 0.015
    assert abs(f.n_exponent - TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])) < 0.035
    n_opt, d_opt = f.optimal_allocation(1e21)
    assert n_opt * d_opt * 6 == pytest.approx(1e21, rel=1e-9)
    assert n_opt == pytest.approx(true_n_opt(1e21), rel=0.5)
    # bootstrap intervals bracket the estimate, and shrink when the noise does
    for k in ("E", "A", "B", "alpha", "beta"):
        lo, hi = f.intervals[k]
        assert lo < getattr(f, k) < hi, k
    quiet = fit_parametric(*_parametric_data(noise=0.001), n_boot=50, seed=0)
    for k in ("E", "alpha", "beta"):
        assert np.diff(quiet.intervals[k])[0] < 0.5 * np.diff(f.intervals[k])[0], k


def test_parametric_huber_loss_resists_an_outlier_that_pulls_a_squared_loss():
    n, d, loss = _parametric_data(noise=0.002, outlier=3)
    huber = fit_parametric(n, d, loss, n_boot=0)
    squared = fit_parametric(n, d, loss, n_boot=0, delta=10.0)  # Huber with a huge δ is least squares
    err = lambda f: abs(f.alpha - TRUE["alpha"]) + abs(f.beta - TRUE["beta"]) + abs(f.E - TRUE["E"])  # noqa: E731
    assert err(huber) < 0.5 * err(squared)
    assert abs(huber.alpha - TRUE["alpha"]) < 0.03 and abs(huber.E - TRUE["E"]) < 0.06


def test_parametric_fit_reports_too_little_data_instead_of_failing():
    f = fit_parametric([1e7, 2e7, 4e7], [1e9, 5e8, 2.5e8], [4.0, 3.9, 4.1])
    assert f.status == "too_few_points" and "at least 6" in f.message
    n = np.geomspace(1e7, 1e9, 8)  # one budget: N·D constant, α and β not separable
    f = fit_parametric(n, 1e18 / (6 * n), chinchilla_loss(n, 1e18 / (6 * n)))
    assert f.status == "too_few_points" and "collinear" in f.message


# ---------------------------------------------------------------------------------------------------------------
# IsoFLOP parabolas and power laws
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("uncertainty", ["delta", "bootstrap"])
def test_isoflop_fit_recovers_a_known_optimum(uncertainty):
    n_true, l_true, c = 3e8, 3.0, 1e19
    n = np.geomspace(2e7, 3e9, 8)
    exact = l_true + 0.08 * (np.log(n) - math.log(n_true)) ** 2
    f = fit_isoflop(n, exact, budget=c, tokens=c / (6 * n))
    assert f.status == "ok"
    assert f.n_opt == pytest.approx(n_true, rel=1e-9) and f.loss_opt == pytest.approx(l_true, abs=1e-12)
    assert f.d_opt == pytest.approx(c / (6 * n_true), rel=1e-9)  # tokens at N*, from the runs' (N, D)
    noisy = exact + np.random.default_rng(1).normal(0, 0.003, len(n))
    f = fit_isoflop(n, noisy, budget=c, tokens=c / (6 * n), uncertainty=uncertainty, n_boot=500)
    assert f.status == "ok" and 0.3 < f.position < 0.7
    assert f.n_opt == pytest.approx(n_true, rel=0.1) and f.loss_opt == pytest.approx(l_true, abs=0.006)
    assert f.n_opt_lo < n_true < f.n_opt_hi and f.n_opt_hi / f.n_opt_lo < 1.6
    assert f.d_opt_lo < c / (6 * n_true) < f.d_opt_hi


def test_isoflop_delta_method_matches_the_spread_over_noise_draws():
    # optimum off-centre (position ≈ 0.3), so both the c1 and c2 terms of the gradient matter
    n = np.geomspace(2e7, 3e9, 8)
    exact = 3.0 + 0.08 * (np.log(n) - math.log(1e8)) ** 2
    rng = np.random.default_rng(2)
    fits = [fit_isoflop(n, exact + rng.normal(0, 0.01, len(n))) for _ in range(400)]
    mc_ln_n, mc_loss = np.std([np.log(f.n_opt) for f in fits]), np.std([f.loss_opt for f in fits])
    assert np.median([f.log_n_opt_se for f in fits]) == pytest.approx(mc_ln_n, rel=0.15)
    assert np.median([f.loss_opt_se for f in fits]) == pytest.approx(mc_loss, rel=0.15)


def test_isoflop_flags_minima_it_cannot_trust():
    n = np.geomspace(1e7, 1e9, 5)
    f = fit_isoflop(n, 3.0 + 0.05 * (np.log(n) - math.log(1e11)) ** 2)
    assert f.status == "outside_range" and "above the largest" in f.message
    assert f.n_opt == pytest.approx(1e11, rel=1e-6) and f.position > 1   # still estimated, but flagged
    f = fit_isoflop(n, 3.0 + 0.05 * (np.log(n) - math.log(3e6)) ** 2)
    assert f.status == "outside_range" and "below the smallest" in f.message and f.position < 0
    f = fit_isoflop(n, 3.0 + 0.05 * (np.log(n) - math.log(1.2e7)) ** 2)
    assert f.status == "ok" and "near the smallest" in f.message         # inside, but at the edge: biased
    assert fit_isoflop(n, 3.0 - 0.05 * (np.log(n) - 18) ** 2).status == "no_minimum"
    f = fit_isoflop([1e7, 1e8, 1e7], [3.0, 2.9, 3.01])
    assert f.status == "too_few_points" and "2 distinct" in f.message
    f = fit_isoflop([1e7, 1e8, 1e9], [3.2, 2.9, 3.1])  # exactly determined: no interval, said so
    assert f.status == "ok" and math.isnan(f.n_opt_lo) and "no uncertainty" in f.message


def test_power_law_fit_recovers_a_known_exponent():
    c = np.geomspace(1e17, 1e20, 6)
    f = fit_power_law(c, 0.05 * c ** 0.52)
    assert f.b == pytest.approx(0.52, abs=1e-10) and f.a == pytest.approx(0.05, rel=1e-6) and f.r2 == pytest.approx(1)
    f = fit_power_law(c, 0.05 * c ** 0.52 * np.exp(np.random.default_rng(0).normal(0, 0.03, 6)))
    assert f.b == pytest.approx(0.52, abs=0.03) and f.b_lo < 0.52 < f.b_hi and f.b_hi - f.b_lo < 0.1
    two = fit_power_law(c[:2], 0.05 * c[:2] ** 0.52)
    assert two.usable and two.b == pytest.approx(0.52) and math.isnan(two.b_lo) and "no interval" in two.message
    assert fit_power_law([1e18], [1e8]).status == "too_few_points"


# ---------------------------------------------------------------------------------------------------------------
# Compute multiplier at equal loss
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("form,frontier", [
    ("power", lambda c: 5.0 * (c / 1e17) ** -0.05),
    ("saturating", lambda c: 1.7 + 3.0 * (c / 1e17) ** -0.15),
])
def test_compute_multiplier_recovers_a_known_factor(form, frontier):
    c = np.geomspace(1e17, 1e20, 5)
    ar = fit_loss_vs_compute(c, frontier(c), objective="ar", form=form)
    mdm = fit_loss_vs_compute(c, frontier(c / 16), objective="mdlm", form=form)  # needs 16× the compute
    m = compute_multiplier(mdm, ar)
    assert m.usable and not m.extrapolated and len(m.levels) == 5
    assert m.value == pytest.approx(16, rel=1e-5)
    assert np.allclose(m.ratios, 16, rtol=1e-5)
    assert all(max(ar.l_min, mdm.l_min) <= lv <= min(ar.l_max, mdm.l_max) for lv in m.levels)
    far = fit_loss_vs_compute(c, frontier(c / 1e4), objective="mdlm", form=form)  # ranges no longer overlap
    m = compute_multiplier(far, ar)
    assert m.extrapolated and "do not overlap" in m.message and m.value == pytest.approx(1e4, rel=1e-4)


@pytest.mark.parametrize("form,frontier", [
    ("power", lambda c: 5.0 * (c / 1e17) ** -0.05),
    ("saturating", lambda c: 1.7 + 3.0 * (c / 1e17) ** -0.15),
])
def test_frontier_compute_standard_error_matches_the_spread_over_noise_draws(form, frontier):
    c = np.geomspace(1e17, 1e20, 6)
    level = float(frontier(3e19))  # away from the centre, so the γ (and E) terms matter
    rng = np.random.default_rng(3)
    fits = [fit_loss_vs_compute(c, frontier(c) * np.exp(rng.normal(0, 0.004, len(c))), form=form)
            for _ in range(200)]
    mc = np.std([np.log(f.compute_at(level)) for f in fits])
    assert np.median([f.log_compute_se(level) for f in fits]) == pytest.approx(mc, rel=0.2)


def test_compute_multiplier_from_sweep_rows_end_to_end():
    an = analyze(sweep_rows(np.geomspace(1e17, 1e19, 5)), parametric=False)
    (m,) = an.multipliers
    assert (m.objective, m.reference) == ("mdlm", "ar")
    assert m.value == pytest.approx(16, rel=0.1) and m.lo < 16 < m.hi
    # MDLM's optimum is the AR optimum at C/16: smaller models, more data (SMDM's qualitative finding)
    n_ar, n_md = an.n_opt_law["ar"], an.n_opt_law["mdlm"]
    assert n_md.predict(1e19) == pytest.approx(n_ar.predict(1e19 / 16), rel=0.15)
    exponent = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
    assert n_ar.b == pytest.approx(exponent, abs=0.03) and n_md.b == pytest.approx(exponent, abs=0.03)
    assert an.d_opt_law["ar"].b == pytest.approx(1 - exponent, abs=0.03)


# ---------------------------------------------------------------------------------------------------------------
# Rows and the report
# ---------------------------------------------------------------------------------------------------------------

def _png_size(path):
    with open(path, "rb") as fh:
        head = fh.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", path
    return struct.unpack(">II", head[16:24])


def test_write_report_writes_tables_with_the_fitted_numbers_plots_and_csv(tmp_path):
    rows = sweep_rows([1e17, 1e18, 1e19], n_sizes=5)
    an = write_report(rows, str(tmp_path), n_boot=30)
    text = (tmp_path / "report.md").read_text()
    for f in an.isoflop["ar"] + an.isoflop["mdlm"]:
        assert f.status == "ok" and f"| {fmt(f.n_opt)} [" in text
    ar_law, par, m = an.n_opt_law["ar"], an.parametric["ar"], an.multipliers[0]
    assert f"| {fmt(ar_law.b)} [{fmt(ar_law.b_lo)}, {fmt(ar_law.b_hi)}]" in text
    assert fmt(par.alpha) in text and fmt(par.E) in text and par.E == pytest.approx(TRUE["E"], abs=0.15)
    assert f"**mdlm vs ar: ×{fmt(m.value)}**" in text and m.value == pytest.approx(16, rel=0.15)
    for name in ("isoflop", "compute_optimal", "loss_vs_compute"):
        path = tmp_path / f"{name}.png"
        w, h = _png_size(path)
        assert w > 300 and h > 200 and path.stat().st_size > 10_000, name
        assert f"]({name}.png)" in text
    with open(tmp_path / "results.csv", newline="") as fh:
        back = list(csv.DictReader(fh))
    assert len(back) == len(rows) and float(back[3]["loss"]) == rows[3]["loss"]
    fits = json.loads((tmp_path / "fits.json").read_text())
    assert fits["multipliers"][0]["value"] == pytest.approx(m.value)
    # the CSV reads back into the same analysis (strings become numbers; budgets group despite formatting)
    again = analyze(load_rows(str(tmp_path / "results.csv")), parametric=False)
    assert again.multipliers[0].value == pytest.approx(m.value, rel=1e-9)


def test_write_report_says_what_is_missing_instead_of_crashing(tmp_path):
    rows = [r for r in sweep_rows([1e17, 1e18], n_sizes=2)]  # 2 sizes per budget: no parabola anywhere
    an = write_report(rows, str(tmp_path / "few"), n_boot=10)
    text = (tmp_path / "few" / "report.md").read_text()
    assert "too_few_points: 2 distinct model size(s); a parabola needs at least 3" in text
    assert "mdlm vs ar: no_frontier" in text and not an.multipliers[0].usable
    for name in ("isoflop", "compute_optimal", "loss_vs_compute"):
        _png_size(tmp_path / "few" / f"{name}.png")
    an = write_report([], str(tmp_path / "empty"))
    assert "no usable rows" in (tmp_path / "empty" / "report.md").read_text() and not an.isoflop
    an = write_report([r for r in sweep_rows([1e17, 1e18, 1e19], n_sizes=4) if r["objective"] == "mdlm"],
                      str(tmp_path / "no_ar"), n_boot=10)
    assert "no 'ar' rows" in (tmp_path / "no_ar" / "report.md").read_text()


def test_clean_rows_drops_unusable_rows_and_keeps_the_last_of_a_repeated_cell():
    good = sweep_rows([1e18], n_sizes=3)[:3]
    rerun = dict(good[0], loss=good[0]["loss"] - 0.5)
    rows = good + [dict(good[1], loss=float("nan")), dict(good[1], loss="oops"), {"objective": "ar"}, rerun,
                   {k: str(v) for k, v in good[2].items()}]  # a CSV row: strings
    clean, messages = clean_rows(rows)
    assert len(clean) == 3
    assert [r["loss"] for r in clean if r["flavor"] == good[0]["flavor"]] == [rerun["loss"]]
    assert all(isinstance(r["loss"], float) for r in clean)
    assert any("non-finite" in m for m in messages) and any("non-numeric loss" in m for m in messages)
    assert any("missing" in m for m in messages) and any("repeated" in m for m in messages)
