"""``mdtrain eval RUN_DIR_OR_CHECKPOINT [key=value ...]``: NELBO / perplexity of the validation split and of every
zero-shot set in ``eval.extra``, and generative perplexity when ``eval.gen_ppl_model`` names an AR scorer.

Prints one line per set, then the result as one JSON object on the last line of stdout.
"""
from __future__ import annotations

import json

import torch

from mdtrain.evaluate import evaluate_splits, generative_perplexity, unigram_entropy
from mdtrain.inference import checkpoint_step, load_for_inference
from mdtrain.objectives.protocol import make_model_fn
from mdtrain.objectives.samplers import sample
from mdtrain.parallel.dist import init_distributed


def main(args) -> int:
    bundle = load_for_inference(args.path, overrides=args.overrides)
    cfg = bundle.cfg
    ctx = init_distributed(cfg.parallel.backend, 1)
    model = bundle.model.to(ctx.device)
    rows = evaluate_splits(cfg, model, bundle.objective, ctx, step=checkpoint_step(args.path))
    result = dict(rows[0])
    if len(rows) > 1:
        result["zero_shot"] = {r["split"]: r for r in rows[1:]}
    if cfg.eval.gen_ppl_model and not bundle.objective.causal:
        gen = torch.Generator().manual_seed(cfg.sample.seed)
        bos = bundle.tokenizer.bos_id if getattr(bundle.objective, "ignore_bos", False) else None  # bd3lm's context
        tokens, _ = sample(bundle.objective, make_model_fn(model), cfg.sample.num_samples, cfg.data.seq_len,
                           cfg.sample.steps, gen, sampler=cfg.sample.sampler, bos_id=bos)
        seqs = tokens.tolist()
        scorer = load_for_inference(cfg.eval.gen_ppl_model)
        result.update(generative_perplexity([bundle.tokenizer.decode(s) for s in seqs], scorer))
        result["sample_unigram_entropy"] = unigram_entropy(seqs)
    if ctx.is_main:
        for r in rows:
            bound = "<= " if r["bound"] == "upper" else ""
            bpd = f", bits/dim {bound}{r['bits_per_dim']:.4f}" if "bits_per_dim" in r else ""
            print(f"{r['split']}: nll {r['nll']:.4f} nats/token, ppl {bound}{r['ppl']:.3f}{bpd}", flush=True)
        print(json.dumps(result), flush=True)
    return 0
