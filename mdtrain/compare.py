"""``mdtrain compare RUN [RUN ...] [--out DIR]``: runs side by side at a glance.

Prints one table row per run (objective, backbone/flavor, parameters, tokens, steps, final train loss, validation
NELBO or NLL with its perplexity — ``≤`` marks a diffusion upper bound —, median training tokens/s) and writes
``DIR/loss_vs_tokens.png`` and ``DIR/loss_vs_time.png`` (training loss and validation points; time is training time,
summed from each logging window's tokens / tokens_per_s, so evaluation and checkpoints do not stretch the axis).
Everything comes from each run dir's ``config.yaml`` and ``metrics.jsonl``; nothing is recomputed or loaded.
"""
from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass, field
from typing import Optional

import yaml

from mdtrain.configtools import ConfigError


@dataclass
class RunSummary:
    name: str
    objective: str
    model: str
    params: Optional[int]
    steps: int = 0
    tokens: int = 0
    train_loss: Optional[float] = None
    eval_row: Optional[dict] = None
    tokens_per_s: Optional[float] = None
    curve: list = field(default_factory=list)       # (tokens, training seconds, train loss) per logged step
    eval_points: list = field(default_factory=list)  # (tokens, training seconds, validation nll)


def _read_rows(path: str) -> list[dict]:
    rows = []
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise ConfigError(f"{path}:{n} is not a JSON row (a half-written last line is cut when the run "
                                      f"resumes)") from None
    return rows


def _params(cfg: dict, run_dir: str) -> Optional[int]:
    """Total parameters from the model section and the run's saved tokenizer (None when no checkpoint has one)."""
    from mdtrain.config import config_from_dict
    from mdtrain.models.flops import count_params
    ckpts = os.path.join(run_dir, "checkpoints")
    names = sorted(d for d in os.listdir(ckpts) if d.startswith("step_") and not d.endswith(".tmp")) \
        if os.path.isdir(ckpts) else []
    for name in reversed(names):
        meta = os.path.join(ckpts, name, "tokenizer", "mdtrain_tokenizer.json")
        if os.path.exists(meta):
            with open(meta) as fh:
                vocab = int(json.load(fh)["vocab_size"])
            return int(count_params(config_from_dict(cfg).model, vocab)["total"])
    return None


def summarize(run_dir: str) -> RunSummary:
    cfg_path, rows_path = os.path.join(run_dir, "config.yaml"), os.path.join(run_dir, "metrics.jsonl")
    for p in (cfg_path, rows_path):
        if not os.path.exists(p):
            raise FileNotFoundError(f"'{run_dir}' is not an mdtrain run dir ({os.path.basename(p)} is missing)")
    with open(cfg_path) as fh:
        cfg = yaml.safe_load(fh) or {}
    model = cfg.get("model", {})
    s = RunSummary(name=os.path.basename(os.path.abspath(run_dir)), objective=cfg.get("objective", {}).get("name", "?"),
                   model=f"{model.get('name', '?')}/{model.get('flavor', '?')}", params=_params(cfg, run_dir))
    train = {}
    for r in _read_rows(rows_path):  # a resumed run re-logs steps after its checkpoint: the last row of a step wins
        if "split" not in r:
            train[r["step"]] = r
    seconds, prev_tokens, rates, at_step = 0.0, 0, [], {}
    for step in sorted(train):
        r = train[step]
        if r.get("tokens_per_s"):
            seconds += (r["tokens"] - prev_tokens) / r["tokens_per_s"]
            rates.append(r["tokens_per_s"])
        prev_tokens = r["tokens"]
        s.curve.append((r["tokens"], seconds, r["loss"]))
        at_step[step] = (r["tokens"], seconds)
    if train:
        last = train[max(train)]
        s.steps, s.tokens, s.train_loss = last["step"], last["tokens"], last["loss"]
        s.tokens_per_s = statistics.median(rates) if rates else None
    for r in _read_rows(rows_path):
        if r.get("split") == "valid":
            s.eval_row = r
            tokens, secs = at_step.get(r["step"], (0, 0.0))
            s.eval_points.append((tokens, secs, r["nll"]))
    return s


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(runs: list[RunSummary]) -> str:
    head = ["run", "objective", "model", "params", "tokens", "steps", "train loss", "valid nll", "valid ppl",
            "tokens/s"]
    lines = []
    for s in runs:
        e = s.eval_row
        ppl = "-" if e is None else ("≤ " if e.get("bound") == "upper" else "") + format(e["ppl"], ".3f")
        lines.append([s.name, s.objective, s.model, _fmt(s.params, ","), f"{s.tokens:,}", str(s.steps),
                      _fmt(s.train_loss, ".4f"), "-" if e is None else f"{e['nll']:.4f}", ppl,
                      _fmt(s.tokens_per_s, ",.0f")])
    widths = [max(len(h), *(len(row[i]) for row in lines)) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in lines]
    return "\n".join(out)


def plot(runs: list[RunSummary], out_dir: str) -> list[str]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for axis, index, label, name in (("tokens", 0, "tokens trained on", "loss_vs_tokens.png"),
                                     ("time", 1, "training time (s; eval and checkpoints excluded)",
                                      "loss_vs_time.png")):
        fig = Figure(figsize=(7, 4.5), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        for i, s in enumerate(runs):
            col = f"C{i % 10}"
            if s.curve:
                ax.plot([c[index] for c in s.curve], [c[2] for c in s.curve], color=col, lw=1, alpha=0.8,
                        label=f"{s.name} ({s.objective}) train")
            if s.eval_points:
                ax.plot([p[index] for p in s.eval_points], [p[2] for p in s.eval_points], "o", color=col, ms=5,
                        label=f"{s.name} valid")
        ax.set_xlabel(label)
        ax.set_ylabel("loss (nats/token; diffusion: NELBO, an upper bound)")
        ax.set_title(f"loss vs {axis}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths


def main(args) -> int:
    runs = [summarize(r) for r in args.runs]
    print(table(runs))
    for p in plot(runs, args.out):
        print(f"wrote {p}")
    return 0
