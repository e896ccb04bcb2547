"""``mdtrain eval RUN_DIR_OR_CHECKPOINT [key=value ...]``: NELBO / perplexity of the validation split and of every
zero-shot set in ``eval.extra`` (each ± its Monte Carlo standard error), and, when ``eval.gen_ppl_model`` names an
AR scorer (an mdtrain AR run/checkpoint/export, or ``hf:DIR``), the generative perplexity and unigram entropy of
``sample.num_samples`` samples drawn with the ``sample.*`` settings.

Prints one line per set (the table), a gen-PPL line, then the result as one JSON object on the last line of stdout;
its ``gen_ppl`` entry is the row of that evaluation (sampler, steps, NFE, gen-PPL, entropy, seed, scorer).
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from mdtrain.configtools import ConfigError
from mdtrain.evaluate import evaluate_splits, format_table, generative_perplexity, unigram_entropy
from mdtrain.inference import checkpoint_step, load_for_inference
from mdtrain.objectives.protocol import make_model_fn
from mdtrain.objectives.samplers import sample
from mdtrain.parallel.dist import init_distributed
from mdtrain.sampling_cli import prepared_options


class HFScorer:
    """A local Hugging Face causal LM directory as the generative-perplexity scorer (``eval.gen_ppl_model=hf:DIR``),
    through transformers' AutoModelForCausalLM / AutoTokenizer; nothing is downloaded."""

    def __init__(self, directory: str, device="cpu"):
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"eval.gen_ppl_model='hf:{directory}': not a directory (hf:DIR takes a local "
                                    "Hugging Face model directory; nothing is downloaded)")
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError:
            raise ConfigError("eval.gen_ppl_model=hf:DIR needs transformers: pip install 'mdtrain[hf]' "
                              "(transformers==5.24.0)") from None
        self.tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=torch.float32)
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.eos = self.tok.eos_token_id
        self.bos = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.eos  # GPT-2: <|endoftext|>
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos
        if self.bos is None:
            raise ValueError(f"hf:{directory}: the tokenizer has neither a BOS nor an EOS token to start a sample")
        cfg = self.model.config
        self.length = int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 1024))

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def logits(self, x, attn):
        return self.model(input_ids=x, attention_mask=attn).logits


def load_scorer(spec: str, device="cpu"):
    """``hf:DIR`` -> an HFScorer; anything else -> the mdtrain AR bundle at that path."""
    if spec.startswith("hf:"):
        return HFScorer(spec[3:], device)
    bundle = load_for_inference(spec)
    bundle.model.to(device)
    return bundle


@torch.no_grad()
def generation_row(bundle, model, step: Optional[int], device) -> dict:
    """Draw ``sample.num_samples`` sequences as ``mdtrain sample`` does (same options, same ``sample.seed``:
    the same samples; categorical draws in float64) and score them with ``eval.gen_ppl_model``."""
    cfg, tok, objective = bundle.cfg, bundle.tokenizer, bundle.objective
    sc = cfg.sample
    gen = torch.Generator().manual_seed(sc.seed)
    seqs, nfe, per_sample, info = [], 0, [], {}
    for start in range(0, sc.num_samples, sc.batch_size):
        n = min(sc.batch_size, sc.num_samples - start)
        opts = prepared_options(bundle, sc)
        if "prefix" in opts:
            opts["prefix"] = opts["prefix"].to(device)
        tokens, info = sample(objective, make_model_fn(model), n, cfg.data.seq_len, sc.steps, gen,
                              sampler=sc.sampler, **opts)
        rows = tokens.tolist()
        if "lengths" in info:  # bd3lm with sample.stop_at_eos: each sample ends at its first EOS
            rows = [row[:k] for row, k in zip(rows, info["lengths"].tolist())]
        seqs += rows
        nfe += int(info["nfe"])  # network calls (batched)
        per_sample += [int(v) for v in info["nfe_per_sample"].tolist()]  # evaluations each sequence received
    scored = generative_perplexity([tok.decode(s) for s in seqs], load_scorer(cfg.eval.gen_ppl_model, device))
    return {"kind": "gen_ppl", "step": step, "sampler": info.get("sampler", sc.sampler),
            "steps": None if objective.causal else sc.steps, "nfe": nfe,
            "nfe_per_sample": sum(per_sample) / max(len(per_sample), 1),
            "num_samples": len(seqs), "seq_len": len(seqs[0]) if seqs else 0, "seed": sc.seed, "top_p": sc.top_p,
            "scorer": cfg.eval.gen_ppl_model, **scored, "entropy": unigram_entropy(seqs)}


def main(args) -> int:
    bundle = load_for_inference(args.path, overrides=args.overrides)
    cfg = bundle.cfg
    ctx = init_distributed(cfg.parallel.backend, 1)
    model = bundle.model.to(ctx.device)
    step = checkpoint_step(args.path)
    rows = evaluate_splits(cfg, model, bundle.objective, ctx, step=step)
    result = dict(rows[0])
    if len(rows) > 1:
        result["zero_shot"] = {r["split"]: r for r in rows[1:]}
    if cfg.eval.gen_ppl_model and ctx.is_main:
        result["gen_ppl"] = generation_row(bundle, model, step, ctx.device)
    if ctx.is_main:
        print(format_table(rows), flush=True)
        cut = [r["split"] for r in rows if r.get("partial_split")]
        if cut:
            print(f"note: {', '.join(cut)} evaluated on its first {cfg.eval.batches} batches of "
                  f"{cfg.eval.batch_size} sequences only (eval.batches={cfg.eval.batches}, from the run's config); "
                  f"add eval.batches=0 to score the whole split", flush=True)
        g = result.get("gen_ppl")
        if g:
            steps = "" if g["steps"] is None else f", {g['steps']} steps"
            print(f"gen-ppl {g['gen_ppl']:.3f}  entropy {g['entropy']:.3f}  ({g['num_samples']} samples, {g['sampler']}"
                  f"{steps}, {g['nfe_per_sample']:.0f} NFE/sample, seed {g['seed']}, scored by {g['scorer']})",
                  flush=True)
        print(json.dumps(result), flush=True)
    return 0
