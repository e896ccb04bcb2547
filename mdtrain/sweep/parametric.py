"""Chinchilla approach 3: fit L(N, D) = E + A/N^α + B/D^β to all runs of one objective.

As in Hoffmann et al. (2022) and Epoch's replication: the model is written in log-sum-exp form,
ln L̂ = LSE(a − α ln N, b − β ln D, e) with A = eᵃ, B = eᵇ, E = eᵉ, and fitted by minimising the Huber loss
(δ = 1e-3) of ln L̂ − ln L with L-BFGS-B. The objective is evaluated on a grid of initialisations, and L-BFGS
runs from the best ``n_starts`` of them (all of them with ``n_starts=None``). Intervals: percentile bootstrap
over runs (each resample refitted from the full-data optimum).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize

from mdtrain.sweep.fit import CONFIDENCE, NAN

PARAMS = ("E", "A", "B", "alpha", "beta")
# Initialisation grid over (a, b, e, α, β), a little finer than Chinchilla's.
DEFAULT_GRID = {
    "a": np.arange(0.0, 25.1, 2.5),
    "b": np.arange(0.0, 25.1, 2.5),
    "e": np.arange(-1.0, 1.51, 0.5),
    "alpha": np.array([0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5]),
    "beta": np.array([0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5]),
}
# L-BFGS-B bounds on (a, b, e, α, β): exponents stay positive and finite, logs stay in a sane range.
BOUNDS = [(-20.0, 80.0), (-20.0, 80.0), (-10.0, 5.0), (0.0, 5.0), (0.0, 5.0)]


@dataclass
class ParametricFit:
    """Fitted (E, A, B, α, β) with bootstrap 95% intervals and standard errors, keyed by name in ``intervals``/``se``.

    The derived compute-optimal exponents under C = 6ND are ``n_exponent`` = β/(α+β) for N* and
    ``d_exponent`` = α/(α+β) for D*; their intervals are in ``intervals`` too.
    """
    objective: str
    n_points: int
    status: str
    message: str = ""
    E: float = NAN
    A: float = NAN
    B: float = NAN
    alpha: float = NAN
    beta: float = NAN
    huber: float = NAN              # objective value at the optimum (sum of Huber losses / δ)
    n_boot: int = 0                 # successful bootstrap refits
    intervals: dict = field(default_factory=dict)
    se: dict = field(default_factory=dict)

    @property
    def usable(self) -> bool:
        return self.status == "ok"

    @property
    def n_exponent(self) -> float:
        return self.beta / (self.alpha + self.beta)

    @property
    def d_exponent(self) -> float:
        return self.alpha / (self.alpha + self.beta)

    def predict(self, n, d) -> np.ndarray:
        return self.E + self.A / np.asarray(n, float) ** self.alpha + self.B / np.asarray(d, float) ** self.beta

    def optimal_allocation(self, c):
        """(N*, D*) minimising the fitted L under C = 6ND (closed form; Hoffmann et al. eq. 4)."""
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        c6 = np.asarray(c, float) / 6
        return g * c6 ** self.n_exponent, c6 ** self.d_exponent / g


def _huber_objective(theta, logn, logd, logl, delta):
    """Sum of Huber(ln L̂ − ln L) / δ and its gradient in theta = (a, b, e, α, β)."""
    a, b, e, al, be = theta
    u = np.stack([a - al * logn, b - be * logd, np.full_like(logn, e)])
    m = u.max(axis=0)
    w = np.exp(u - m)
    s = w.sum(axis=0)
    r = m + np.log(s) - logl
    w /= s  # d lse / d u_k
    absr = np.abs(r)
    quad = absr <= delta
    h = np.where(quad, 0.5 * r * r, delta * (absr - 0.5 * delta))
    dh = np.where(quad, r, delta * np.sign(r))
    grad = np.array([(dh * w[0]).sum(), (dh * w[1]).sum(), (dh * w[2]).sum(),
                     -(dh * w[0] * logn).sum(), -(dh * w[1] * logd).sum()])
    # dividing by δ keeps values and gradients O(1)-ish so L-BFGS's tolerances mean something
    return h.sum() / delta, grad / delta


def _grid_values(grid: np.ndarray, logn, logd, logl, delta, chunk: int = 4096) -> np.ndarray:
    """The objective at every grid row (vectorised; no gradients)."""
    out = np.empty(len(grid))
    for i in range(0, len(grid), chunk):
        g = grid[i:i + chunk]
        u = np.stack([g[:, [0]] - g[:, [3]] * logn, g[:, [1]] - g[:, [4]] * logd,
                      np.broadcast_to(g[:, [2]], (len(g), len(logn)))])
        m = u.max(axis=0)
        r = np.abs(m + np.log(np.exp(u - m).sum(axis=0)) - logl)
        out[i:i + chunk] = np.where(r <= delta, 0.5 * r * r, delta * (r - 0.5 * delta)).sum(axis=1) / delta
    return out


def _minimize(theta0, logn, logd, logl, delta):
    return optimize.minimize(_huber_objective, theta0, args=(logn, logd, logl, delta), jac=True,
                             method="L-BFGS-B", bounds=BOUNDS,
                             options={"maxiter": 5000, "ftol": 1e-10, "gtol": 1e-7})  # ~1e-8 on the parameters


def fit_parametric(n, d, loss, *, objective: str = "", delta: float = 1e-3, grid: dict | None = None,
                   n_starts: int | None = 10, n_boot: int = 200, seed: int = 0) -> ParametricFit:
    """Fit L(N, D) = E + A/N^α + B/D^β to runs with parameter counts ``n``, tokens ``d`` and final ``loss``."""
    logn = np.log(np.asarray(n, dtype=float))
    logd = np.log(np.asarray(d, dtype=float))
    logl = np.log(np.asarray(loss, dtype=float))
    fit = ParametricFit(objective=objective, n_points=len(logn), status="ok")
    if len(logn) < 6:
        fit.status = "too_few_points"
        fit.message = f"{len(logn)} runs; five parameters need at least 6"
        return fit
    if np.linalg.matrix_rank(np.stack([np.ones_like(logn), logn, logd], axis=1)) < 3:
        fit.status = "too_few_points"
        fit.message = ("ln N and ln D are collinear (e.g. all runs on one IsoFLOP line, N·D constant): α and β "
                       "cannot be separated; add budgets")
        return fit

    g = {**DEFAULT_GRID, **(grid or {})}
    starts = np.array(list(itertools.product(g["a"], g["b"], g["e"], g["alpha"], g["beta"])), dtype=float)
    if n_starts is not None and n_starts < len(starts):
        starts = starts[np.argsort(_grid_values(starts, logn, logd, logl, delta))[:n_starts]]
    best = None
    for th in starts:
        r = _minimize(th, logn, logd, logl, delta)
        if np.isfinite(r.fun) and (best is None or r.fun < best.fun):
            best = r
    theta = best.x
    fit.huber = float(best.fun)
    fit.E, fit.A, fit.B = math.exp(theta[2]), math.exp(theta[0]), math.exp(theta[1])
    fit.alpha, fit.beta = float(theta[3]), float(theta[4])
    at_bound = [name for name, v, (lo, hi) in zip(("ln A", "ln B", "ln E", "alpha", "beta"), theta, BOUNDS)
                if min(v - lo, hi - v) < 1e-6]
    if at_bound:
        fit.message = f"parameters at their bounds ({', '.join(at_bound)}): the data do not pin them down"

    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(logn), len(logn))
        r = _minimize(theta, logn[idx], logd[idx], logl[idx], delta)
        if np.isfinite(r.fun):
            a, b, e, al, be = r.x
            boots.append((math.exp(e), math.exp(a), math.exp(b), al, be, be / (al + be), al / (al + be)))
    fit.n_boot = len(boots)
    if len(boots) >= 10:
        boots = np.array(boots)
        q = [50 * (1 - CONFIDENCE), 50 * (1 + CONFIDENCE)]
        for j, name in enumerate(PARAMS + ("n_exponent", "d_exponent")):
            lo, hi = np.percentile(boots[:, j], q)
            fit.intervals[name] = (float(lo), float(hi))
            fit.se[name] = float(np.std(boots[:, j], ddof=1))
    elif n_boot:
        fit.message = (fit.message + "; " if fit.message else "") + f"only {len(boots)} bootstrap refits: no intervals"
    return fit
