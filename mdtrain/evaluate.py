"""Evaluation: corpus-level NELBO / perplexity (upper bounds for diffusion, exact for AR), zero-shot sets, and the
generative perplexity of samples under an AR model.

The Monte Carlo noise of an evaluation is keyed by (eval seed, MC index, global sequence index), so the same
checkpoint gives the same number on any number of ranks, and two checkpoints are compared on identical noise.
The ``mdtrain eval`` command is ``mdtrain/eval_cli.py``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from collections import Counter
from typing import Optional

import torch

from mdtrain import rng
from mdtrain.configtools import ConfigError
from mdtrain.data.images import label_kwargs
from mdtrain.metrics import eval_row
from mdtrain.objectives.protocol import make_model_fn


def _autocast(device: torch.device, precision: str):
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def per_sequence_nll(objective, model_fn, x0: torch.Tensor, attention_mask: torch.Tensor, noise: dict) -> torch.Tensor:
    """Each sequence's NELBO (NLL for ar) in nats, float64 (B,), on the given noise: the objective's own loss, whose
    per-sequence terms sum to its ``nll_sum`` (so every objective, block diffusion and shifted ones included, is
    scored exactly as it trains)."""
    return objective.loss(model_fn, x0, attention_mask, noise=noise)[1]["nll_per_sequence"]


@torch.no_grad()
def evaluate_dataset(cfg, data_cfg, model, objective, ctx, precision: str = "fp32",
                     report: Optional[dict] = None) -> tuple[float, float, float]:
    """(sum of per-token NELBO/NLL in nats, number of tokens, Monte Carlo variance of that sum) over one prepared
    split, all ranks together. ``report["partial"]`` is set True when ``eval.batches`` stopped it before the end.

    Every sequence is scored ``eval.mc_samples`` times on independent noise; the corpus estimate is the sum of the
    per-sequence means, and its variance Σ_i s_i²/K (s_i² the sample variance of sequence i's K values, noise
    independent across sequences) — NaN for a masked model with one sample, 0 for ar (exact)."""
    from mdtrain.data.loader import build_loader

    ecfg = cfg.eval
    loader = build_loader(data_cfg, "valid", ecfg.batch_size, ctx.dp_rank, ctx.dp_size, seed=ecfg.seed, infinite=False)
    tok = getattr(loader, "tokenizer", None)
    if tok is not None and (tok.vocab_size != objective.vocab_size or tok.mask_id != objective.mask_id):
        from mdtrain.data.errors import DataError
        raise DataError(f"dataset '{data_cfg.valid or data_cfg.train}' was tokenized with vocab_size="
                        f"{tok.vocab_size}, mask_id={tok.mask_id}; the model expects vocab_size={objective.vocab_size}, "
                        f"mask_id={objective.mask_id}. Prepare it with the model's tokenizer: mdtrain prepare "
                        f"--tokenizer from:RUN_DIR (the run's checkpoints hold it under tokenizer/)")
    was_training = model.training
    model.eval()
    acc = torch.zeros(3, dtype=torch.float64)  # nll sum, tokens, variance of the nll sum
    per_step = ecfg.batch_size * ctx.dp_size
    mc = 1 if objective.causal else max(1, ecfg.mc_samples)
    for b, batch in enumerate(loader):
        if ecfg.batches and b >= ecfg.batches:
            if report is not None:
                report["partial"] = True
            break
        x0 = batch["input_ids"].to(ctx.device)
        attn = batch["attention_mask"].to(ctx.device)
        extra = label_kwargs(cfg.model.num_classes, batch, ctx.device)  # class labels (class-conditional images)
        base = b * per_step + ctx.dp_rank * ecfg.batch_size
        idx = list(range(base, base + x0.shape[0]))
        model_fn = make_model_fn(model, attn, **extra)
        values = []
        for k in range(mc):
            # keyed by the sample's position in the (unshuffled) validation stream and stratified within blocks of
            # eval.batch_size, so the estimate does not depend on the number of data-parallel ranks
            noise = rng.keyed_noise(objective.noise_spec(x0.shape[1]), tuple(objective.stratified_keys), ecfg.seed, k,
                                    idx, ecfg.batch_size, rng.STREAM_EVAL)
            noise = {n: v.to(ctx.device) for n, v in noise.items()}
            with _autocast(ctx.device, precision):
                _, m = objective.loss(model_fn, x0, attn, noise=noise)
            values.append(m["nll_per_sequence"].cpu())
        v = torch.stack(values)  # (K, B)
        acc[0] += v.mean(0).sum()
        acc[1] += float(m["tokens"])  # the tokens the objective scores (AR, bd3lm, shifted: not the first)
        if not objective.causal:  # an AR NLL is exact: no Monte Carlo variance
            acc[2] += (v.var(0, unbiased=True) / mc).sum() if mc > 1 else math.nan
    if was_training:
        model.train()
    tot = ctx.all_reduce_sum(acc, group=ctx.dp_group)
    return float(tot[0]), float(tot[1]), float(tot[2])


def evaluate_splits(cfg, model, objective, ctx, step: Optional[int]) -> list[dict]:
    """The validation split, then every zero-shot set in ``eval.extra``; one eval row each (all ranks together),
    with the Monte Carlo standard error of its NELBO."""
    bound = "exact" if objective.causal else "upper"
    precision = "bf16" if (cfg.train.precision in ("auto", "bf16") and ctx.device.type == "cuda") else "fp32"
    sets = [("valid", cfg.data)]
    for path in cfg.eval.extra:
        sets.append((path.rstrip("/").split("/")[-1], dataclasses.replace(cfg.data, train=path, valid=path)))
    rows = []
    mc = 1 if objective.causal else max(1, cfg.eval.mc_samples)
    for name, dcfg in sets:
        report = {"partial": False}
        nll_sum, tokens, var = evaluate_dataset(cfg, dcfg, model, objective, ctx, precision, report=report)
        rows.append(eval_row(step, name, nll_sum, tokens, bound, image_shape=cfg.model.image_shape, nll_var=var,
                             mc_samples=mc))
        if report["partial"]:  # eval.batches cut it: the row says so (rank 0's view; every rank has as many batches)
            rows[-1]["partial_split"] = f"first {cfg.eval.batches} batches (eval.batches)"
    return rows


def format_table(rows: list[dict]) -> str:
    """One line per set (the validation / zero-shot table): nats/token, perplexity (``<=``: an upper bound, the
    diffusion NELBO; none: exact AR) and bits/dim for images, each ± its Monte Carlo standard error."""
    width = max(len(r["split"]) for r in rows)
    lines = []
    for r in rows:
        bound = "<= " if r["bound"] == "upper" else ""
        se = r.get("nll_se")

        def pm(v, fmt, _se=se):
            return "" if _se == 0 else (" ± ?" if _se is None else f" ± {v:{fmt}}")
        line = (f"{r['split'] + ':':<{width + 1}} nll {r['nll']:.4f}{pm(se, '.4f')} nats/token, "
                f"ppl {bound}{r['ppl']:.3f}{pm(r.get('ppl_se'), '.3f')}")
        if "bits_per_dim" in r:
            line += f", bits/dim {bound}{r['bits_per_dim']:.4f}{pm(r.get('bits_per_dim_se'), '.4f')}"
        lines.append(line + f"  ({r['tokens']:,} tokens)")
    if any(r.get("nll_se") is None for r in rows):
        lines.append("(± ?: one Monte Carlo sample per sequence gives no standard error; set eval.mc_samples >= 2)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# generative perplexity


def unigram_entropy(seqs: list[list[int]]) -> float:
    """Mean over samples of the entropy (nats) of each sample's token histogram; low values flag repetition."""
    ents = []
    for s in seqs:
        c = Counter(s)
        n = sum(c.values())
        ents.append(-sum(v / n * math.log(v / n) for v in c.values()) if n else 0.0)
    return sum(ents) / max(len(ents), 1)


class _BundleScorer:
    """An mdtrain AR bundle (run, checkpoint or export) as a scorer: ``bos``, ``eos``, ``pad``, ``length`` (the
    context), ``device``, ``encode(text)``, ``logits(x, attention_mask)`` — the interface any scorer offers
    (``mdtrain.eval_cli.HFScorer`` for ``hf:DIR``)."""

    def __init__(self, bundle):
        if not bundle.objective.causal:
            raise ConfigError(f"eval.gen_ppl_model is a '{bundle.objective.name}' model; the generative-perplexity "
                              f"scorer must be an AR (objective.name=ar) run, checkpoint or export, or hf:DIR")
        self.b, tok = bundle, bundle.tokenizer
        self.bos, self.eos, self.pad, self.length = tok.bos_id, tok.eos_id, tok.pad_id, bundle.cfg.data.seq_len
        self.encode = tok.encode
        self.device = next(bundle.model.parameters()).device

    def logits(self, x, attn):
        out = make_model_fn(self.b.model, attn)(x, None).clone()
        out[..., self.b.objective.mask_id] = -math.inf  # the AR objective never predicts the mask class
        return out


@torch.no_grad()
def generative_perplexity(texts: list[str], scorer, batch_size: int = 8) -> dict:
    """Perplexity of ``texts`` under an AR scorer (an mdtrain AR bundle, or any object with the interface of
    ``_BundleScorer``, e.g. ``mdtrain.eval_cli.HFScorer``), token-weighted:
    each text scored as [BOS] text [EOS] in chunks of the scorer's context (each chunk's first token given),
    log-softmax in float64."""
    sc = _BundleScorer(scorer) if hasattr(scorer, "objective") else scorer
    L = sc.length
    seqs = []
    for t in texts:
        ids = [sc.bos] + sc.encode(t) + [sc.eos]
        seqs.extend(ids[i:i + L] for i in range(0, max(len(ids) - 1, 1), L))
    seqs = [s for s in seqs if len(s) > 1]
    nll, n = 0.0, 0
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        width = max(len(s) for s in chunk)
        x = torch.full((len(chunk), width), sc.pad, dtype=torch.long)
        attn = torch.zeros_like(x)
        for j, s in enumerate(chunk):
            x[j, :len(s)] = torch.tensor(s)
            attn[j, :len(s)] = 1
        x, attn = x.to(sc.device), attn.to(sc.device)
        logp = torch.log_softmax(sc.logits(x, attn)[:, :-1].to(torch.float64), -1)
        keep = attn[:, 1:].bool()
        nll -= float(logp.gather(-1, x[:, 1:, None]).squeeze(-1)[keep].sum())
        n += int(keep.sum())
    return {"gen_nll": nll / max(n, 1), "gen_ppl": math.exp(min(nll / max(n, 1), 700)), "gen_tokens": n}
