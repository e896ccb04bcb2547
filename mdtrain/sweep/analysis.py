"""From sweep result rows to every scaling-law fit: ``analyze(rows) -> SweepAnalysis``.

A row is one finished cell of the sweep (a dict; extra keys are kept and ignored):
objective, flavor, params_total, params_nonembed, budget_flops, steps, tokens, loss (final validation
NELBO/NLL, nats/token), wall_s, commit. ``load_rows`` reads them back from the sweep's CSV or JSONL.
"""
from __future__ import annotations

import csv
import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from mdtrain.sweep.fit import IsoFlopFit, compute_multiplier, fit_isoflop, fit_loss_vs_compute, fit_power_law
from mdtrain.sweep.parametric import fit_parametric

ROW_FIELDS = ("objective", "flavor", "params_total", "params_nonembed", "budget_flops", "steps", "tokens", "loss",
              "wall_s", "commit")
NUMERIC_FIELDS = ("params_total", "params_nonembed", "budget_flops", "steps", "tokens", "loss", "wall_s")
# what a fit cannot do without (wall_s, steps and commit are reported but not fitted)
REQUIRED_FIELDS = ("objective", "params_total", "params_nonembed", "budget_flops", "tokens", "loss")
PARAM_CONVENTIONS = {"nonembed": "params_nonembed", "total": "params_total"}


def load_rows(path: str) -> list[dict]:
    """Rows from a sweep results file: ``.jsonl`` (one JSON object per line) or ``.csv`` with a header."""
    with open(path, newline="") as fh:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in fh if line.strip()]
        return list(csv.DictReader(fh))


def budget_key(c: float) -> float:
    """Budgets compare equal to 6 significant digits, so 1e19 and 1.0000000001e19 (a CSV round trip) group."""
    return float(f"{c:.6g}")


def clean_rows(rows) -> tuple[list[dict], list[str]]:
    """Numeric fields as floats; rows a fit cannot use dropped with a counted reason; repeated cells deduplicated.

    A cell is (objective, budget, flavor, params_total); a repeat keeps the last row (a re-run overrides).
    """
    rows = list(rows)
    kept: dict = {}
    dropped: Counter = Counter()
    for raw in rows:
        row = dict(raw)
        missing = [k for k in REQUIRED_FIELDS if row.get(k) in (None, "")]
        if missing:
            dropped[f"missing {', '.join(missing)}"] += 1
            continue
        bad = None
        for k in NUMERIC_FIELDS:
            if row.get(k) in (None, ""):
                row[k] = math.nan
                continue
            try:
                row[k] = float(row[k])
            except (TypeError, ValueError):
                bad = f"non-numeric {k}"
                break
        if bad is None:
            bad = next((f"non-finite or non-positive {k}" for k in REQUIRED_FIELDS[1:]
                        if not (math.isfinite(row[k]) and row[k] > 0)), None)
        if bad:
            dropped[bad] += 1
            continue
        row["objective"] = str(row["objective"])
        row["budget_flops"] = budget_key(row["budget_flops"])
        kept[(row["objective"], row["budget_flops"], str(row.get("flavor", "")), row["params_total"])] = row
    messages = [f"dropped {n} row(s): {why}" for why, n in sorted(dropped.items())]
    n_dup = len(rows) - sum(dropped.values()) - len(kept)
    if n_dup:
        messages.append(f"{n_dup} repeated cell(s) (same objective, budget, flavor): kept the last row of each")
    return list(kept.values()), messages


@dataclass
class SweepAnalysis:
    """Every fit of a sweep, per objective (dicts keyed by objective name, objectives sorted)."""
    rows: list                       # the cleaned rows that were fitted
    params: str                      # parameter-count convention of N: "nonembed" or "total"
    reference: str                   # the objective multipliers are relative to (AR)
    frontier_form: str
    include_flagged: bool
    messages: list = field(default_factory=list)
    isoflop: dict = field(default_factory=dict)          # objective -> [IsoFlopFit] by budget
    n_opt_law: dict = field(default_factory=dict)        # objective -> PowerLawFit of N*(C)
    d_opt_law: dict = field(default_factory=dict)        # objective -> PowerLawFit of D*(C)
    n_opt_law_other: dict = field(default_factory=dict)  # objective -> N*(C) under the other convention
    frontier: dict = field(default_factory=dict)         # objective -> FrontierFit of L*(C)
    parametric: dict = field(default_factory=dict)       # objective -> ParametricFit
    multipliers: list = field(default_factory=list)      # [Multiplier] of each objective vs the reference
    files: dict = field(default_factory=dict)            # name -> path, filled by write_report

    @property
    def objectives(self) -> list[str]:
        return sorted({r["objective"] for r in self.rows})

    def frontier_points(self, objective: str) -> list[IsoFlopFit]:
        """The IsoFLOP minima that feed N*(C), D*(C) and L*(C)."""
        return _frontier_minima(self.isoflop.get(objective, []), self.include_flagged)


def _frontier_minima(fits: list[IsoFlopFit], include_flagged: bool) -> list[IsoFlopFit]:
    ok = ("ok", "outside_range") if include_flagged else ("ok",)
    return [f for f in fits if f.status in ok]


def _isoflop_fits(rows, objective, param_field, uncertainty, n_boot, seed) -> list[IsoFlopFit]:
    by_budget = defaultdict(list)
    for r in rows:
        if r["objective"] == objective:
            by_budget[r["budget_flops"]].append(r)
    return [fit_isoflop([r[param_field] for r in rs], [r["loss"] for r in rs], budget=c,
                        tokens=[r["tokens"] for r in rs], objective=objective, uncertainty=uncertainty,
                        n_boot=n_boot, seed=seed)
            for c, rs in sorted(by_budget.items())]


def analyze(rows, *, params: str = "nonembed", reference: str = "ar", frontier_form: str = "power",
            include_flagged: bool = False, isoflop_uncertainty: str = "delta", parametric: bool = True,
            n_boot: int = 200, seed: int = 0) -> SweepAnalysis:
    """Run every fit on ``rows``.

    params: which parameter count is N ("nonembed": SMDM/Kaplan; "total": Chinchilla); the other convention's
      N*(C) exponent is reported beside it. reference: the objective compute multipliers are relative to.
    frontier_form: "power" or "saturating" (see ``fit_loss_vs_compute``). include_flagged: also use IsoFLOP
      minima that lie outside their sampled range for N*(C), D*(C) and L*(C) (off by default: extrapolated).
    isoflop_uncertainty: "delta" or "bootstrap". n_boot: bootstrap resamples of the parametric fit (and of the
      IsoFLOP fits when bootstrapped).
    """
    if params not in PARAM_CONVENTIONS:
        raise ValueError(f"params must be one of {sorted(PARAM_CONVENTIONS)}, got {params!r}")
    clean, messages = clean_rows(rows)
    out = SweepAnalysis(rows=clean, params=params, reference=reference, frontier_form=frontier_form,
                        include_flagged=include_flagged, messages=messages)
    if not clean:
        out.messages.append("no usable rows: nothing to fit")
        return out
    param_field = PARAM_CONVENTIONS[params]
    other_field = PARAM_CONVENTIONS["total" if params == "nonembed" else "nonembed"]
    for obj in out.objectives:
        out.isoflop[obj] = _isoflop_fits(clean, obj, param_field, isoflop_uncertainty, n_boot, seed)
        pts = out.frontier_points(obj)
        c = [f.budget for f in pts]
        out.n_opt_law[obj] = fit_power_law(c, [f.n_opt for f in pts], name="N*")
        out.d_opt_law[obj] = fit_power_law(c, [f.d_opt for f in pts], name="D*")
        out.frontier[obj] = fit_loss_vs_compute(c, [f.loss_opt for f in pts], objective=obj, form=frontier_form)
        skipped = [f for f in out.isoflop[obj] if f not in pts]
        if skipped:
            hint = ("; include_flagged=True would also use those outside the sampled range"
                    if any(f.status == "outside_range" for f in skipped) else "")
            out.messages.append(f"{obj}: {len(skipped)} of {len(out.isoflop[obj])} IsoFLOP minima not used for the "
                                f"compute-optimal fits (see their status{hint})")
        other = _frontier_minima(_isoflop_fits(clean, obj, other_field, "delta", 0, seed), include_flagged)
        out.n_opt_law_other[obj] = fit_power_law([f.budget for f in other], [f.n_opt for f in other], name="N*")
        if parametric:
            rs = [r for r in clean if r["objective"] == obj]
            out.parametric[obj] = fit_parametric([r[param_field] for r in rs], [r["tokens"] for r in rs],
                                                 [r["loss"] for r in rs], objective=obj, n_boot=n_boot, seed=seed)
    if reference in out.frontier:
        out.multipliers = [compute_multiplier(out.frontier[o], out.frontier[reference])
                           for o in out.objectives if o != reference]
    else:
        out.messages.append(f"no '{reference}' rows: no compute multiplier (it is relative to {reference})")
    return out


