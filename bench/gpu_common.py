"""Scaffolding shared by the prepared GPU runs (``bench/gpu_train.py``, ``bench/gpu_sample.py``).

A GPU is lent for minutes, so each run is one script whose work is split into sections with their own time
budgets and ``--skip`` switches. Every table row is declared before any section runs, so the printed tables are
complete whatever happens: a row holds a measurement or says why it has none (``skipped (--skip ...)``,
``skipped (time budget)``, ``stopped (section budget ...)``, ``error: ...``, ``skipped (no CUDA)``). Each section
prints its tables when it ends and everything is written to ``--out`` as it goes (log, JSON, Markdown), so a run
stopped from outside still leaves what it measured. CUDA-only calls are guarded here (``CUDA``) so that the same
code runs on a CPU at toy sizes first.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from typing import Callable, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # the device machine runs the scripts from a copy of the tree, mdtrain not installed
    sys.path.insert(0, REPO)

import torch  # noqa: E402

CUDA = torch.cuda.is_available()
NO_CUDA = "skipped (no CUDA)"
PENDING = "not run"


class SectionTimeout(BaseException):
    """Raised by the alarm when a section outlives its budget. A BaseException, so that ``except Exception``
    (out-of-memory handling, optional imports) inside a section cannot swallow it."""


def _alarm(signum, frame):
    raise SectionTimeout()


class Table:
    """A Markdown table whose rows are declared up front; ``set`` fills cells, ``close`` marks what stayed empty."""

    def __init__(self, name: str, title: str, columns: list[str], rows: list[str]):
        self.name, self.title, self.columns = name, title, columns
        self.keys = list(rows)
        self.cells: dict[str, dict] = {k: {} for k in rows}
        self.status: dict[str, str] = {k: PENDING for k in rows}

    def add_row(self, key: str) -> None:
        if key not in self.cells:
            self.keys.append(key)
            self.cells[key] = {}
            self.status[key] = PENDING

    def set(self, key: str, **values) -> None:
        if key not in self.cells:
            raise KeyError(f"table {self.name}: undeclared row {key!r}")
        self.cells[key].update({k: _fmt(v) for k, v in values.items()})
        self.status[key] = "done"

    def close(self, key: str, why: str) -> None:
        """Give an unfilled row its reason (it stays unfilled: the reason goes in the first data column)."""
        if self.status[key] == PENDING:
            self.status[key] = why

    def unfinished(self) -> list[str]:
        return [k for k in self.keys if self.status[k] == PENDING]

    def markdown(self) -> str:
        lines = [f"**{self.title}**", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join("---" for _ in self.columns) + "|"]
        for k in self.keys:
            row = [k]
            if self.status[k] not in ("done",) and not self.cells[k]:
                row += [self.status[k]] + [""] * (len(self.columns) - 2)
            else:
                row += [self.cells[k].get(c, "") for c in self.columns[1:]]
            lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"title": self.title, "columns": self.columns,
                "rows": [{"row": k, "status": self.status[k], **self.cells[k]} for k in self.keys]}


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v == 0:
            return "0"
        a = abs(v)
        if a >= 1e5:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.1f}"
        if a >= 0.01:
            return f"{v:.3g}"
        return f"{v:.2e}"
    return str(v)


def common_args(ap: argparse.ArgumentParser, default_budget: float) -> None:
    ap.add_argument("--toy", action="store_true", help="tiny shapes (the CPU rehearsal; also runs on a GPU)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--out", default=os.environ.get("OUT") or "",
                    help="folder for the log, JSON and Markdown tables (default $OUT, else bench/results/gpu_<date>)")
    ap.add_argument("--budget", type=float, default=default_budget,
                    help="seconds for the whole run: sections that would start past it are skipped")
    ap.add_argument("--skip", default="", help="comma-separated section names to skip")
    ap.add_argument("--only", default="", help="comma-separated section names to run (all others skipped)")
    ap.add_argument("--section-scale", type=float, default=1.0,
                    help="multiply every section's own budget (e.g. 2 on a slow or busy machine)")
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile backend (inductor; aot_eager only for quick CPU checks of the traced paths)")


class Bench:
    """One run: the tables, the log, the time budgets and the section runner."""

    def __init__(self, args, name: str):
        self.args, self.name = args, name
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + args.budget
        self.section_deadline = self.deadline
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d_%H%M%S")
        self.out = args.out or os.path.join(REPO, "bench", "results", f"gpu_{stamp}")
        os.makedirs(self.out, exist_ok=True)
        self.log_path = os.path.join(self.out, f"{name}.log")
        self._log = open(self.log_path, "w", encoding="utf-8")
        self.tables: list[Table] = []
        self.skip = {s for s in args.skip.split(",") if s}
        self.only = {s for s in args.only.split(",") if s}
        self.failures: list[str] = []
        self.sections_seen: list[str] = []
        self.device = torch.device("cuda" if (CUDA and args.device != "cpu") else "cpu")
        if args.device == "cuda" and not CUDA:
            raise SystemExit("--device cuda but torch sees no CUDA device")
        signal.signal(signal.SIGALRM, _alarm)
        if args.compile_backend != "inductor":  # train.compile calls nn.Module.compile() without a backend
            plain = torch.nn.Module.compile

            def compile_with(module, *a, **kw):
                kw.setdefault("backend", args.compile_backend)
                return plain(module, *a, **kw)
            torch.nn.Module.compile = compile_with
        if args.toy and self.device.type == "cpu":
            torch.set_num_threads(1)  # toy tensors: one thread is faster and immune to oversubscribed cores

    # -- output ---------------------------------------------------------------------------------------------
    def log(self, *parts) -> None:
        msg = " ".join(str(p) for p in parts)
        print(msg, flush=True)
        self._log.write(msg + "\n")
        self._log.flush()

    def log_quiet(self, text: str) -> None:
        """Into the log file only (long outputs such as a pytest transcript)."""
        self._log.write(text if text.endswith("\n") else text + "\n")
        self._log.flush()

    def table(self, name: str, title: str, columns: list[str], rows: list[str]) -> Table:
        t = Table(name, title, columns, rows)
        self.tables.append(t)
        return t

    def save(self) -> None:
        data = {"script": self.name, "argv": sys.argv, "elapsed_s": round(time.perf_counter() - self.t0, 1),
                "failures": self.failures, "tables": {t.name: t.as_dict() for t in self.tables}}
        with open(os.path.join(self.out, f"{self.name}.json"), "w") as fh:
            json.dump(data, fh, indent=1)
        with open(os.path.join(self.out, f"{self.name}.md"), "w") as fh:
            fh.write("\n\n".join(t.markdown() for t in self.tables) + "\n")

    # -- time -----------------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def time_left(self) -> float:
        """Seconds left in the current section (never past the run's budget)."""
        return min(self.section_deadline, self.deadline) - time.perf_counter()

    # -- sections -------------------------------------------------------------------------------------------
    def section(self, name: str, budget: float, rows: list[tuple[Table, str]], fn: Callable[[], None],
                min_start: float = 5.0) -> None:
        """Run ``fn`` within ``budget`` seconds (scaled by --section-scale, cut at the run's budget); whatever rows
        of ``rows`` it left empty get the reason. Prints the tables it touched."""
        self.sections_seen.append(name)
        budget *= self.args.section_scale
        left = self.deadline - time.perf_counter()
        why = None
        if name in self.skip or (self.only and name not in self.only):
            why = f"skipped (--skip {name})" if name in self.skip else "skipped (not in --only)"
        elif left < min(min_start, budget):
            why = "skipped (time budget)"
        touched = []
        for t, _ in rows:
            if t not in touched:
                touched.append(t)
        if why is None:
            allowed = max(1.0, min(budget, left))
            self.log(f"\n=== section {name}: budget {allowed:.0f} s (run time left {left:.0f} s) ===")
            self.section_deadline = time.perf_counter() + allowed
            t_start = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, allowed + 2.0)  # 2 s grace for rows that check time_left()
            try:
                fn()
            except SectionTimeout:
                why = f"stopped (section budget {allowed:.0f} s)"
                self.log(f"section {name}: {why}")
            except Exception as e:  # a broken section must not take the others with it
                why = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                self.failures.append(f"{name}: {why}")
                self.log(f"section {name} failed:\n{traceback.format_exc()}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                self.section_deadline = self.deadline
            self.log(f"section {name} took {time.perf_counter() - t_start:.1f} s")
            free_memory()
        else:
            self.log(f"\n=== section {name}: {why} ===")
        for t, key in rows:
            t.close(key, why or "no value (see the log)")
        for t in touched:
            self.log("\n" + t.markdown())
        self.save()

    def row_guard(self, table: Table, key: str, need_s: float) -> bool:
        """True if the current section has ``need_s`` seconds left for this row; else marks it skipped."""
        if self.time_left() >= need_s:
            return True
        table.close(key, f"skipped (time budget: {self.time_left():.0f} s left, ~{need_s:.0f} s needed)")
        return False

    def guarded(self, table: Table, keys, fn: Callable[[], None]) -> None:
        """Run one row's (or a few rows') work; an exception becomes those rows' error and the section goes on.
        Out-of-memory is said as such. (A SectionTimeout, a BaseException, still stops the section.)"""
        keys = [keys] if isinstance(keys, str) else list(keys)
        try:
            fn()
        except Exception as e:
            oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e)
            why = "does not fit (CUDA out of memory)" if oom else \
                f"error: {type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}"
            self.log(f"rows {keys} failed:\n{traceback.format_exc()}")
            if not oom:
                self.failures.append(f"{table.name}/{keys[0]}: {why}")
            for k in keys:
                table.close(k, why)
            free_memory()

    def finish(self) -> int:
        """Print every table last (the device tool returns the tail of the output) and say where the files are."""
        for t in self.tables:
            for k in t.unfinished():
                t.close(k, "no value (see the log)")
            for k in t.keys:
                if t.status[k] == "done" and any(str(v).startswith("FAIL") for v in t.cells[k].values()):
                    self.failures.append(f"{t.name}/{k}: FAIL")
        self.save()
        self.log(f"\n##### {self.name}: summary ({self.elapsed():.0f} s; files in {self.out}) #####")
        for t in self.tables:
            self.log("\n" + t.markdown())
        if self.failures:
            self.log("\nfailures: " + "; ".join(self.failures))
        self._log.close()
        return 1 if self.failures else 0


# -------------------------------------------------------------------------------------------------- helpers


def free_memory() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def sync(device=None) -> None:
    if CUDA and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def median(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a − ref|| / ||ref|| in float64 (NaN anywhere gives NaN: it never passes a bound)."""
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(a).all():
        return float("nan")
    return float((a - ref).norm() / ref.norm().clamp_min(1e-300))


def verdict(value: float, bound: float) -> str:
    return "ok" if value == value and value <= bound else "FAIL"


def time_calls(fn: Callable[[], object], warmup: int, repeats: int, device) -> list[float]:
    """Wall seconds of each of ``repeats`` calls after ``warmup``; the device is synchronised around each."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def randomize_zero_params(module: torch.nn.Module, std: float = 0.02, seed: int = 0) -> int:
    """Give every all-zero parameter (adaLN-Zero, the zero-initialised head) random values, so that timings and
    samplers work on the values a trained network has rather than on zeros. Returns how many were changed."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point() and not bool(p.detach().abs().sum()):
                p.copy_((torch.randn(p.shape, generator=g) * std).to(p.device, p.dtype))
                n += 1
    return n


def environment_rows(bench: Bench, table: Table) -> None:
    """Device, driver, versions, date and command into ``table`` (rows: see ENV_ROWS)."""
    dev = bench.device
    table.set("date (UTC)", value=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"))
    table.set("command", value="`" + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]) + "`")
    table.set("python", value=f"{platform.python_version()} ({sys.executable})")
    table.set("torch", value=f"{torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
                             f"{torch.backends.cudnn.version() if CUDA else 'n/a'})")
    try:
        import triton
        table.set("triton", value=triton.__version__)
    except Exception as e:
        table.set("triton", value=f"not importable ({type(e).__name__})")
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        table.set("device", value=f"{p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, "
                                  f"cc {p.major}.{p.minor}")
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            table.set("driver", value=q.stdout.strip() or q.stderr.strip()[:100])
        except Exception as e:
            table.set("driver", value=f"nvidia-smi failed ({type(e).__name__})")
    else:
        table.set("device", value=f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                                  f"{torch.get_num_threads()} torch threads")
        table.set("driver", value=NO_CUDA)
    try:
        rev = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except Exception:
        rev = ""
    table.set("mdtrain commit", value=rev or "n/a (no .git in this copy of the tree)")


ENV_ROWS = ["date (UTC)", "command", "device", "driver", "python", "torch", "triton", "mdtrain commit",
            "bf16 matmul peak", "device copy bandwidth"]


def measure_ceilings(bench: Bench, table: Table, toy: bool) -> Optional[float]:
    """The two ceilings METHOD.md asks for, measured now: a square bf16 matmul (8192^3 on a GPU, random data, median
    of 10 after 3 warm-ups, timed with device events) and a device-to-device copy. Returns the matmul FLOP/s."""
    dev = bench.device
    n = 256 if toy else 8192
    g = torch.Generator(device=dev).manual_seed(0)
    a = [torch.randn(n, n, device=dev, generator=g, dtype=torch.bfloat16) for _ in range(2)]
    b = [torch.randn(n, n, device=dev, generator=g, dtype=torch.bfloat16) for _ in range(2)]
    times = []
    for i in range(13):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(a[i % 2], b[i % 2])
            end.record()
            end.synchronize()
            dt = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            torch.mm(a[i % 2], b[i % 2])
            dt = time.perf_counter() - t0
        if i >= 3:
            times.append(dt)
    peak = 2.0 * n ** 3 / median(times)
    table.set("bf16 matmul peak", value=f"{peak / 1e12:.1f} TFLOP/s ({n}^3, random bf16, median of 10)")
    del a, b
    gib = 0.0625 if toy else 2.0
    src = torch.empty(int(gib * 2**30) // 4, device=dev, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    t = time_calls(lambda: dst.copy_(src), 2, 5, dev)
    table.set("device copy bandwidth", value=f"{2 * src.numel() * 4 / median(t) / 1e9:.0f} GB/s (read + write, "
                                             f"{gib:g} GiB fp32, median of 5)")
    del src, dst
    return peak


def load_mamba_triton() -> str:
    """Make ``mamba_ssm.ops.triton.ssd_combined`` importable where mamba-ssm is installed without its CUDA
    extensions (the pure-Python wheel that fetch_gpu_wheels.sh builds). The package's ``__init__`` imports the
    ``selective_scan_cuda`` extension, which the Triton SSD kernel never calls; when that import fails, the package
    is registered without running its ``__init__`` and only ``mamba_ssm.ops.triton.*`` is loaded. Call it before
    anything asks ``mdtrain.models.mamba.ssd_kernel()`` (which memoises its answer). Returns how it went."""
    try:
        importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
        return "mamba_ssm imported as installed"
    except ImportError as e:
        first = f"{type(e).__name__}: {e}"
    spec = importlib.util.find_spec("mamba_ssm") if "mamba_ssm" not in sys.modules else None
    if spec is None or not spec.submodule_search_locations:
        if "mamba_ssm" not in sys.modules:
            return f"not available: mamba_ssm is not installed ({first})"
    else:
        sys.modules["mamba_ssm"] = importlib.util.module_from_spec(spec)  # its __init__ is not executed
    try:
        importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
    except Exception as e:
        sys.modules.pop("mamba_ssm", None)
        return f"not available: mamba_ssm.ops.triton.ssd_combined does not import ({type(e).__name__}: {e})"
    version = "?"
    try:
        from importlib.metadata import version as _v
        version = _v("mamba_ssm")
    except Exception:
        pass
    return (f"mamba_ssm {version}: Triton SSD kernel loaded without the package __init__ (plain import failed: "
            f"{first})")
