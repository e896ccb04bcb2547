"""Metrics: a readable console line, a progress bar with ETA, ``metrics.jsonl`` rows, wandb (offline by default) and
TensorBoard event files.

Units: losses are nats/token; bits and perplexity are derived. Diffusion perplexities are upper bounds.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Optional

import torch

# Dense peak FLOP/s by device name substring, per compute precision (vendor datasheets, no sparsity).
PEAK_FLOPS = [
    ("H200", {"bf16": 989e12, "fp32": 494e12}),
    ("H100 PCIe", {"bf16": 756e12, "fp32": 378e12}),
    ("H100", {"bf16": 989e12, "fp32": 494e12}),  # SXM; fp32 = TF32 dense
    ("A100", {"bf16": 312e12, "fp32": 156e12}),
    ("L40S", {"bf16": 362e12, "fp32": 183e12}),
    ("A6000", {"bf16": 155e12, "fp32": 77e12}),
    ("A5000", {"bf16": 111e12, "fp32": 55e12}),
    ("4090", {"bf16": 165e12, "fp32": 83e12}),
    ("3090", {"bf16": 71e12, "fp32": 36e12}),
    ("A10", {"bf16": 125e12, "fp32": 62e12}),
    ("L4", {"bf16": 121e12, "fp32": 60e12}),
    ("V100", {"bf16": 125e12, "fp32": 15.7e12}),
]


def peak_flops(device: torch.device, precision: str) -> Optional[float]:
    """Peak dense FLOP/s of ``device`` for ``precision`` ('bf16'/'fp32'), or None when unknown (e.g. CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_FLOPS:
        if key in name:
            return peaks.get(precision)
    return None


def fmt_int(x: float) -> str:
    return f"{int(round(x)):,}"


def memory_gib(device: torch.device) -> Optional[float]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    except Exception:  # pragma: no cover
        return None


class WandbLogger:
    """wandb, offline unless WANDB_API_KEY is set; the run id is restored on resume so the same run continues."""

    def __init__(self, run_dir: str, project: str, name: str, config: dict, run_id: Optional[str]):
        import wandb
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(project=project, name=name, dir=run_dir, config=config, id=run_id,
                              resume="allow", mode=mode)
        self.id = self.run.id

    def log(self, row: dict, step: int) -> None:
        self.run.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=step)

    def finish(self) -> None:
        self.run.finish()


class MissingPackage(ImportError):
    """An optional package that a config option needs is not installed (a user mistake: reported as one line)."""


TENSORBOARD_DIR = "tensorboard"


class TensorBoardLogger:
    """The numeric values of every metrics.jsonl row as TensorBoard scalars in ``<run_dir>/tensorboard/``, tagged
    ``train/<key>`` or ``<split>/<key>`` (eval rows) at the row's step. A resumed run adds an event file beside the
    earlier ones: TensorBoard reads them as one run."""

    def __init__(self, run_dir: str):
        SummaryWriter = tensorboard_writer_class()
        self.writer = SummaryWriter(log_dir=os.path.join(run_dir, TENSORBOARD_DIR))

    def log(self, row: dict, step: int) -> None:
        group = row.get("split", "train")
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(f"{group}/{k}", v, global_step=step)
        self.writer.flush()  # rows come at logging intervals: each is on disk before the next step

    def finish(self) -> None:
        self.writer.close()


def tensorboard_writer_class():
    """torch's SummaryWriter, which needs the tensorboard package (imported only when logging.tensorboard=true)."""
    try:
        import tensorboard  # noqa: F401 - torch.utils.tensorboard imports it; name the package if it is missing
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise MissingPackage(f"logging.tensorboard=true needs the tensorboard package ({e}): pip install -r "
                             f"requirements.txt, or pip install tensorboard") from None
    return SummaryWriter


class MetricsLogger:
    """Rank 0 writes; other ranks keep quiet. ``log_train`` / ``log_eval`` append to metrics.jsonl (and to wandb /
    TensorBoard when asked)."""

    def __init__(self, run_dir: str, total_steps: int, enabled: bool, progress_bar: bool = True,
                 wandb_cfg: Optional[dict] = None, tensorboard: bool = False):
        self.enabled = enabled
        self.total = total_steps
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.start_time = time.time()
        self.start_step: Optional[int] = None
        self.wandb: Optional[WandbLogger] = None
        self.tensorboard: Optional[TensorBoardLogger] = None
        self.bar = None
        if tensorboard:
            tensorboard_writer_class()  # on every rank: a missing package stops them all, none waits in a collective
        if enabled:
            _drop_partial_last_line(self.path)
        if enabled and wandb_cfg is not None:
            self.wandb = WandbLogger(run_dir, **wandb_cfg)
        if enabled and tensorboard:
            self.tensorboard = TensorBoardLogger(run_dir)
        if enabled and progress_bar and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True, leave=False)

    def _write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
        if self.wandb:
            self.wandb.log(row, row["step"])
        if self.tensorboard:
            self.tensorboard.log(row, row["step"])

    def print(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def eta_s(self, step: int) -> Optional[float]:
        """Remaining time from the rate since the first logged step (start-up and the first step excluded)."""
        if self.start_step is None:
            self.start_step, self.start_time = step, time.time()
            return None
        done = step - self.start_step
        if done <= 0:
            return None
        return (time.time() - self.start_time) / done * (self.total - step)

    def log_train(self, row: dict) -> None:
        """row: step, loss, tokens, lr, grad_norm, tokens_per_s, [mfu, memory_gib, skipped]."""
        self._write(row)
        parts = [f"step: {row['step']:>6}", f"loss: {row['loss']:.4f}", f"grad_norm: {row['grad_norm']:.3f}",
                 f"lr: {row['lr']:.2e}", f"tps: {fmt_int(row['tokens_per_s'])}"]
        if row.get("mfu") is not None:
            parts.append(f"mfu: {100 * row['mfu']:.1f}%")
        if row.get("memory_gib") is not None:
            parts.append(f"memory: {row['memory_gib']:.2f}GiB")
        eta = self.eta_s(row["step"])
        if eta is not None:
            parts.append(f"eta: {_hms(eta)}")
        if row.get("skipped"):
            parts.append(f"skipped: {row['skipped']}")
        self.print("  ".join(parts))

    def log_eval(self, row: dict) -> None:
        """row: step, split, nll (nats/token), ppl, bits_per_token, tokens, bound, nll_se (Monte Carlo)."""
        self._write(row)
        bound = "≤ " if row.get("bound") == "upper" else ""
        bpd = f"  bits/dim {bound}{row['bits_per_dim']:.4f}" if "bits_per_dim" in row else ""
        se = row.get("nll_se")
        pm = f" ± {se:.4f}" if se else ""  # an exact (0) or unknown (None) standard error is not printed
        self.print(f"eval {row['split']}: step {row['step']}  nll {row['nll']:.4f}{pm} nats/token  "
                   f"ppl {bound}{row['ppl']:.3f}  bits/token {row['bits_per_token']:.4f}{bpd}  "
                   f"({fmt_int(row['tokens'])} tokens)")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb:
            self.wandb.finish()
        if self.tensorboard:
            self.tensorboard.finish()
            self.tensorboard = None


def _drop_partial_last_line(path: str) -> None:
    """A run killed mid-write leaves half a JSON row; cut it so the resumed run appends whole rows."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as fh:
        data = fh.read()
        if data.endswith(b"\n"):
            return
        fh.truncate(data.rfind(b"\n") + 1)


def eval_row(step: int, split: str, nll_sum: float, tokens: float, bound: str, image_shape=None, nll_var: float = 0.0,
             mc_samples: int = 1) -> dict:
    """An eval row. ``nll_var`` is the Monte Carlo variance of ``nll_sum`` (NaN when it cannot be estimated: one
    sample of a Monte Carlo estimate); ``nll_se`` = √var / tokens, ``ppl_se`` = ppl·nll_se (delta method), None when
    unknown; AR rows (exact) have 0."""
    nll = nll_sum / max(tokens, 1.0)
    ppl = math.exp(min(nll, 700.0))
    se = None if math.isnan(nll_var) else math.sqrt(max(nll_var, 0.0)) / max(tokens, 1.0)
    row = {"step": step, "split": split, "nll": nll, "ppl": ppl, "bits_per_token": nll / math.log(2),
           "tokens": int(tokens), "bound": bound, "nll_se": se, "ppl_se": None if se is None else ppl * se,
           "mc_samples": mc_samples}
    if image_shape:
        row["bits_per_dim"] = bits_per_dim(nll_sum, tokens, image_shape)
        row["bits_per_dim_se"] = None if se is None else se / math.log(2)  # bits/dim = nats/token / ln 2
    return row


def bits_per_dim(nll_sum: float, tokens: float, image_shape) -> float:
    """NELBO / (H·W·C) / ln 2 per image, averaged over the images: pixel tokens are the dimensions, so with
    ``tokens`` = images·H·W·C this is ``nll_sum`` / (images·H·W·C) / ln 2."""
    dims = math.prod(int(s) for s in image_shape)
    images = tokens / dims
    if abs(images - round(images)) > 1e-6:
        raise ValueError(f"{tokens} tokens are not whole images of {dims} pixel tokens")
    return nll_sum / max(round(images), 1) / dims / math.log(2)


def _hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
