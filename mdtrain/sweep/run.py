"""``mdtrain sweep SWEEP.yaml [plan|run|collect|fit] [key=value ...]``: run a scaling-law grid, one idempotent cell
at a time, and fit it.

    plan     the cells (objective x budget x size) with both parameter counts, FLOPs per token, steps, tokens and
             where each stands (done / partial / todo); with executor slurm also the sbatch script of the array
    run      run every cell that is not done (a partial cell resumes from its newest checkpoint), append one row per
             finished cell to SWEEP_OUT/results.jsonl, then collect and fit (slurm with sweep.wait=false: submit only)
    submit   the same as run
    collect  append the rows of finished cells that results.jsonl lacks (after a SLURM array), then fit
    fit      the report from results.jsonl: SWEEP_OUT/report/{report.md, fits.json, results.csv, *.png}

A cell is ``SWEEP_OUT/cells/<objective>-<size>-C<budget>/``, an ordinary run dir (config.yaml, metrics.jsonl,
checkpoints/) plus ``cell.json`` (the plan it was started with, the git commit) and ``attempts.jsonl`` (the wall time
of each attempt this driver ran). A done cell (its final validation eval row is in metrics.jsonl) is never trained
or evaluated again; a cell dir started under a different config is refused rather than silently mixed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Optional

from mdtrain.config import Config
from mdtrain.configtools import ConfigError, atomic_write_text, dump_yaml, to_dict
from mdtrain.sweep.config import SweepConfig, load_sweep
from mdtrain.sweep.plan import (Cell, Plan, cell_status, final_eval, plan_sweep, read_jsonl, write_cell_file)

ACTIONS = ("plan", "run", "submit", "collect", "fit")
ATTEMPTS = "attempts.jsonl"


@dataclass
class Sweep:
    """A loaded sweep: its base training config, its sweep section and its plan."""
    base: Config
    sweep: SweepConfig
    plan: Plan

    @property
    def out(self) -> str:
        return os.path.abspath(self.sweep.out)

    @property
    def results_path(self) -> str:
        return os.path.join(self.out, "results.jsonl")

    @property
    def report_dir(self) -> str:
        return os.path.join(self.out, "report")

    @property
    def base_yaml(self) -> str:
        """The base training config as a file: subprocess and SLURM cells run ``mdtrain train BASE overrides``."""
        return os.path.join(self.out, "base.yaml")


def load(path: str, overrides: Optional[list[str]] = None) -> Sweep:
    base, sweep = load_sweep(path, overrides)
    return Sweep(base, sweep, plan_sweep(base, sweep))


def git_commit() -> tuple[str, Optional[bool]]:
    """(``git rev-parse HEAD`` of the mdtrain checkout, whether tracked files differ from it); ("unknown", None)."""
    import mdtrain
    repo = os.path.dirname(os.path.dirname(os.path.abspath(mdtrain.__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=20)
        if head.returncode:
            return "unknown", None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                capture_output=True, text=True, timeout=20)
        return head.stdout.strip(), (bool(status.stdout.strip()) if status.returncode == 0 else None)
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


# ----------------------------------------------------------------------------------------------------
# plan


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def plan_table(sw: Sweep) -> str:
    """The plan as a fixed-width table with each cell's status."""
    head = ["cell", "N total", "N non-emb", "FLOPs/token", "steps", "tokens", "status"]
    rows = []
    for c in sw.plan.cells:
        status, detail = cell_status(c)
        rows.append([c.name, _fmt(c.params_total), _fmt(c.params_nonembed), _fmt(c.flops_per_token), str(c.steps),
                     _fmt(c.tokens), status + (f" ({detail})" if detail else "")])
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    lines = ["  ".join(v.ljust(w) if i in (0, 6) else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
             for r in [head] + rows]
    p = sw.plan
    sizes = "/".join(str(n) for n in sorted({len(sw.sweep.sizes_for(o)) for o in sw.sweep.objectives}))
    lines.insert(0, f"sweep {sw.out}: {len(p.cells)} cells; {len(sw.sweep.objectives)} objective(s) x "
                    f"{len(sw.sweep.budgets)} budget(s) x {sizes} size(s); seq_len {p.seq_len}, vocab "
                    f"{p.vocab_size}, global batch {sw.base.train.global_batch_size}; budgets in '{p.flops}' FLOPs, "
                    f"{_fmt(sum(c.flops_used for c in p.cells))} FLOPs in all")
    for name, steps, why in p.left_out:
        lines.append(f"left out: {name} ({why})")
    return "\n".join(lines)


def write_base(sw: Sweep) -> None:
    atomic_write_text(sw.base_yaml, "# the base training config of every cell (written by mdtrain sweep)\n"
                      + dump_yaml(sw.base))


def _launch_changes(sw: Sweep) -> dict:
    changes = dataclasses.asdict(sw.sweep.launch)
    changes["folder"] = changes["folder"] or os.path.join(sw.out, "submitit")
    changes["job_name"] = changes["job_name"] or "mdtrain-sweep-" + os.path.basename(sw.out)
    return changes


def _specs(sw: Sweep, cells: list[Cell]) -> list[tuple]:
    return [(sw.base_yaml, list(c.overrides)) for c in cells]


def do_plan(sw: Sweep) -> int:
    print(plan_table(sw))
    todo = [c for c in sw.plan.cells if cell_status(c)[0] != "done"]
    if sw.sweep.executor in ("slurm", "local") and todo:
        from mdtrain.launch import slurm as launcher
        write_base(sw)
        cluster = "slurm" if sw.sweep.executor == "slurm" else "local"
        print(f"\n# {sw.sweep.executor}: the {len(todo)} unfinished cell(s) would be submitted as:")
        print(launcher.submit(_specs(sw, todo), cluster, dry_run=True, **_launch_changes(sw)), end="")
    return 0


# ----------------------------------------------------------------------------------------------------
# running cells


def lock_cell(cell: Cell) -> Optional[int]:
    """An exclusive lock on the cell (RUN_DIR/.lock) or None when another process holds it: two drivers started
    on one sweep must not train the same cell at once. A subprocess cell inherits the descriptor, so the lock
    lives as long as the training does, even if this driver dies first."""
    import fcntl
    os.makedirs(cell.run_dir, exist_ok=True)
    fd = os.open(os.path.join(cell.run_dir, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _record_attempt(cell: Cell, start: float, status: str, executor: str) -> None:
    with open(os.path.join(cell.run_dir, ATTEMPTS), "a") as fh:
        fh.write(json.dumps({"start": start, "wall_s": time.time() - start, "status": status,
                             "executor": executor}) + "\n")


def _tail(path: str, n: int = 15) -> str:
    try:
        with open(path, errors="replace") as fh:
            return "".join(fh.readlines()[-n:])
    except OSError:
        return ""


def run_inprocess(cell: Cell, threads: int = 0) -> bool:
    """Train one cell in this process (resuming when it has checkpoints); its output goes to RUN_DIR/train.log."""
    import torch

    from mdtrain import signals
    from mdtrain.trainer import run
    lock = lock_cell(cell)
    if lock is None:
        print(f"  {cell.name} is being trained by another process (its .lock is held): skipped", flush=True)
        return False
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    log_path = os.path.join(cell.run_dir, "train.log")
    start, status = time.time(), "failed"
    try:
        with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            try:
                run(cell.cfg)
                status = "done"
            except signals.Preempted:  # checkpointed: the driver stops too, and a re-run resumes the cell
                status = "preempted"
                raise
            except Exception:  # noqa: BLE001 - one failed cell must not stop the sweep; the log has the trace
                traceback.print_exc()
    finally:
        torch.set_num_threads(old_threads)
        _record_attempt(cell, start, status, "inprocess")
        os.close(lock)
    if status != "done":
        print(f"  {cell.name} failed; the end of {log_path}:\n{_tail(log_path)}", file=sys.stderr, flush=True)
    return status == "done"


def run_subprocesses(sw: Sweep, cells: list[Cell], on_done) -> list[str]:
    """``python -m mdtrain train BASE overrides`` per cell, ``sweep.parallel`` at once; names of failed cells."""
    env = dict(os.environ)
    if sw.sweep.threads:
        env["OMP_NUM_THREADS"] = str(sw.sweep.threads)
    pending, running, failed = list(cells), [], []
    while pending or running:
        while pending and len(running) < sw.sweep.parallel:
            cell = pending.pop(0)
            lock = lock_cell(cell)
            if lock is None:
                failed.append(cell.name)
                print(f"  {cell.name} is being trained by another process (its .lock is held): skipped", flush=True)
                continue
            log = open(os.path.join(cell.run_dir, "train.log"), "a")
            cmd = [sys.executable, "-m", "mdtrain", "train", sw.base_yaml, *cell.overrides]
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, pass_fds=(lock,))
            os.close(lock)  # the child holds the lock now
            running.append((cell, proc, log, time.time()))
            print(f"  started {cell.name} ({cell.steps} steps)", flush=True)
        time.sleep(0.2)
        for item in list(running):
            cell, proc, log, start = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            ok = proc.returncode == 0
            _record_attempt(cell, start, "done" if ok else f"exit {proc.returncode}", "subprocess")
            if not ok:
                failed.append(cell.name)
                print(f"  {cell.name} failed (exit {proc.returncode}); the end of its train.log:\n"
                      f"{_tail(os.path.join(cell.run_dir, 'train.log'))}", file=sys.stderr, flush=True)
            on_done(cell)
    return failed


def run_submitit(sw: Sweep, cells: list[Cell], on_done) -> tuple[list[str], list]:
    """Cells as submitit jobs through the launcher: LocalExecutor waves of ``sweep.parallel``, or one SLURM array.

    Returns (failed cell names, the jobs still running when not waiting)."""
    from mdtrain.launch import slurm as launcher
    changes = _launch_changes(sw)
    if sw.sweep.executor == "slurm":
        jobs = launcher.submit(_specs(sw, cells), "slurm", **changes)
        record = [{"cell": c.name, "job_id": j.job_id} for c, j in zip(cells, jobs)]
        atomic_write_text(os.path.join(sw.out, "slurm_jobs.json"), json.dumps(record, indent=1))
        print(f"submitted {len(jobs)} cell(s) as SLURM job(s) {jobs[0].job_id.split('_')[0]}...; logs under "
              f"{changes['folder']}", flush=True)
        if not sw.sweep.wait:
            return [], jobs
        waves = [(cells, jobs)]
    else:
        waves = []
        for i in range(0, len(cells), sw.sweep.parallel):
            wave = cells[i:i + sw.sweep.parallel]
            waves.append((wave, None))
    failed = []
    for wave, jobs in waves:
        if jobs is None:
            jobs = launcher.submit(_specs(sw, wave), "local", **changes)
            print(f"  started {', '.join(c.name for c in wave)}", flush=True)
        launcher.wait(jobs, echo=False)
        for cell, job in zip(wave, jobs):
            if final_eval(cell) is None:
                failed.append(cell.name)
                print(f"  {cell.name} failed: see {job.paths.stderr}", file=sys.stderr, flush=True)
            on_done(cell)
    return failed, []


def do_run(sw: Sweep) -> int:
    """Run every unfinished cell, append rows as cells finish, then collect and fit."""
    print(plan_table(sw), flush=True)
    todo = [c for c in sw.plan.cells if cell_status(c)[0] != "done"]
    done = len(sw.plan.cells) - len(todo)
    print(f"\n{done} cell(s) done, {len(todo)} to run with executor '{sw.sweep.executor}'", flush=True)
    os.makedirs(sw.out, exist_ok=True)
    write_base(sw)
    commit, dirty = git_commit()
    for c in todo:
        write_cell_file(c, commit, dirty)

    def on_done(cell: Cell) -> None:
        row = result_row(cell)
        if row is not None:
            append_row(sw.results_path, row)
            print(f"  {cell.name}: loss {row['loss']:.4f} nats/token after {cell.steps} steps "
                  f"({row['wall_s']:.1f} s)", flush=True)

    failed, running = [], []
    t0 = time.time()
    if sw.sweep.executor == "inprocess":
        for i, cell in enumerate(todo):
            print(f"[{i + 1}/{len(todo)}] {cell.name}: {cell.steps} steps, {_fmt(cell.tokens)} tokens", flush=True)
            if not run_inprocess(cell, sw.sweep.threads):
                failed.append(cell.name)
            on_done(cell)
    else:
        # longest first (the largest budgets, then the most steps), so that parallel slots finish together
        todo.sort(key=lambda c: (-c.budget, -c.steps))
        if sw.sweep.executor == "subprocess":
            failed = run_subprocesses(sw, todo, on_done)
        else:
            failed, running = run_submitit(sw, todo, on_done)
    if running:
        print("not waiting (sweep.wait=false): run `mdtrain sweep SWEEP.yaml collect` when the jobs are done")
        return 0
    if todo:
        print(f"ran {len(todo) - len(failed)} of {len(todo)} cell(s) in {time.time() - t0:.0f} s", flush=True)
    rc = do_collect(sw)
    if failed:
        print(f"failed cells ({len(failed)}): {', '.join(failed)}; re-run the same command to retry them (partial "
              f"cells resume)", file=sys.stderr)
        return 1
    return rc


# ----------------------------------------------------------------------------------------------------
# rows, collect, fit


def _metrics_train_seconds(rows: list[dict]) -> float:
    """Training time from the logged throughput (tokens between log rows / tokens_per_s): the wall time of cells
    this driver did not time itself (submitit jobs); excludes start-up, evaluation and checkpoint writing."""
    total, prev = 0.0, 0
    for r in rows:
        if "tokens_per_s" not in r or "split" in r:
            continue
        tokens = r.get("tokens", 0)
        delta = tokens - prev if tokens >= prev else tokens  # a restart from scratch counts from zero again
        if r["tokens_per_s"] > 0:
            total += delta / r["tokens_per_s"]
        prev = tokens
    return total


def result_row(cell: Cell) -> Optional[dict]:
    """The result row of a finished cell (None if it is not finished): the fields the analysis reads
    (``ROW_FIELDS``) plus everything needed to audit it."""
    from mdtrain.models.flavors import resolve
    ev = final_eval(cell)
    if ev is None:
        return None
    info = {}
    path = os.path.join(cell.run_dir, "cell.json")
    if os.path.exists(path):
        with open(path) as fh:
            info = json.load(fh)
    attempts = read_jsonl(os.path.join(cell.run_dir, ATTEMPTS))
    if attempts and not any(a.get("executor") in ("local", "slurm") for a in attempts):
        wall, source = sum(a["wall_s"] for a in attempts), "driver"
    else:
        wall, source = _metrics_train_seconds(read_jsonl(os.path.join(cell.run_dir, "metrics.jsonl"))), "metrics"
    dims = resolve(cell.cfg.model)
    rec = cell.record()
    return {
        "objective": cell.objective, "flavor": cell.size, "params_total": cell.params_total,
        "params_nonembed": cell.params_nonembed, "budget_flops": cell.budget, "steps": cell.steps,
        "tokens": cell.tokens, "loss": ev["nll"], "wall_s": wall, "commit": info.get("commit", "unknown"),
        "cell": cell.name, "dirty": info.get("dirty"), "wall_source": source, "loss_bound": ev.get("bound"),
        "bits_per_token": ev.get("bits_per_token"), "eval_tokens": ev.get("tokens"),
        **{k: rec[k] for k in ("flops_convention", "flops_per_token", "flops_per_token_exact", "flops_per_token_rule",
                               "flops_per_token_6n", "flops_used", "seq_len", "global_batch_size")},
        "n_layers": dims.n_layers, "d_model": dims.d_model, "n_heads": dims.n_heads, "model": cell.cfg.model.name,
        "lr": cell.cfg.optim.lr, "schedule": cell.cfg.optim.schedule, "run_dir": cell.run_dir,
        "entropy_per_token": known_entropy(cell.cfg.data),
    }


def known_entropy(data_cfg) -> Optional[float]:
    """The entropy rate (nats/token) of the validation data when it is known exactly (a synthetic source, or
    shards prepared from one), else None: the floor no model's loss can go below, drawn on the plots."""
    from mdtrain.data.errors import DataError
    from mdtrain.data.shards import read_manifest
    from mdtrain.data.synthetic import entropy_per_token
    spec = data_cfg.valid or data_cfg.train
    if spec.startswith("synthetic:"):
        return entropy_per_token(spec, data_cfg.seq_len)
    try:
        return read_manifest(spec).get("entropy_per_token")
    except DataError:  # an unreadable manifest has no known entropy (the run itself read it, so this is rare)
        return None


def append_row(path: str, row: dict) -> bool:
    """Append ``row`` unless results.jsonl already holds this cell with the same result; True if appended."""
    for r in read_jsonl(path):
        if r.get("cell") == row["cell"] and r.get("steps") == row["steps"] and r.get("loss") == row["loss"]:
            return False
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return True


def plan_rows(sw: Sweep) -> tuple[list[dict], int]:
    """The last results row of each cell of the current plan, and how many rows belong to no planned cell."""
    names = {c.name for c in sw.plan.cells}
    last, other = {}, 0
    for r in read_jsonl(sw.results_path):
        if r.get("cell") in names:
            last[r["cell"]] = r
        else:
            other += 1
    order = [c.name for c in sw.plan.cells if c.name in last]
    return [last[n] for n in order], other


def do_collect(sw: Sweep) -> int:
    """Rows for finished cells that results.jsonl lacks; a count of what is not finished; then fit."""
    counts = {"done": 0, "partial": 0, "todo": 0}
    added = 0
    for cell in sw.plan.cells:
        status, _ = cell_status(cell)
        counts[status] += 1
        if status == "done":
            added += append_row(sw.results_path, result_row(cell))
    print(f"collect: {counts['done']} done ({added} new row(s) in {sw.results_path}), {counts['partial']} partial, "
          f"{counts['todo']} not started", flush=True)
    return do_fit(sw)


def do_fit(sw: Sweep) -> int:
    from mdtrain.sweep.report import write_report
    rows, other = plan_rows(sw)
    if other:
        print(f"fit: {other} row(s) of {sw.results_path} belong to no cell of the current plan: left out")
    if not rows:
        print(f"fit: no finished cells in {sw.results_path}; run the sweep first (mdtrain sweep SWEEP.yaml run)")
        return 1
    f = sw.sweep.fit
    an = write_report(rows, sw.report_dir, params=f.params, reference=f.reference, frontier_form=f.frontier_form,
                      include_flagged=f.include_flagged, isoflop_uncertainty=f.isoflop_uncertainty,
                      parametric=f.parametric, n_boot=f.n_boot, seed=f.seed)
    print(f"fit: {len(rows)} run(s) -> {an.files['report_md']}")
    for m in an.multipliers:
        print(f"  compute multiplier {m.objective} vs {m.reference}: "
              + (f"x{m.value:.3g}" if m.usable else f"{m.status} ({m.message})")
              + (" (extrapolated)" if m.extrapolated else ""))
    for msg in an.messages:
        print(f"  note: {msg}")
    return 0


# ----------------------------------------------------------------------------------------------------
# command line


def parse_args(args) -> tuple[str, str, list[str]]:
    """(sweep file, action, overrides) from the CLI namespace, in any order: `SWEEP.yaml run k=v` or
    `run SWEEP.yaml k=v` (argparse cannot tell the file, the action and the overrides apart by position)."""
    tokens = [t for t in [getattr(args, "config", None), *getattr(args, "overrides", []),
                          getattr(args, "action", None)] if t]
    overrides = [t for t in tokens if "=" in t]
    actions = [t for t in tokens if "=" not in t and t in ACTIONS]
    paths = [t for t in tokens if "=" not in t and t not in ACTIONS]
    usage = "usage: mdtrain sweep SWEEP.yaml [plan|run|submit|collect|fit] [key=value ...]"
    if len(actions) > 1:
        raise ConfigError(f"one action at a time, got {actions}; {usage}")
    if len(paths) != 1:
        what = f"got {paths}" if paths else "none given"
        raise ConfigError(f"mdtrain sweep needs exactly one sweep file ({what}); unknown actions are taken for "
                          f"files (actions: {', '.join(ACTIONS)}); {usage}")
    return paths[0], (actions[0] if actions else "plan"), overrides


def main(args) -> int:
    path, action, overrides = parse_args(args)
    if getattr(args, "print_config", False):
        base, sweep = load_sweep(path, overrides)
        print(dump_yaml(base) + dump_yaml({"sweep": to_dict(sweep)}), end="")
        return 0
    sw = load(path, overrides)
    if action == "plan":
        return do_plan(sw)
    if action in ("run", "submit"):
        return do_run(sw)
    if action == "collect":
        return do_collect(sw)
    return do_fit(sw)
