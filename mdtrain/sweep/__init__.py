"""Scaling-law sweeps: fits of sweep result rows (IsoFLOP, power laws, parametric L(N, D), compute multiplier)
and the report (markdown tables, PNG plots, CSV).

    from mdtrain.sweep import write_report
    an = write_report(rows, "runs/sweep/report")   # rows: dicts with the fields of ROW_FIELDS
    an.multipliers[0].value                         # e.g. MDLM's compute multiplier vs AR at equal loss

The fitting functions take plain arrays and never need the trainer; ``analyze(rows)`` runs them all.
Running a grid (``mdtrain sweep SWEEP.yaml plan|run|collect|fit``) lives in ``run.py`` (cells: ``plan.py``, the
``sweep:`` section: ``config.py``) and is imported only when called, so the analysis stays light.
"""
from mdtrain.sweep.analysis import (PARAM_CONVENTIONS, ROW_FIELDS, SweepAnalysis, analyze, clean_rows,
                                    load_rows)
from mdtrain.sweep.fit import (FrontierFit, IsoFlopFit, Multiplier, PowerLawFit, compute_multiplier,
                               fit_isoflop, fit_loss_vs_compute, fit_power_law)
from mdtrain.sweep.parametric import ParametricFit, fit_parametric
from mdtrain.sweep.report import write_report



def main(args) -> int:
    """``mdtrain sweep`` (see ``mdtrain.sweep.run``)."""
    from mdtrain.sweep.run import main as run_main
    return run_main(args)


__all__ = [
    "ROW_FIELDS", "PARAM_CONVENTIONS", "SweepAnalysis", "analyze", "clean_rows", "load_rows", "write_report",
    "IsoFlopFit", "fit_isoflop", "PowerLawFit", "fit_power_law", "FrontierFit", "fit_loss_vs_compute",
    "Multiplier", "compute_multiplier", "ParametricFit", "fit_parametric", "main",
]
