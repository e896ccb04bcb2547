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
from mdtrain.data.images import label_kwargs
from mdtrain.metrics import eval_row
from mdtrain.objectives.protocol import make_model_fn


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
        extra = label_kwargs(cfg.model.num_classes, batch, ctx.device)  # class labels (class-conditional images)
        base = b * per_step + ctx.dp_rank * ecfg.batch_size
        idx = list(range(base, base + x0.shape[0]))
        mc = 1 if objective.causal else max(1, ecfg.mc_samples)
        for k in range(mc):
            # keyed by the sample's position in the (unshuffled) validation stream and stratified within blocks of
            # eval.batch_size, so the estimate does not depend on the number of data-parallel ranks
            noise = rng.keyed_noise(objective.noise_spec(x0.shape[1]), tuple(objective.stratified_keys), ecfg.seed, k,
                                    idx, ecfg.batch_size, rng.STREAM_EVAL)
            noise = {n: v.to(ctx.device) for n, v in noise.items()}

            with _autocast(ctx.device, precision):
                _, m = objective.loss(make_model_fn(model, attn, **extra), x0, attn, noise=noise)
            nll_sum += float(m["nll_sum"]) / mc
            tokens += float(m["tokens"]) / mc
    if was_training:
        model.train()
    tot = ctx.all_reduce_sum(torch.stack([nll_sum, tokens]).reshape(2), group=ctx.dp_group)
    return float(tot[0]), float(tot[1])


def evaluate_splits(cfg, model, objective, ctx, step: Optional[int]) -> list[dict]:
    """The validation split, then every zero-shot set in ``eval.extra``; one eval row each (all ranks together)."""
    bound = "exact" if objective.causal else "upper"
    precision = "bf16" if (cfg.train.precision in ("auto", "bf16") and ctx.device.type == "cuda") else "fp32"
    sets = [("valid", cfg.data)]
    for path in cfg.eval.extra:
        sets.append((path.rstrip("/").split("/")[-1], dataclasses.replace(cfg.data, train=path, valid=path)))
    rows = []
    for name, dcfg in sets:
        nll_sum, tokens = evaluate_dataset(cfg, dcfg, model, objective, ctx, precision)
        rows.append(eval_row(step, name, nll_sum, tokens, bound, image_shape=cfg.model.image_shape))
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
def generative_perplexity(texts: list[str], scorer, batch_size: int = 8) -> dict:
    """Perplexity of ``texts`` under an AR model (``scorer``: a loaded AR bundle: model, objective, tokenizer, cfg),
    token-weighted."""
    if not scorer.objective.causal:
        raise ValueError(f"the generative-perplexity scorer is a '{scorer.objective.name}' model; it needs an AR "
                         f"(objective.name=ar) checkpoint or export")
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
        _, m = scorer.objective.loss(make_model_fn(scorer.model, attn), x, attn)
        nll += float(m["nll_sum"])
        n += float(m["tokens"])
    return {"gen_nll": nll / max(n, 1), "gen_ppl": math.exp(min(nll / max(n, 1), 700)), "gen_tokens": int(n)}
