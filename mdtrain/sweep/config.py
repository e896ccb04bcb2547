"""The ``sweep:`` section of a sweep file, and loading a sweep file: a training config plus that section.

A sweep file is an ordinary training YAML (``base:`` included) with one more top-level key, ``sweep:``. Every
other section is the base training config that all cells share; the sweep section says what varies (objectives x
compute budgets x model sizes) and how the cells run. ``key=value`` overrides reach both (``sweep.budgets=[1e12]``,
``optim.lr=1e-3``); unknown keys fail naming the closest valid key, as for ``mdtrain train``.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Optional

from mdtrain.launch.config import LaunchConfig
from mdtrain.config import Config, read_yaml
from mdtrain.configtools import ConfigError, doc, from_dict, parse_overrides, section, set_dotted, validate_tree
from mdtrain.objectives.config import OBJECTIVE_NAMES

# LAYERSxWIDTHxHEADS, e.g. 2x64x4: a size given by its shape instead of a flavor name
SHAPE_RE = re.compile(r"^(\d+)x(\d+)x(\d+)$")
# settings every cell must share, or the losses are not comparable (same eval set, same Monte Carlo noise), and
# settings the plan derives for each cell
SHARED_PREFIXES = ("eval.", "data.", "train.global_batch_size")
PLANNED_KEYS = ("train.steps", "train.run_dir", "objective.name", "model.name", "model.flavor", "model.n_layers",
                "model.d_model", "model.n_heads")
EXECUTORS = ("inprocess", "subprocess", "local", "slurm")


@dataclass
class FitOptions:
    params: str = doc("nonembed", "N of the fits: nonembed (SMDM / Kaplan: no input embedding, no output head) or "
                      "total (Chinchilla); the other convention's N* exponent is reported beside it",
                      choices=("nonembed", "total"))
    reference: str = doc("ar", "objective the compute multipliers are relative to")
    frontier_form: str = doc("power", "loss vs compute on the frontier: power (a line in log-log) or saturating "
                             "(E + K·C^-γ, E fitted; needs more budgets)", choices=("power", "saturating"))
    include_flagged: bool = doc(False, "also use IsoFLOP minima outside their sampled size range (extrapolated) "
                                "for N*(C), D*(C) and L*(C)")
    isoflop_uncertainty: str = doc("delta", "interval of each IsoFLOP minimum: delta (quadratic's covariance) or "
                                   "bootstrap (over the runs of the budget)", choices=("delta", "bootstrap"))
    parametric: bool = doc(True, "fit L(N, D) = E + A/N^α + B/D^β per objective (Chinchilla approach 3)")
    n_boot: int = doc(200, "bootstrap resamples of the parametric fit (and of bootstrapped IsoFLOP fits)", ge=0)
    seed: int = doc(0, "seed of the bootstrap resampling", ge=0)

    def validate(self):
        if self.n_boot < 0:
            raise ConfigError(f"sweep.fit.n_boot must be >= 0, got {self.n_boot}")


@dataclass
class SweepConfig:
    out: str = doc("runs/sweep", "sweep directory: cells/<name>/ (one run dir per cell), results.jsonl, report/")
    objectives: list[str] = doc(["mdlm", "ar"], "objectives to compare (objective.name); ar trains model.name=causal, "
                                "the others sweep.backbone")
    backbone: str = doc("dit", "backbone of the non-AR objectives", choices=("dit", "dimamba"))
    budgets: list[float] = doc([], "compute budgets C in training FLOPs (log-spaced, e.g. [1e18, 3e18, 1e19])", gt=0)
    sizes: list[str] = doc([], "model sizes: flavor names (ladder-17M, ...) or LAYERSxWIDTHxHEADS shapes (2x64x4) "
                           "applied over the base config's flavor (which then only supplies cond_dim)")
    sizes_by_objective: dict[str, list[str]] = doc({}, "per-objective size lists that replace sweep.sizes for "
                                                   "those objectives, to center each grid on its own optimum "
                                                   "(SMDM: an MDM's optimal N is ~2x below AR's at equal compute)")
    flops: str = doc("exact", "training FLOPs per token that count against the budget (models/flops.py): exact "
                     "(3x every matmul, causal attention halved), rule (6N + 12·layers·width·seq), 6n (6 x "
                     "non-embedding parameters, SMDM's C = 6ND); all three are recorded in each row",
                     choices=("exact", "rule", "6n"))
    min_steps: int = doc(20, "cells whose budget buys fewer optimizer steps are left out of the plan (listed)", ge=1)
    warmup_fraction: float = doc(0.01, "each cell warms up for this fraction of its steps (SMDM: 1%); negative "
                                 "keeps the base's optim.warmup_steps for every cell", lt=1)
    overrides: dict[str, list[str]] = doc({}, "extra key=value overrides per objective, e.g. {md4: "
                                          "[model.variant=md4]}; data.*, eval.* and the batch are shared by "
                                          "every cell and refused here")
    executor: str = doc("inprocess", "how cells run: inprocess (one after another in this process), subprocess "
                        "(`python -m mdtrain train`, sweep.parallel at once), local (submitit LocalExecutor through "
                        "mdtrain/launch/slurm.py, sweep.parallel at once), slurm (one job array through mdtrain/launch/slurm.py)",
                        choices=EXECUTORS)
    parallel: int = doc(1, "subprocess / local: cells running at once", ge=1)
    threads: int = doc(0, "inprocess / subprocess: torch threads per cell (tiny CPU models run best with 1); "
                       "0 = torch's default. local / slurm use sweep.launch.cpus_per_task", ge=0)
    wait: bool = doc(True, "slurm: wait for the job array, then collect and fit; false returns after submitting "
                     "(run the `collect` action later)")
    launch: LaunchConfig = section(LaunchConfig, "local / slurm resources of each cell's job (mdtrain/launch/config.py); "
                                   "folder defaults to SWEEP_OUT/submitit")
    fit: FitOptions = section(FitOptions, "analysis options of the `fit` action")

    def sizes_for(self, objective: str) -> list[str]:
        """The model sizes swept for ``objective``."""
        return list(self.sizes_by_objective.get(objective) or self.sizes)

    def validate(self):
        bad = [o for o in self.objectives if o not in OBJECTIVE_NAMES]
        if bad or not self.objectives:
            raise ConfigError(f"sweep.objectives must name objectives from {list(OBJECTIVE_NAMES)}, got "
                              f"{self.objectives}")
        if len(set(self.objectives)) != len(self.objectives):
            raise ConfigError(f"sweep.objectives lists an objective twice: {self.objectives}")
        if not self.budgets or any(not c > 0 for c in self.budgets):
            raise ConfigError(f"sweep.budgets needs one or more positive FLOP budgets, got {self.budgets}")
        for obj in self.sizes_by_objective:
            if obj not in self.objectives:
                raise ConfigError(f"sweep.sizes_by_objective has objective {obj!r}, which is not in sweep.objectives "
                                  f"{self.objectives}")
        if len(set(map(float, self.budgets))) != len(self.budgets):
            raise ConfigError(f"sweep.budgets must not repeat entries: {self.budgets}")
        for obj in self.objectives:
            where = f"sweep.sizes_by_objective.{obj}" if obj in self.sizes_by_objective else "sweep.sizes"
            sizes = self.sizes_for(obj)
            if not sizes:
                raise ConfigError(f"{where} needs one or more model sizes (flavor names or LAYERSxWIDTHxHEADS) for "
                                  f"objective {obj}")
            if len(set(sizes)) != len(sizes):
                raise ConfigError(f"{where} must not repeat entries: {sizes}")
            for size in sizes:
                if not re.fullmatch(r"[A-Za-z0-9_.-]+", size):
                    raise ConfigError(f"{where} entry {size!r}: use a flavor name or LAYERSxWIDTHxHEADS such as "
                                      f"2x64x4")
        for name in ("min_steps", "parallel"):
            if getattr(self, name) < 1:
                raise ConfigError(f"sweep.{name} must be >= 1, got {getattr(self, name)}")
        if self.threads < 0:
            raise ConfigError(f"sweep.threads must be >= 0, got {self.threads}")
        if self.warmup_fraction >= 1:
            raise ConfigError(f"sweep.warmup_fraction must be < 1, got {self.warmup_fraction}")
        for obj, items in self.overrides.items():
            if obj not in self.objectives:
                raise ConfigError(f"sweep.overrides has objective {obj!r}, which is not in sweep.objectives "
                                  f"{self.objectives}")
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise ConfigError(f"sweep.overrides.{obj} must be a list of 'key=value' strings, got {items!r}")
            for key, _ in parse_overrides(items):
                if key.startswith(SHARED_PREFIXES):
                    raise ConfigError(f"sweep.overrides.{obj}: {key} is shared by every cell (same data, eval set, "
                                      f"Monte Carlo settings and batch); set it in the sweep file's base sections")
                if key in PLANNED_KEYS:
                    raise ConfigError(f"sweep.overrides.{obj}: {key} is set by the plan for each cell (from "
                                      f"sweep.objectives, sweep.sizes, sweep.budgets); it cannot be overridden")


@dataclass
class SweepFile(Config):
    """A sweep file: the base training config (every section of ``Config``) plus ``sweep:``."""
    sweep: SweepConfig = section(SweepConfig, "scaling-law grid: objectives x budgets x sizes, execution, fits")


def split_sweep_file(sf: SweepFile) -> tuple[Config, SweepConfig]:
    """The base training config and the sweep section of a loaded sweep file."""
    base = Config(**{f.name: getattr(sf, f.name) for f in dataclasses.fields(Config)})
    return base, sf.sweep


def load_sweep(path: Optional[str], overrides: Optional[list[str]] = None) -> tuple[Config, SweepConfig]:
    """Sweep file (with its ``base:`` chain) <- ``key=value`` overrides -> (base training config, sweep section)."""
    if not path:
        raise ConfigError("mdtrain sweep needs a sweep file: mdtrain sweep SWEEP.yaml [plan|run|collect|fit] "
                          "[key=value ...] (see configs/sweep_demo.yaml)")
    data = read_yaml(path)
    if "sweep" not in data:
        raise ConfigError(f"{path}: no top-level 'sweep:' section; a sweep file is a training config plus a sweep: "
                          f"section (see configs/sweep_demo.yaml)")
    try:
        sf = from_dict(SweepFile, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    for key, value in parse_overrides(list(overrides or [])):
        set_dotted(sf, key, value)
    validate_tree(sf)
    return split_sweep_file(sf)


def parse_size(size: str) -> Optional[tuple[int, int, int]]:
    """``2x64x4`` -> (layers, width, heads); a flavor name -> None."""
    m = SHAPE_RE.match(size)
    return tuple(int(g) for g in m.groups()) if m else None
