"""``write_report(rows, out_dir)``: results.csv, report.md (markdown tables of every fit), fits.json and PNG plots.

A fit that lacks data appears in the report as its status and reason, never as an exception.
"""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import asdict

from mdtrain.sweep.analysis import ROW_FIELDS, SweepAnalysis, analyze
from mdtrain.sweep.fit import CONFIDENCE
from mdtrain.sweep.parametric import PARAMS

CI = f"{round(100 * CONFIDENCE)}% CI"


def fmt(x) -> str:
    """A number as it appears in the report: 4 significant digits, '–' for missing."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.4g}"


def fmt_range(lo, hi) -> str:
    return f"{fmt(lo)}–{fmt(hi)}" if math.isfinite(lo) and math.isfinite(hi) else "–"


def fmt_ci(x, lo, hi) -> str:
    return f"{fmt(x)} [{fmt(lo)}, {fmt(hi)}]" if math.isfinite(lo) and math.isfinite(hi) else fmt(x)


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]
    return out + [""]


def _status(f) -> str:
    return f.status + (f": {f.message}" if f.message else "")


def write_results_csv(rows, path: str) -> str:
    """The rows as CSV: the standard fields first, then any extra keys, sorted."""
    rows = list(rows)
    extra = sorted({k for r in rows for k in r} - set(ROW_FIELDS))
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(ROW_FIELDS) + extra, restval="")
        w.writeheader()
        w.writerows(rows)
    return path


def render_markdown(an: SweepAnalysis, plots: dict | None = None) -> str:
    """The report as markdown."""
    objs = an.objectives
    budgets = sorted({r["budget_flops"] for r in an.rows})
    commits = sorted({str(r.get("commit")) for r in an.rows if r.get("commit") not in (None, "")})
    L = ["# Scaling-law sweep report", ""]
    L += [f"- runs fitted: {len(an.rows)}; objectives: {', '.join(objs) or '–'}; "
          f"budgets (FLOPs): {', '.join(fmt(c) for c in budgets) or '–'}",
          f"- N is the {'non-embedding' if an.params == 'nonembed' else 'total'} parameter count; D is tokens "
          "trained; loss is the final validation NELBO/NLL in nats/token",
          f"- commits: {', '.join(commits) or '–'}; wall time of the runs: "
          f"{fmt(sum(r['wall_s'] for r in an.rows if math.isfinite(r['wall_s'])) / 3600)} h",
          f"- intervals are {CI}s", ""]
    if an.messages:
        L += ["**Notes**", ""] + [f"- {m}" for m in an.messages] + [""]

    L += ["## IsoFLOP minima (Chinchilla approach 2)", "",
          "Per (objective, budget): loss fitted as a quadratic in ln N; N* is its vertex, L* its value there. "
          "Uncertainty: " + _uncertainty_note(an) + " D* is the tokens at N*, interpolated from the runs' "
          "(ln N, ln D). Position: where ln N* lies in the sampled ln-N range (0 = smallest size, 1 = largest; "
          "parabola fits are biased when this is far from 0.5). A minimum outside the sampled range is "
          "flagged `outside_range` and " + ("still used" if an.include_flagged else "not used") +
          " for the compute-optimal fits.", ""]
    rows = []
    for obj in objs:
        for f in an.isoflop[obj]:
            rows.append([obj, fmt(f.budget), f.n_points, fmt_range(f.n_min, f.n_max),
                         fmt_ci(f.n_opt, f.n_opt_lo, f.n_opt_hi), fmt_ci(f.d_opt, f.d_opt_lo, f.d_opt_hi),
                         fmt(f.d_opt / f.n_opt), f"{fmt(f.loss_opt)} ± {fmt(f.loss_opt_se)}", fmt(f.position),
                         _status(f)])
    L += _table(["objective", "budget C", "runs", "N range", f"N* [{CI}]", f"D* [{CI}]", "D*/N*", "L* ± se",
                 "position", "status"], rows) if rows else ["No IsoFLOP fits (no rows).", ""]

    L += ["## Compute-optimal allocation: N*(C) = a·C^b, D*(C) = a·C^b", "",
          "Least squares of ln N* (ln D*) on ln C over the usable IsoFLOP minima; t-intervals with n−2 dof.", ""]
    other = "total" if an.params == "nonembed" else "non-embedding"
    rows = []
    for obj in objs:
        n, d, o = an.n_opt_law[obj], an.d_opt_law[obj], an.n_opt_law_other[obj]
        if not n.usable:
            rows.append([obj, n.n_points, "–", "–", "–", "–", "–", fmt(o.b), _status(n)])
            continue
        rows.append([obj, n.n_points, fmt_ci(n.b, n.b_lo, n.b_hi), fmt(n.a), fmt_ci(d.b, d.b_lo, d.b_hi), fmt(d.a),
                     fmt(n.r2), fmt(o.b), _status(n)])
    L += _table(["objective", "budgets", f"N* exponent b [{CI}]", "N* coefficient a", f"D* exponent [{CI}]",
                 "D* coefficient", "r² (N*)", f"N* exponent, {other} N", "status"], rows) if rows else []

    L += ["## Parametric fit L(N, D) = E + A/N^α + B/D^β (Chinchilla approach 3)", "",
          "Huber loss (δ = 1e-3) on ln L in log-sum-exp form, L-BFGS-B from the best starts of an initialisation "
          "grid; percentile-bootstrap intervals over runs. N*/D* exponents are β/(α+β) and α/(α+β) under "
          "C = 6ND.", ""]
    rows = []
    for obj, p in an.parametric.items():
        if not p.usable:
            rows.append([obj, p.n_points] + ["–"] * 7 + [_status(p)])
            continue
        ci = lambda k, v: fmt_ci(v, *p.intervals.get(k, (math.nan, math.nan)))  # noqa: E731
        rows.append([obj, p.n_points] + [ci(k, getattr(p, k)) for k in PARAMS] +
                    [ci("n_exponent", p.n_exponent), ci("d_exponent", p.d_exponent),
                     _status(p) + f" ({p.n_boot} bootstrap refits)"])
    L += _table(["objective", "runs", "E", "A", "B", "α", "β", "N* exponent β/(α+β)", "D* exponent α/(α+β)",
                 "status"], rows) if rows else ["Parametric fit not run.", ""]

    L += ["## Loss vs compute on the compute-optimal frontier", "",
          "L*(C) = E + K·(C/C_ref)^−γ through the IsoFLOP minima (" +
          ("power form: E = 0, a line in log-log" if an.frontier_form == "power" else "saturating form: E fitted") +
          ").", ""]
    rows = [[o, f.form, f.n_points, fmt(f.E), fmt(f.K), fmt(f.c_ref), fmt(f.gamma),
             fmt_range(f.c_min, f.c_max), fmt_range(f.l_min, f.l_max), _status(f)]
            for o, f in an.frontier.items()]
    L += _table(["objective", "form", "budgets", "E", "K", "C_ref", "γ", "C range", "L* range", "status"],
                rows) if rows else []

    L += [f"## Compute multiplier vs {an.reference} at equal loss", "",
          f"C_objective(L) / C_{an.reference}(L) from the two frontier fits, at loss levels inside both frontiers' "
          "loss ranges (SMDM reports about 16× for MDM vs AR). The summary is the geometric mean over levels; its "
          "interval is the delta-method interval at the middle level.", ""]
    if not an.multipliers:
        L += [f"No multiplier: it needs '{an.reference}' rows and at least one other objective.", ""]
    for m in an.multipliers:
        head = f"**{m.objective} vs {m.reference}: ×{fmt(m.value)}**"
        if math.isfinite(m.lo):
            head += f" ({CI} at L = {fmt(m.levels[len(m.levels) // 2])}: [{fmt(m.lo)}, {fmt(m.hi)}])"
        if m.extrapolated:
            head += " — extrapolated"
        L += [head if m.usable else f"**{m.objective} vs {m.reference}: {m.status}**", ""]
        if m.message:
            L += [m.message, ""]
        L += _table(["loss level", f"C_{m.objective}", f"C_{m.reference}", "multiplier"],
                    [[fmt(a), fmt(b), fmt(c), fmt(d)] for a, b, c, d in
                     zip(m.levels, m.c_objective, m.c_reference, m.ratios)]) if m.levels else []

    if plots:
        L += ["## Plots", ""] + [f"![{name}]({os.path.basename(p)})" for name, p in plots.items()] + [""]
    return "\n".join(L)


def _uncertainty_note(an: SweepAnalysis) -> str:
    kinds = {f.uncertainty for fits in an.isoflop.values() for f in fits}
    if kinds == {"bootstrap"}:
        return "percentile bootstrap over the runs of the budget."
    return ("delta method on the quadratic's coefficient covariance, t-interval with n−3 dof (3 sizes give an "
            "exact parabola and no interval).")


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist"):
        return _jsonable(x.tolist())
    return x


def analysis_to_dict(an: SweepAnalysis) -> dict:
    """Every fit as plain JSON-able data (NaN -> null), without the rows."""
    d = {k: v for k, v in asdict(an).items() if k not in ("rows", "files")}
    for obj, p in an.parametric.items():
        d["parametric"][obj].update(n_exponent=p.n_exponent, d_exponent=p.d_exponent)
    return _jsonable(d)


def write_report(rows, out_dir: str, **analyze_kwargs) -> SweepAnalysis:
    """Analyse ``rows`` (see ``analyze`` for the options) and write into ``out_dir``: results.csv, report.md,
    fits.json, isoflop.png, compute_optimal.png, loss_vs_compute.png. Returns the analysis (paths in ``.files``)."""
    from mdtrain.sweep.plots import write_plots  # matplotlib only when plotting

    rows = list(rows)
    os.makedirs(out_dir, exist_ok=True)
    an = analyze(rows, **analyze_kwargs)
    an.files["results_csv"] = write_results_csv(rows, os.path.join(out_dir, "results.csv"))
    plots = write_plots(an, out_dir)
    an.files.update(plots)
    an.files["fits_json"] = os.path.join(out_dir, "fits.json")
    with open(an.files["fits_json"], "w") as fh:
        json.dump(analysis_to_dict(an), fh, indent=1)
    an.files["report_md"] = os.path.join(out_dir, "report.md")
    with open(an.files["report_md"], "w") as fh:
        fh.write(render_markdown(an, plots))
    return an
