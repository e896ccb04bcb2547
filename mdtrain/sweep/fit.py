"""Scaling-law fits on sweep results: IsoFLOP parabolas (Chinchilla approach 2), compute-optimal power laws,
loss-vs-compute frontiers and the compute multiplier between two objectives at equal loss.

Pure functions of arrays. Each fit returns a dataclass with a ``status`` ("ok" or the reason it is not) and a
``message``; too little data is a status, never an exception, so a report can say what is missing.
Intervals are two-sided 95% and use Student's t with the fit's residual degrees of freedom, so a fit with
one spare point gets a wide (honest) interval and a fit with none gets no interval (NaN).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize, stats

CONFIDENCE = 0.95
NAN = float("nan")
EDGE = 0.1  # an IsoFLOP minimum within this fraction of the sampled ln-N range of either end gets a note


def t_quantile(dof: int) -> float:
    """Two-sided ``CONFIDENCE`` quantile of Student's t; NaN when there are no residual degrees of freedom."""
    return float(stats.t.ppf(0.5 + CONFIDENCE / 2, dof)) if dof > 0 else NAN


def _ols(X: np.ndarray, y: np.ndarray):
    """Least squares y ≈ X·beta. Returns (beta, cov, dof); cov is None when dof == 0 (an exact fit)."""
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    dof = len(y) - X.shape[1]
    if dof <= 0:
        return beta, None, dof
    s2 = float(np.sum((y - X @ beta) ** 2)) / dof
    return beta, s2 * np.linalg.inv(X.T @ X), dof


# ---------------------------------------------------------------------------------------------------------------
# IsoFLOP: loss as a quadratic in ln N at one compute budget
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class IsoFlopFit:
    """Quadratic fit loss ≈ c0 + c1·u + c2·u², u = ln N − center, over the runs of one (objective, budget).

    status: "ok"; "outside_range" (the vertex lies outside the sampled N: an extrapolation, biased, flagged);
    "no_minimum" (curvature ≤ 0: the grid does not bracket an optimum); "too_few_points" (< 3 distinct sizes).
    The N*/D* intervals come from ``uncertainty``: "delta" (delta method on the coefficient covariance, t with
    n−3 dof) or "bootstrap" (percentiles of refits on points resampled with replacement).
    """
    objective: str
    budget: float
    n_points: int
    status: str
    message: str = ""
    center: float = NAN
    coef: tuple = (NAN, NAN, NAN)   # (c0, c1, c2) in u = ln N − center
    n_opt: float = NAN
    n_opt_lo: float = NAN
    n_opt_hi: float = NAN
    log_n_opt_se: float = NAN       # standard error of ln N*
    loss_opt: float = NAN
    loss_opt_se: float = NAN
    d_opt: float = NAN              # tokens at N*, interpolated from the runs' (ln N, ln D), NaN without tokens
    d_opt_lo: float = NAN
    d_opt_hi: float = NAN
    n_min: float = NAN              # the sampled range of N
    n_max: float = NAN
    position: float = NAN           # where ln N* sits in the sampled ln-N range: 0 = smallest, 1 = largest
    uncertainty: str = "delta"

    @property
    def usable(self) -> bool:
        return self.status == "ok"

    def predict(self, n) -> np.ndarray:
        u = np.log(np.asarray(n, dtype=float)) - self.center
        c0, c1, c2 = self.coef
        return c0 + c1 * u + c2 * u * u


def _vertex(c1: float, c2: float) -> tuple[float, float]:
    """(u*, loss offset) of c1·u + c2·u²; the vertex is at −c1/(2c2) with value −c1²/(4c2)."""
    return -c1 / (2 * c2), -c1 * c1 / (4 * c2)


def fit_isoflop(n, loss, *, budget: float = NAN, tokens=None, objective: str = "", uncertainty: str = "delta",
                n_boot: int = 1000, seed: int = 0) -> IsoFlopFit:
    """Fit one IsoFLOP profile: the runs' parameter counts ``n`` and final losses (tokens optional, for D*)."""
    if uncertainty not in ("delta", "bootstrap"):
        raise ValueError(f"uncertainty must be 'delta' or 'bootstrap', got {uncertainty!r}")
    n = np.asarray(n, dtype=float)
    y = np.asarray(loss, dtype=float)
    fit = IsoFlopFit(objective=objective, budget=float(budget), n_points=len(n), status="ok", uncertainty=uncertainty)
    n_distinct = len(np.unique(n))
    if n_distinct < 3:
        fit.status = "too_few_points"
        fit.message = f"{n_distinct} distinct model size(s); a parabola needs at least 3"
        return fit
    x = np.log(n)
    fit.center = float(x.mean())
    fit.n_min, fit.n_max = float(n.min()), float(n.max())
    u = x - fit.center
    X = np.stack([np.ones_like(u), u, u * u], axis=1)
    beta, cov, dof = _ols(X, y)
    c0, c1, c2 = (float(b) for b in beta)
    fit.coef = (c0, c1, c2)
    if not c2 > 0:
        fit.status = "no_minimum"
        fit.message = "loss is not convex in ln N over these sizes (curvature ≤ 0): the grid does not bracket the optimum"
        return fit
    u_opt, off = _vertex(c1, c2)
    fit.n_opt = math.exp(fit.center + u_opt)
    fit.loss_opt = c0 + off
    span = float(u.max() - u.min())
    fit.position = float((u_opt - u.min()) / span)

    if uncertainty == "delta":
        if cov is None:
            fit.message = "3 sizes: the parabola interpolates them exactly, so it has no uncertainty (add sizes)"
        else:
            # gradients of u* = −c1/(2c2) and L* = c0 − c1²/(4c2) with respect to (c0, c1, c2)
            g_u = np.array([0.0, -1 / (2 * c2), c1 / (2 * c2 * c2)])
            g_l = np.array([1.0, -c1 / (2 * c2), c1 * c1 / (4 * c2 * c2)])
            fit.log_n_opt_se = float(math.sqrt(max(g_u @ cov @ g_u, 0.0)))
            fit.loss_opt_se = float(math.sqrt(max(g_l @ cov @ g_l, 0.0)))
            t = t_quantile(dof)
            lo_u, hi_u = u_opt - t * fit.log_n_opt_se, u_opt + t * fit.log_n_opt_se
            fit.n_opt_lo, fit.n_opt_hi = math.exp(fit.center + lo_u), math.exp(fit.center + hi_u)
    else:
        rng = np.random.default_rng(seed)
        us, ls = [], []
        for _ in range(n_boot):
            idx = rng.integers(0, len(u), len(u))
            if len(np.unique(u[idx])) < 3:
                continue
            b, *_ = np.linalg.lstsq(X[idx], y[idx], rcond=None)
            if b[2] > 0:
                ub, ob = _vertex(b[1], b[2])
                us.append(ub)
                ls.append(b[0] + ob)
        if len(us) < max(20, n_boot // 10):
            fit.message = f"bootstrap: only {len(us)} of {n_boot} resamples gave a convex parabola; no interval"
        else:
            q = [50 * (1 - CONFIDENCE), 50 * (1 + CONFIDENCE)]
            lo_u, hi_u = np.percentile(us, q)
            fit.n_opt_lo, fit.n_opt_hi = math.exp(fit.center + lo_u), math.exp(fit.center + hi_u)
            fit.log_n_opt_se, fit.loss_opt_se = float(np.std(us, ddof=1)), float(np.std(ls, ddof=1))

    if tokens is not None:
        # D* at N*: the runs' tokens follow the budget (D ≈ C/(6N), or the model's own FLOPs per token), so
        # interpolate ln D linearly in ln N rather than assume the 6ND convention.
        q, *_ = np.linalg.lstsq(np.stack([np.ones_like(u), u], axis=1), np.log(np.asarray(tokens, float)), rcond=None)
        dq = lambda uu: math.exp(q[0] + q[1] * uu)  # noqa: E731
        fit.d_opt = dq(u_opt)
        if math.isfinite(fit.n_opt_lo):
            lo, hi = sorted((dq(math.log(fit.n_opt_lo) - fit.center), dq(math.log(fit.n_opt_hi) - fit.center)))
            fit.d_opt_lo, fit.d_opt_hi = lo, hi

    if 0.0 <= fit.position < EDGE or 1 - EDGE < fit.position <= 1.0:
        note = (f"minimum near the {'smallest' if fit.position < 0.5 else 'largest'} sampled size: parabola fits "
                "are biased there; centre the grid on it")
        fit.message = f"{note}; {fit.message}" if fit.message else note
    if not 0.0 <= fit.position <= 1.0:
        fit.status = "outside_range"
        side = "below the smallest" if fit.position < 0 else "above the largest"
        fit.message = (f"the minimum (N* ≈ {fit.n_opt:.3g}) lies {side} sampled size: extrapolated; "
                       "widen the grid around it" + (f"; {fit.message}" if fit.message else ""))
    return fit


# ---------------------------------------------------------------------------------------------------------------
# Power laws y = a·C^b (N*(C), D*(C))
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class PowerLawFit:
    """y = a·C^b by least squares of ln y on ln C; 95% t-intervals with n−2 dof (none from 2 points)."""
    name: str
    n_points: int
    status: str
    message: str = ""
    a: float = NAN
    b: float = NAN
    b_se: float = NAN
    b_lo: float = NAN
    b_hi: float = NAN
    a_lo: float = NAN
    a_hi: float = NAN
    r2: float = NAN
    c_min: float = NAN
    c_max: float = NAN

    @property
    def usable(self) -> bool:
        return self.status == "ok"

    def predict(self, c) -> np.ndarray:
        return self.a * np.asarray(c, dtype=float) ** self.b


def fit_power_law(c, y, *, name: str = "") -> PowerLawFit:
    """Fit y = a·C^b in log-log. ``c`` and ``y`` must be positive."""
    c = np.asarray(c, dtype=float)
    y = np.asarray(y, dtype=float)
    fit = PowerLawFit(name=name, n_points=len(c), status="ok")
    if len(np.unique(c)) < 2:
        fit.status = "too_few_points"
        fit.message = f"{len(np.unique(c))} distinct budget(s); a power law needs at least 2"
        return fit
    lc, ly = np.log(c), np.log(y)
    X = np.stack([np.ones_like(lc), lc], axis=1)
    beta, cov, dof = _ols(X, ly)
    fit.a, fit.b = math.exp(beta[0]), float(beta[1])
    fit.c_min, fit.c_max = float(c.min()), float(c.max())
    ss_tot = float(np.sum((ly - ly.mean()) ** 2))
    fit.r2 = 1 - float(np.sum((ly - X @ beta) ** 2)) / ss_tot if ss_tot > 0 else NAN
    if cov is None:
        fit.message = "2 budgets: the line passes through both exactly, so it has no interval (add budgets)"
        return fit
    t = t_quantile(dof)
    fit.b_se = float(math.sqrt(cov[1, 1]))
    fit.b_lo, fit.b_hi = fit.b - t * fit.b_se, fit.b + t * fit.b_se
    a_se = math.sqrt(cov[0, 0])
    fit.a_lo, fit.a_hi = math.exp(beta[0] - t * a_se), math.exp(beta[0] + t * a_se)
    return fit


# ---------------------------------------------------------------------------------------------------------------
# Loss vs compute on the compute-optimal frontier, and the compute multiplier at equal loss
# ---------------------------------------------------------------------------------------------------------------

FRONTIER_FORMS = ("power", "saturating")


@dataclass
class FrontierFit:
    """L(C) = E + K·(C/c_ref)^−γ through the compute-optimal losses of one objective.

    form "power": E = 0, a straight line in log-log (least squares of ln L on ln C; SMDM's plot);
    form "saturating": E ≥ 0 fitted too (least squares in ln L; needs ≥ 4 budgets).
    ``cov`` is the covariance of (E, ln K, γ) (E's row and column are zero in the power form); None when the
    fit has no spare degree of freedom (``dof`` = 0) or E sits at a bound.
    """
    objective: str
    form: str
    n_points: int
    status: str
    message: str = ""
    E: float = 0.0
    K: float = NAN
    gamma: float = NAN
    c_ref: float = NAN
    cov: np.ndarray | None = field(default=None, repr=False)
    dof: int = 0
    c_min: float = NAN
    c_max: float = NAN
    l_min: float = NAN
    l_max: float = NAN

    @property
    def usable(self) -> bool:
        return self.status == "ok"

    def loss_at(self, c) -> np.ndarray:
        return self.E + self.K * (np.asarray(c, dtype=float) / self.c_ref) ** -self.gamma

    def compute_at(self, loss) -> np.ndarray:
        """The compute at which the frontier reaches ``loss`` (NaN at or below the asymptote E)."""
        excess = np.asarray(loss, dtype=float) - self.E
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(excess > 0, self.c_ref * (excess / self.K) ** (-1 / self.gamma), NAN)

    def log_compute_se(self, loss: float) -> float:
        """Delta-method standard error of ln C(loss); NaN without a covariance or at/below E."""
        if self.cov is None or not loss > self.E:
            return NAN
        z = math.log(loss - self.E) - math.log(self.K)
        # ln C = ln c_ref − (ln(L − E) − ln K)/γ, differentiated in (E, ln K, γ)
        g = np.array([1 / (self.gamma * (loss - self.E)), 1 / self.gamma, z / self.gamma ** 2])
        return float(math.sqrt(max(g @ self.cov @ g, 0.0)))


def fit_loss_vs_compute(c, loss, *, objective: str = "", form: str = "power") -> FrontierFit:
    """Fit the frontier L(C) from compute-optimal (budget, loss) points of one objective."""
    if form not in FRONTIER_FORMS:
        raise ValueError(f"form must be one of {FRONTIER_FORMS}, got {form!r}")
    c = np.asarray(c, dtype=float)
    y = np.asarray(loss, dtype=float)
    fit = FrontierFit(objective=objective, form=form, n_points=len(c), status="ok")
    need = 2 if form == "power" else 4
    if len(np.unique(c)) < need:
        fit.status = "too_few_points"
        fit.message = f"{len(np.unique(c))} budget(s) on the frontier; the {form} form needs at least {need}"
        return fit
    lc, ly = np.log(c), np.log(y)
    fit.c_ref = float(math.exp(lc.mean()))
    fit.c_min, fit.c_max, fit.l_min, fit.l_max = float(c.min()), float(c.max()), float(y.min()), float(y.max())
    x = lc - math.log(fit.c_ref)
    if form == "power":
        beta, cov, fit.dof = _ols(np.stack([np.ones_like(x), x], axis=1), ly)
        fit.K, fit.gamma = math.exp(beta[0]), -float(beta[1])
        if cov is None:
            fit.message = "2 budgets: exact line, no interval"
        else:  # (ln K, −γ) -> (E, ln K, γ)
            fit.cov = np.zeros((3, 3))
            fit.cov[1:, 1:] = cov * np.array([[1, -1], [-1, 1]])
        return fit

    def resid(th):
        e, lk, g = th
        return np.log(e + np.exp(lk - g * x)) - ly

    best = None
    for frac in (0.0, 0.5, 0.8, 0.95):  # starts for E; ln K and γ from the line through ln(L − E)
        e0 = frac * y.min()
        b0, *_ = np.linalg.lstsq(np.stack([np.ones_like(x), x], axis=1), np.log(y - e0), rcond=None)
        th0 = [e0, b0[0], float(np.clip(-b0[1], 1e-3, 5))]
        r = optimize.least_squares(resid, th0, bounds=([0, -np.inf, 1e-4], [0.999 * y.min(), np.inf, 10]))
        if best is None or r.cost < best.cost:
            best = r
    fit.E, fit.K, fit.gamma = float(best.x[0]), math.exp(best.x[1]), float(best.x[2])
    fit.dof = len(y) - 3
    if fit.E < 1e-6 * y.min() or fit.E > 0.99 * y.min():
        fit.message = (f"E = {fit.E:.4g} sits at a bound: the frontier does not pin down an asymptote; "
                       "prefer form='power'")
    elif fit.dof > 0:
        J = best.jac
        fit.cov = 2 * best.cost / fit.dof * np.linalg.pinv(J.T @ J)  # cost = ½·Σ r²
    return fit


@dataclass
class Multiplier:
    """C_objective(L) / C_reference(L) at loss levels L, from two frontier fits (> 1: the objective needs more).

    Levels lie inside both objectives' observed frontier loss ranges; when the ranges do not overlap they span
    the gap between them and ``extrapolated`` is True. ``value`` is the geometric mean over levels; its interval
    is the delta-method 95% interval at the middle level (power form only; the two fits are independent).
    """
    objective: str
    reference: str
    status: str
    message: str = ""
    levels: list = field(default_factory=list)
    c_objective: list = field(default_factory=list)
    c_reference: list = field(default_factory=list)
    ratios: list = field(default_factory=list)
    value: float = NAN
    lo: float = NAN
    hi: float = NAN
    extrapolated: bool = False

    @property
    def usable(self) -> bool:
        return self.status == "ok"


def compute_multiplier(obj: FrontierFit, ref: FrontierFit, *, n_levels: int = 5) -> Multiplier:
    """The compute multiplier of ``obj`` relative to ``ref`` at equal loss (SMDM: MDM vs AR, about 16×)."""
    m = Multiplier(objective=obj.objective, reference=ref.objective, status="ok")
    for f in (obj, ref):
        if not f.usable:
            m.status = "no_frontier"
            m.message = f"no frontier fit for {f.objective or '?'}: {f.message}"
            return m
    for f in (obj, ref):
        if not f.gamma > 0:  # a flat or rising frontier has no inverse C(L): any "multiplier" would be noise
            m.status = "not_decreasing"
            m.message = (f"the {f.objective or '?'} frontier does not fall with compute (γ = {f.gamma:.3g}), so no "
                         "compute reaches a given loss; widen the budgets or center the size grid")
            return m
    lo, hi = max(obj.l_min, ref.l_min), min(obj.l_max, ref.l_max)
    if lo > hi:
        m.extrapolated = True
        lo, hi = hi, lo
        m.message = (f"loss ranges do not overlap ({obj.objective}: {obj.l_min:.4g}–{obj.l_max:.4g}, "
                     f"{ref.objective}: {ref.l_min:.4g}–{ref.l_max:.4g}); levels span the gap, so both fits "
                     "are extrapolated")
    levels = np.geomspace(lo, hi, n_levels) if hi > lo else np.array([lo])
    co, cr = obj.compute_at(levels), ref.compute_at(levels)
    ok = np.isfinite(co) & np.isfinite(cr)
    if not ok.any():
        m.status = "no_common_level"
        m.message = "no loss level is reachable by both frontiers (levels at or below an asymptote E)"
        return m
    levels, co, cr = levels[ok], co[ok], cr[ok]
    ratios = co / cr
    m.levels, m.c_objective, m.c_reference, m.ratios = (v.tolist() for v in (levels, co, cr, ratios))
    m.value = float(np.exp(np.mean(np.log(ratios))))
    mid = len(levels) // 2
    se_o, se_r = obj.log_compute_se(levels[mid]), ref.log_compute_se(levels[mid])
    if math.isfinite(se_o) and math.isfinite(se_r):
        # the fits are independent, so variances add; t with the fewer residual dof of the two (conservative)
        half = t_quantile(min(obj.dof, ref.dof)) * math.sqrt(se_o ** 2 + se_r ** 2)
        m.lo, m.hi = ratios[mid] * math.exp(-half), ratios[mid] * math.exp(half)
    return m
