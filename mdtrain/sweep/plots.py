"""PNG plots of a ``SweepAnalysis``: IsoFLOP curves with their minima, N*(C) and D*(C), loss vs compute.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so importing this module never changes the
caller's backend and works on machines without a display.
"""
from __future__ import annotations

import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter

from mdtrain.sweep.analysis import SweepAnalysis

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray")


def _figure(n_panels: int, width: float = 5.0, height: float = 4.0):
    fig = Figure(figsize=(width * n_panels, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    return fig, axes


def _empty(ax, text: str):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _legend(ax, **kw):
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kw)


def _color(an: SweepAnalysis, objective: str) -> str:
    return COLORS[an.objectives.index(objective) % len(COLORS)]


def plot_isoflop(an: SweepAnalysis, path: str) -> str:
    """One panel per objective: loss vs N per budget, the fitted parabola, a star at each minimum
    (hollow when flagged outside the sampled range), its N* interval as a horizontal bar."""
    objs = an.objectives or [""]
    fig, axes = _figure(len(objs))
    key = "params_nonembed" if an.params == "nonembed" else "params_total"
    for ax, obj in zip(axes, objs):
        fits = an.isoflop.get(obj, [])
        if not fits:
            _empty(ax, "no data")
            continue
        colors = [f"C{i % 10}" for i in range(len(fits))]
        xs = []
        for f, col in zip(fits, colors):
            rs = [r for r in an.rows if r["objective"] == obj and r["budget_flops"] == f.budget]
            n = np.array([r[key] for r in rs])
            xs.extend(n)
            ax.scatter(n, [r["loss"] for r in rs], color=col, s=18, label=f"C={f.budget:.3g}")
            if f.status in ("ok", "outside_range"):
                lo, hi = min(n.min(), f.n_opt), max(n.max(), f.n_opt)
                grid = np.geomspace(lo / 1.2, hi * 1.2, 100)
                ax.plot(grid, f.predict(grid), color=col, lw=1, ls="-" if f.usable else "--")
                ax.plot([f.n_opt], [f.loss_opt], marker="*", ms=13, color=col,
                        mfc=col if f.usable else "none")
                xs.append(f.n_opt)
                if np.isfinite(f.n_opt_lo):
                    ax.plot([f.n_opt_lo, f.n_opt_hi], [f.loss_opt] * 2, color=col, lw=2, alpha=0.5)
        ax.set_xscale("log")
        ax.set_xlim(min(xs) / 1.5, max(xs) * 1.5)  # the data, not the (possibly huge) intervals, set the view
        ax.set_xlabel(f"parameters N ({an.params})")
        ax.set_ylabel("final validation loss (nats/token)")
        ax.set_title(f"IsoFLOP profiles: {obj}")
        _legend(ax, fontsize=7)
    fig.savefig(path, dpi=110)
    return path


def plot_compute_optimal(an: SweepAnalysis, path: str) -> str:
    """N*(C) and D*(C) in log-log: IsoFLOP minima with their intervals and the fitted power laws."""
    fig, (ax_n, ax_d) = _figure(2)
    seen = {ax_n: [], ax_d: []}  # plotted values per panel: the view follows them, not the intervals
    for obj in an.objectives:
        pts = an.frontier_points(obj)
        if not pts:
            continue
        col = _color(an, obj)
        c = np.array([f.budget for f in pts])
        for ax, val, lo, hi, law, sym in (
                (ax_n, "n_opt", "n_opt_lo", "n_opt_hi", an.n_opt_law[obj], "N*"),
                (ax_d, "d_opt", "d_opt_lo", "d_opt_hi", an.d_opt_law[obj], "D*")):
            y = np.array([getattr(f, val) for f in pts])
            err = np.array([[y_ - getattr(f, lo), getattr(f, hi) - y_] for f, y_ in zip(pts, y)]).T
            ax.errorbar(c, y, yerr=np.where(np.isfinite(err), err, 0), fmt="o", color=col, capsize=3)
            if law.usable:
                cg = np.geomspace(c.min() / 1.5, c.max() * 1.5, 50)
                ax.plot(cg, law.predict(cg), color=col, label=f"{obj}: {sym} ∝ C^{law.b:.3f}")
            seen[ax].extend(y)
    for ax, label in ((ax_n, f"N* (parameters, {an.params})"), (ax_d, "D* (tokens)")):
        if not seen[ax]:
            _empty(ax, "no usable IsoFLOP minima")
            continue
        ax.set_ylim(min(seen[ax]) / 2, max(seen[ax]) * 2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("compute budget C (FLOPs)")
        ax.set_ylabel(label)
        _legend(ax, fontsize=8)
    ax_n.set_title("compute-optimal model size")
    ax_d.set_title("compute-optimal data")
    fig.savefig(path, dpi=110)
    return path


def plot_loss_vs_compute(an: SweepAnalysis, path: str) -> str:
    """Every run's loss vs its budget (faint), the compute-optimal frontier L*(C) and its fit; the compute
    multiplier of each objective vs the reference drawn as an arrow at its middle loss level."""
    fig, (ax,) = _figure(1, width=6.5, height=4.5)
    if not an.rows:
        _empty(ax, "no data")
        fig.savefig(path, dpi=110)
        return path
    for obj in an.objectives:
        col = _color(an, obj)
        rs = [r for r in an.rows if r["objective"] == obj]
        ax.scatter([r["budget_flops"] for r in rs], [r["loss"] for r in rs], color=col, alpha=0.25, s=10)
        pts = an.frontier_points(obj)
        ax.scatter([f.budget for f in pts], [f.loss_opt for f in pts], color=col, s=30, label=f"{obj}: L*(C)")
        fr = an.frontier.get(obj)
        if fr is not None and fr.usable:
            cg = np.geomspace(fr.c_min / 3, fr.c_max * 3, 60)
            ax.plot(cg, fr.loss_at(cg), color=col, lw=1.2, label=f"{obj}: fit ({fr.form}, γ={fr.gamma:.3f})")
    for m in an.multipliers:
        if not m.usable:
            continue
        mid = len(m.levels) // 2
        ax.annotate("", xy=(m.c_objective[mid], m.levels[mid]), xytext=(m.c_reference[mid], m.levels[mid]),
                    arrowprops=dict(arrowstyle="->", color="black", lw=1.2))
        ax.text(np.sqrt(m.c_objective[mid] * m.c_reference[mid]), m.levels[mid], f"×{m.ratios[mid]:.3g}",
                ha="center", va="bottom", fontsize=9)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    frontier = [f.loss_opt for o in an.objectives for f in an.frontier_points(o)]
    if frontier:  # frame the frontier; runs far off the optimum may fall outside the view
        ax.set_ylim(min(frontier) / 1.1, max(frontier) * 1.35)
    ax.set_xlabel("compute C (FLOPs)")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title("loss vs compute (compute-optimal frontier)")
    _legend(ax, fontsize=8)
    fig.savefig(path, dpi=110)
    return path


def write_plots(an: SweepAnalysis, out_dir: str) -> dict:
    """All plots into ``out_dir``; returns {name: path}."""
    return {
        "isoflop": plot_isoflop(an, os.path.join(out_dir, "isoflop.png")),
        "compute_optimal": plot_compute_optimal(an, os.path.join(out_dir, "compute_optimal.png")),
        "loss_vs_compute": plot_loss_vs_compute(an, os.path.join(out_dir, "loss_vs_compute.png")),
    }
