"""PNG plots of a ``SweepAnalysis``: IsoFLOP curves with their minima, N*(C) and D*(C), loss vs compute.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so importing this module never changes the
caller's backend and works on machines without a display.
"""
from __future__ import annotations

import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogFormatterSciNotation, LogLocator, NullFormatter

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


def _log_axis(axis) -> None:
    """Log scale labelled at 1, 2 and 5 times powers of ten only: spans of a decade or two keep readable,
    non-overlapping labels (matplotlib labels every minor tick of a short log axis)."""
    axis.set_major_locator(LogLocator(base=10))
    axis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
    axis.set_major_formatter(LogFormatterSciNotation(base=10))
    axis.set_minor_formatter(LogFormatterSciNotation(base=10, labelOnlyBase=False,
                                                     minor_thresholds=(np.inf, np.inf)))


def _plain_log_axis(axis) -> None:
    """A log axis of losses (a range of a few x): plain numbers at 1, 1.5, 2, 3, 5, 7 times powers of ten."""
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _interval_bars(ax, x, y, lo, hi, color, view: tuple, horizontal: bool = False) -> None:
    """95% interval bars, cut at the view: a bar that leaves it ends in an arrowhead at the edge (instead of a
    full-height line that reads as a grid line)."""
    vmin, vmax = view
    for xi, yi, a, b in zip(x, y, lo, hi):
        if not (np.isfinite(a) and np.isfinite(b)):
            continue
        a_cut, b_cut = max(a, vmin), min(b, vmax)
        if horizontal:
            ax.plot([a_cut, b_cut], [yi, yi], color=color, lw=2, alpha=0.5, solid_capstyle="butt")
        else:
            ax.plot([xi, xi], [a_cut, b_cut], color=color, lw=1.2)
            for end, cut, marker in ((a, a_cut, "v"), (b, b_cut, "^")):
                if end != cut:
                    ax.plot([xi], [cut], marker=marker, color=color, ms=6, clip_on=False)
                else:
                    ax.plot([xi], [cut], marker="_", color=color, ms=8)


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
                    ax.plot([f.n_opt_lo, f.n_opt_hi], [f.loss_opt] * 2, color=col, lw=2, alpha=0.5,
                            solid_capstyle="butt")
        ax.set_xscale("log")
        _log_axis(ax.xaxis)
        ax.set_xlim(min(xs) / 1.5, max(xs) * 1.5)  # the data, not the (possibly huge) intervals, set the view
        ax.set_xlabel(f"parameters N ({an.params})")
        ax.set_ylabel("final validation loss (nats/token)")
        ax.set_title(f"IsoFLOP profiles: {obj}")
        handles, labels = ax.get_legend_handles_labels()
        handles += [Line2D([], [], marker="*", ms=11, ls="", color="0.3"),
                    Line2D([], [], marker="*", ms=11, ls="", color="0.3", mfc="none"),
                    Line2D([], [], color="0.3", lw=2, alpha=0.5)]
        labels += ["minimum N*", "minimum outside the sampled sizes", "95% interval of N*"]
        ax.legend(handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
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
            ax.plot(c, y, "o", color=col, label=f"{obj}: IsoFLOP {sym}")
            if law.usable:
                cg = np.geomspace(c.min() / 1.5, c.max() * 1.5, 50)
                ax.plot(cg, law.predict(cg), color=col, label=f"{obj}: fit {sym} ∝ C^{law.b:.3f}")
            seen[ax].append((obj, c, y, [getattr(f, lo) for f in pts], [getattr(f, hi) for f in pts]))
    for ax, label in ((ax_n, f"N* (parameters, {an.params})"), (ax_d, "D* (tokens)")):
        if not seen[ax]:
            _empty(ax, "no usable IsoFLOP minima")
            continue
        ys = np.concatenate([y for *_, y, _, _ in seen[ax]])
        view = (ys.min() / 3, ys.max() * 3)
        for obj, c, y, lo, hi in seen[ax]:
            _interval_bars(ax, c, y, lo, hi, _color(an, obj), view)
        ax.set_ylim(*view)
        ax.set_xscale("log")
        ax.set_yscale("log")
        _log_axis(ax.xaxis)
        ax.set_xlabel("compute budget C (FLOPs)")
        ax.set_ylabel(label)
        handles, labels = ax.get_legend_handles_labels()
        handles.append(Line2D([], [], color="0.3", lw=1.2, marker="^", ms=5))
        labels.append("95% interval (▲/▼: it goes on beyond the view)")
        ax.legend(handles, labels, fontsize=7)
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
    xs = [r["budget_flops"] for r in an.rows]
    for m in an.multipliers:
        if not m.usable:
            continue
        mid = len(m.levels) // 2
        xs += [m.c_objective[mid], m.c_reference[mid]]  # an extrapolated arrow may reach beyond the budgets
        ax.annotate("", xy=(m.c_objective[mid], m.levels[mid]), xytext=(m.c_reference[mid], m.levels[mid]),
                    arrowprops=dict(arrowstyle="->", color="black", lw=1.2, ls="--" if m.extrapolated else "-"))
        note = "\n(extrapolated: the loss ranges do not overlap)" if m.extrapolated else ""
        ax.text(np.sqrt(m.c_objective[mid] * m.c_reference[mid]), m.levels[mid],
                f"{m.objective} needs ×{m.ratios[mid]:.3g} the compute of {m.reference}{note}",
                ha="center", va="bottom", fontsize=8)
    floors = {r.get("entropy_per_token") for r in an.rows} - {None}
    floor = floors.pop() if len(floors) == 1 else None  # a synthetic source of known entropy: no model goes below
    if floor is not None:
        ax.axhline(floor, color="0.4", ls=":", lw=1.2, label=f"data entropy {floor:.4g} nats/token (the floor)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _log_axis(ax.xaxis)
    _plain_log_axis(ax.yaxis)
    ax.set_xlim(min(xs) / 2, max(xs) * 2)
    frontier = [f.loss_opt for o in an.objectives for f in an.frontier_points(o)]
    if frontier:  # frame the frontier (and the floor); runs far off the optimum may fall outside the view
        ax.set_ylim(min(frontier + ([floor] if floor is not None else [])) / 1.1, max(frontier) * 1.35)
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
