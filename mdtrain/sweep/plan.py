"""The cells of a sweep: objectives x budgets x sizes, each a complete training config with its steps derived from
the budget and the model's own FLOPs per token, and where each cell stands on disk (done / partial / todo).

steps = round(C / (flops_per_token x global_batch_size x seq_len)); tokens D = steps x global_batch_size x seq_len,
so the compute actually spent is flops_per_token x D (within half a step of C). Both parameter counts (total and
non-embedding) come from the very module tree the trainer builds.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from dataclasses import dataclass, field

from mdtrain.checkpoint import list_checkpoints
from mdtrain.config import Config
from mdtrain.configtools import ConfigError, parse_overrides, set_dotted, to_dict, validate_tree
from mdtrain.sweep.config import SweepConfig, parse_size

CELL_FILE = "cell.json"  # what the sweep planned for a cell, written before the cell first runs
# settings that do not change a cell's result: a sweep may change them between invocations
RESULT_NEUTRAL = ("logging.", "checkpoint.every", "checkpoint.keep_last", "checkpoint.async_save", "data.num_workers",
                  "data.prefetch", "data.pin_memory")


@dataclass
class Cell:
    """One run of the grid. ``overrides`` over the base config give ``cfg`` (how subprocess and SLURM cells run)."""
    name: str
    objective: str
    size: str                        # the sweep.sizes entry; the "flavor" of the result rows
    budget: float                    # C, training FLOPs
    steps: int
    tokens: int                      # D = steps x global batch x seq_len
    seq_len: int
    global_batch_size: int
    params_total: int
    params_nonembed: int
    flops_convention: str            # sweep.flops: exact, rule or 6n
    flops_per_token: float           # in that convention: what the budget was spent in
    flops_per_token_exact: float
    flops_per_token_rule: float
    flops_per_token_6n: float        # 6 x params_nonembed
    run_dir: str
    overrides: list = field(default_factory=list)
    cfg: Config = field(default=None, repr=False)

    @property
    def flops_used(self) -> float:
        return self.flops_per_token * self.tokens

    def record(self) -> dict:
        """The planned fields (no config): what results rows and cell.json carry."""
        keys = ("name", "objective", "size", "budget", "steps", "tokens", "seq_len", "global_batch_size",
                "params_total", "params_nonembed", "flops_convention", "flops_per_token", "flops_per_token_exact",
                "flops_per_token_rule", "flops_per_token_6n", "run_dir")
        return {k: getattr(self, k) for k in keys} | {"flops_used": self.flops_used}


@dataclass
class Plan:
    cells: list                      # [Cell], in run order (objective, budget, size)
    left_out: list                   # [(name, steps, reason)]: too few steps for min_steps
    vocab_size: int
    seq_len: int
    flops: str                       # sweep.flops


def budget_tag(c: float) -> str:
    """1e12 -> '1e12', 3.16e12 -> '3.16e12' (cell names stay short and readable)."""
    return re.sub(r"e\+?0*(\d)", r"e\1", f"{c:.3g}")


def cell_name(objective: str, size: str, budget: float) -> str:
    return f"{objective}-{size}-C{budget_tag(budget)}"


def data_shape(base: Config) -> tuple[int, int]:
    """(vocab size, seq_len) of the base config's training data, read the way the trainer reads them."""
    from mdtrain.data.loader import build_loader
    # only the tokenizer and the sample length are needed: the cells' own loaders verify the shards
    loader = build_loader(dataclasses.replace(base.data, verify="none"), "train", 1, 0, 1, seed=base.train.seed)
    return loader.tokenizer.vocab_size, loader.seq_len


def model_counts(model_cfg, vocab_size: int, seq_len: int) -> dict:
    """Parameter counts and FLOPs per token of a model config, from the module tree the trainer would build."""
    import torch
    from mdtrain.models import build_model
    from mdtrain.models.flops import count_params, flops_per_token
    with torch.device("meta"):
        model = build_model(model_cfg, vocab_size, seq_len)
    counts = count_params(model)
    fpt = flops_per_token(model_cfg, vocab_size, seq_len)
    return {"total": counts["total"], "nonembed": counts["non_embedding"], "exact": fpt["exact"], "rule": fpt["rule"],
            "6n": 6.0 * counts["non_embedding"]}


def _apply(cfg: Config, overrides: list[str], where: str) -> Config:
    cfg = copy.deepcopy(cfg)
    try:
        for key, value in parse_overrides(overrides):
            set_dotted(cfg, key, value)
        validate_tree(cfg)
    except ConfigError as e:
        raise ConfigError(f"sweep cell {where}: {e}") from None
    return cfg


def model_overrides(objective: str, size: str, backbone: str) -> list[str]:
    """Backbone and size of a cell: ar is causal; a shape sets layers/width/heads, a flavor name clears them."""
    out = [f"objective.name={objective}", f"model.name={'causal' if objective == 'ar' else backbone}"]
    shape = parse_size(size)
    if shape:
        out += [f"model.n_layers={shape[0]}", f"model.d_model={shape[1]}", f"model.n_heads={shape[2]}"]
    else:
        out += [f"model.flavor={size}", "model.n_layers=null", "model.d_model=null", "model.n_heads=null"]
    return out


def plan_sweep(base: Config, sweep: SweepConfig, shape: tuple[int, int] | None = None) -> Plan:
    """Every cell of the grid with its config, steps and counts; cells under ``sweep.min_steps`` are left out.

    ``shape`` = (vocab size, seq_len) when already known (else read from the base config's data)."""
    vocab, seq_len = shape or data_shape(base)
    out_dir = os.path.abspath(sweep.out)
    cells, left_out, counts = [], [], {}
    for obj in sweep.objectives:
        for budget in sorted(float(c) for c in sweep.budgets):
            for size in sweep.sizes_for(obj):
                name = cell_name(obj, size, budget)
                shape_ovr = model_overrides(obj, size, sweep.backbone)
                obj_ovr = list(sweep.overrides.get(obj, []))
                key = (obj, size)
                if key not in counts:  # the per-objective overrides may change the model (variant, cond_dim)
                    counts[key] = model_counts(_apply(base, shape_ovr + obj_ovr, name).model, vocab, seq_len)
                c = counts[key]
                fpt = c[sweep.flops]
                tokens_per_step = base.train.global_batch_size * seq_len
                steps = int(round(budget / (fpt * tokens_per_step)))
                if steps < sweep.min_steps:
                    left_out.append((name, steps, f"{steps} steps < sweep.min_steps={sweep.min_steps}"))
                    continue
                run = [f"train.steps={steps}", f"train.run_dir={os.path.join(out_dir, 'cells', name)}"]
                if sweep.warmup_fraction >= 0:
                    run.append(f"optim.warmup_steps={int(round(sweep.warmup_fraction * steps))}")
                overrides = shape_ovr + run + obj_ovr  # the per-objective overrides last: they win
                cfg = _apply(base, overrides, name)
                _check_cell(cfg, name, steps)
                cells.append(Cell(name=name, objective=obj, size=size, budget=budget, steps=steps,
                                  tokens=steps * tokens_per_step, seq_len=seq_len,
                                  global_batch_size=cfg.train.global_batch_size, params_total=c["total"],
                                  params_nonembed=c["nonembed"], flops_convention=sweep.flops, flops_per_token=fpt,
                                  flops_per_token_exact=c["exact"], flops_per_token_rule=c["rule"],
                                  flops_per_token_6n=c["6n"],
                                  run_dir=cfg.train.run_dir, overrides=overrides, cfg=cfg))
    names = [c.name for c in cells] + [n for n, _, _ in left_out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"sweep cells {dup} share a name: budgets closer than 3 significant digits?")
    return Plan(cells, left_out, vocab, seq_len, sweep.flops)


def _check_cell(cfg: Config, name: str, steps: int) -> None:
    if cfg.optim.schedule not in ("cosine", "wsd"):
        raise ConfigError(f"sweep cell {name}: optim.schedule={cfg.optim.schedule} does not decay the learning rate "
                          f"to the end of each run; set optim.schedule: cosine (or wsd) in the sweep file, so that "
                          f"every cell's final loss is an annealed one")
    if cfg.optim.warmup_steps >= steps:
        raise ConfigError(f"sweep cell {name}: optim.warmup_steps={cfg.optim.warmup_steps} >= its {steps} steps; "
                          f"lower it or set sweep.warmup_fraction")


# ----------------------------------------------------------------------------------------------------
# where a cell stands


def read_jsonl(path: str) -> list[dict]:
    """Rows of a JSONL file; a torn last line (a crash mid-write) is ignored."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def final_eval(cell: Cell) -> dict | None:
    """The cell's validation eval row at its last step (the number the sweep fits), or None."""
    rows = [r for r in read_jsonl(os.path.join(cell.run_dir, "metrics.jsonl"))
            if r.get("split") == "valid" and r.get("step") == cell.steps and "nll" in r]
    return rows[-1] if rows else None


def cell_status(cell: Cell) -> tuple[str, str]:
    """("done" | "partial" | "todo", detail). Raises when the cell on disk was planned differently."""
    check_cell_file(cell)
    row = final_eval(cell)
    if row is not None:
        return "done", f"loss {row['nll']:.4f}"
    ckpts = list_checkpoints(os.path.join(cell.run_dir, "checkpoints"))
    if ckpts:
        return "partial", f"checkpoint at step {ckpts[-1][0]} of {cell.steps}"
    if started(cell):
        return "partial", "started, no checkpoint yet"
    return "todo", ""


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def started(cell: Cell) -> bool:
    """Whether the cell has trained at all (a metrics file or a checkpoint)."""
    return (os.path.exists(os.path.join(cell.run_dir, "metrics.jsonl"))
            or bool(list_checkpoints(os.path.join(cell.run_dir, "checkpoints"))))


def check_cell_file(cell: Cell) -> None:
    """A cell dir started under another plan (other steps, lr, eval settings...) must not be resumed or reused.
    A cell that never started has nothing to protect: its plan is simply rewritten when it runs."""
    path = os.path.join(cell.run_dir, CELL_FILE)
    if not os.path.exists(path) or not started(cell):
        return
    with open(path) as fh:
        old = _flat(json.load(fh).get("config", {}))
    new = _flat(to_dict(cell.cfg))
    # keys on one side only come from a code update that added or removed a config field, not from the user
    diff = [f"{k}: {old[k]!r} -> {new[k]!r}" for k in sorted(set(old) & set(new))
            if old[k] != new[k] and not k.startswith(RESULT_NEUTRAL)]
    if diff:
        raise ConfigError(f"sweep cell {cell.name} in {cell.run_dir} was started with a different config "
                          f"({'; '.join(diff[:5])}{' ...' if len(diff) > 5 else ''}); delete that directory to rerun "
                          f"the cell, or give this sweep another sweep.out")


def write_cell_file(cell: Cell, commit: str, dirty) -> None:
    """Record the plan of a cell (and the code it runs) before it first starts; kept once it has started."""
    from mdtrain.configtools import atomic_write_text
    path = os.path.join(cell.run_dir, CELL_FILE)
    if os.path.exists(path) and started(cell):
        return
    os.makedirs(cell.run_dir, exist_ok=True)
    atomic_write_text(path, json.dumps({**cell.record(), "commit": commit, "dirty": dirty,
                                        "overrides": cell.overrides, "config": to_dict(cell.cfg)}, indent=1))
