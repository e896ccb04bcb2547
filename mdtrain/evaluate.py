"""Evaluation: corpus-level NELBO / perplexity (upper bounds for diffusion, exact for AR), zero-shot sets, and the
generative perplexity of samples under an AR model.

The Monte Carlo noise of an evaluation is keyed by (eval seed, MC index, global sequence index), so the same
checkpoint gives the same number on any number of ranks, and two checkpoints are compared on identical noise.
``mdtrain eval`` prints the result as one JSON object on the last line of stdout.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections import Counter
from typing import Optional

import torch

from mdtrain import rng
from mdtrain.metrics import eval_row


def _autocast(device: torch.device, precision: str):
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate_dataset(cfg, data_cfg, model, objective, ctx, precision: str = "fp32") -> tuple[float, float]:
    """(sum of per-token NELBO/NLL in nats, number of tokens) over one prepared split, all ranks together."""
    from mdtrain.data.loader import build_loader

    ecfg = cfg.eval
    loader = build_loader(data_cfg, "valid", ecfg.batch_size, ctx.dp_rank, ctx.dp_size, seed=ecfg.seed, infinite=False)
    tok = getattr(loader, "tokenizer", None)
    if tok is not None and (tok.vocab_size != objective.vocab_size or tok.mask_id != objective.mask_id):
        from mdtrain.data.errors import DataError
        raise DataError(f"dataset '{data_cfg.valid or data_cfg.train}' was tokenized with vocab_size="
                        f"{tok.vocab_size}, mask_id={tok.mask_id}; the model expects vocab_size={objective.vocab_size}, "
                        f"mask_id={objective.mask_id}. Prepare it with the model's tokenizer (its run dir's "
                        f"checkpoints hold it under tokenizer/)")
    was_training = model.training
    model.eval()
    nll_sum = torch.zeros((), dtype=torch.float64)
    tokens = torch.zeros((), dtype=torch.float64)
    per_step = ecfg.batch_size * ctx.dp_size
    for b, batch in enumerate(loader):
        if ecfg.batches and b >= ecfg.batches:
            break
        x0 = batch["input_ids"].to(ctx.device)
        attn = batch["attention_mask"].to(ctx.device)
        base = b * per_step + ctx.dp_rank * ecfg.batch_size
        idx = list(range(base, base + x0.shape[0]))
        mc = 1 if objective.causal else max(1, ecfg.mc_samples)
        for k in range(mc):
            # keyed by the sample's position in the (unshuffled) validation stream and stratified within blocks of
            # eval.batch_size, so the estimate does not depend on the number of data-parallel ranks
            noise = rng.keyed_noise(objective.noise_spec(x0.shape[1]), tuple(objective.stratified_keys), ecfg.seed, k,
                                    idx, ecfg.batch_size, rng.STREAM_EVAL)
            noise = {n: v.to(ctx.device) for n, v in noise.items()}

            def model_fn(x, cond=None, _attn=attn):
                return model(x, cond, _attn[:, : x.shape[1]])
            with _autocast(ctx.device, precision):
                _, m = objective.loss(model_fn, x0, attn, noise=noise)
            nll_sum += float(m["nll_sum"]) / mc
            tokens += float(m["tokens"]) / mc
    if was_training:
        model.train()
    tot = ctx.all_reduce_sum(torch.stack([nll_sum, tokens]).reshape(2), group=ctx.dp_group)
    return float(tot[0]), float(tot[1])


def evaluate_splits(cfg, built, step: int, model=None) -> list[dict]:
    """The validation split, then every zero-shot set in ``eval.extra``; one eval row each."""
    model = model if model is not None else built.engine.model
    bound = "exact" if built.objective.causal else "upper"
    precision = "bf16" if (cfg.train.precision in ("auto", "bf16") and built.ctx.device.type == "cuda") else "fp32"
    sets = [("valid", cfg.data)]
    for path in cfg.eval.extra:
        sets.append((path.rstrip("/").split("/")[-1], dataclasses.replace(cfg.data, train=path, valid=path)))
    rows = []
    for name, dcfg in sets:
        nll_sum, tokens = evaluate_dataset(cfg, dcfg, model, built.objective, built.ctx, precision)
        rows.append(eval_row(step, name, nll_sum, tokens, bound))
    return rows


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


@torch.no_grad()
def generative_perplexity(texts: list[str], scorer_path: str, batch_size: int = 8) -> dict:
    """Perplexity of ``texts`` under an AR model (an mdtrain AR run, checkpoint or export), token-weighted."""
    from mdtrain.trainer import load_for_inference

    scorer = load_for_inference(scorer_path)
    if not scorer.objective.causal:
        raise ValueError(f"eval.gen_ppl_model='{scorer_path}' is a '{scorer.objective.name}' model; generative "
                         f"perplexity needs an AR (objective.name=ar) checkpoint or export")
    tok, L = scorer.tokenizer, scorer.cfg.data.seq_len
    seqs = []
    for t in texts:
        ids = [tok.bos_id] + tok.encode(t) + [tok.eos_id]
        seqs.extend(ids[i:i + L] for i in range(0, max(len(ids) - 1, 1), L))
    nll, n = 0.0, 0.0
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        width = max(len(s) for s in chunk)
        x = torch.full((len(chunk), width), tok.pad_id, dtype=torch.long)
        attn = torch.zeros_like(x)
        for j, s in enumerate(chunk):
            x[j, :len(s)] = torch.tensor(s)
            attn[j, :len(s)] = 1
        _, m = scorer.objective.loss(lambda a, c=None, _m=attn: scorer.model(a, c, _m[:, :a.shape[1]]), x, attn)
        nll += float(m["nll_sum"])
        n += float(m["tokens"])
    return {"gen_nll": nll / max(n, 1), "gen_ppl": math.exp(min(nll / max(n, 1), 700)), "gen_tokens": int(n)}


# ----------------------------------------------------------------------------------------------------
# `mdtrain eval`


def main(args) -> int:
    from mdtrain.parallel.dist import init_distributed
    from mdtrain.trainer import Built, load_for_inference

    bundle = load_for_inference(args.path, use_ema=True, overrides=args.overrides)
    cfg = bundle.cfg
    ctx = init_distributed(cfg.parallel.backend, 1)
    model = bundle.model.to(ctx.device)
    built = Built(cfg, ctx, bundle.tokenizer, bundle.objective, None, cfg.data.seq_len, 0.0)
    rows = evaluate_splits(cfg, built, step=_step_of(args.path), model=model)
    result = dict(rows[0])
    if len(rows) > 1:
        result["zero_shot"] = {r["split"]: r for r in rows[1:]}
    if cfg.eval.gen_ppl_model and not bundle.objective.causal:
        gen = torch.Generator().manual_seed(cfg.sample.seed)
        from mdtrain.objectives.samplers import sample
        from mdtrain.exported import make_model_fn
        tokens, _ = sample(bundle.objective, make_model_fn(model), cfg.sample.num_samples, cfg.data.seq_len,
                           cfg.sample.steps, gen, sampler=cfg.sample.sampler)
        seqs = tokens.tolist()
        result.update(generative_perplexity([bundle.tokenizer.decode(s) for s in seqs], cfg.eval.gen_ppl_model))
        result["sample_unigram_entropy"] = unigram_entropy(seqs)
    if ctx.is_main:
        for r in rows:
            bound = "<= " if r["bound"] == "upper" else ""
            print(f"{r['split']}: nll {r['nll']:.4f} nats/token, ppl {bound}{r['ppl']:.3f}", flush=True)
        print(json.dumps(result), flush=True)
    return 0


def _step_of(path: str) -> Optional[int]:
    from mdtrain.checkpoint import resolve_checkpoint
    from mdtrain.exported import is_export_dir
    if is_export_dir(path):
        return None
    with open(resolve_checkpoint(path) + "/manifest.json") as fh:
        return json.load(fh)["step"]
