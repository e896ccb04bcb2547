"""``mdtrain sample``: generate with any sampler from a run dir, checkpoint or export; write text and token ids.

The ``sample`` config section picks the sampler and its options (``sample.sampler=ddpm_cache sample.steps=1000
sample.top_p=0.9 ...``); the prefix/infill template and the output file are options of that section too. The last
stdout line is a JSON summary (samples, network evaluations, seconds, output file).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import torch

from mdtrain.inference import load_for_inference
from mdtrain.objectives.protocol import make_model_fn
from mdtrain.objectives.samplers import sample

# SampleConfig fields the CLI consumes itself; every other field is passed to the sampler as an option.
_CLI_FIELDS = {"sampler", "steps", "num_samples", "batch_size", "seed", "out", "prefix", "show", "stop_at_eos"}


def sampler_options(scfg) -> dict:
    return {k: v for k, v in dataclasses.asdict(scfg).items() if k not in _CLI_FIELDS}


def _template(bundle, prefix: str, batch: int, seq_len: int):
    """Prefix conditioning: the encoded prompt fixed at the start, the rest masked (None without a prompt)."""
    if not prefix:
        return None
    tok = bundle.tokenizer
    ids = ([tok.bos_id] if tok.bos_id is not None and tok.bos_id >= 0 else []) + tok.encode(prefix)
    if len(ids) >= seq_len:
        raise ValueError(f"sample.prefix encodes to {len(ids)} tokens; it must be shorter than the model length "
                         f"{seq_len}")
    t = torch.full((batch, seq_len), tok.mask_id, dtype=torch.long)
    t[:, :len(ids)] = torch.tensor(ids)
    return t


def main(args) -> int:
    bundle = load_for_inference(args.path, overrides=args.overrides)
    cfg, scfg = bundle.cfg, bundle.cfg.sample
    model_fn = make_model_fn(bundle.model)
    if cfg.model.image_shape:  # image runs write a PNG grid (mdtrain/sampling_images.py)
        from mdtrain.sampling_images import sample_images
        return sample_images(bundle, args.path, model_fn, sampler_options(scfg))
    gen = torch.Generator().manual_seed(scfg.seed)
    seqs, nfe, t0 = [], 0, time.time()
    remaining = scfg.num_samples
    while remaining > 0:
        b = min(scfg.batch_size, remaining)
        opts = sampler_options(scfg)
        template = _template(bundle, scfg.prefix, b, cfg.data.seq_len)
        if template is not None:
            opts["prefix"] = template
        if getattr(bundle.objective, "block_size", 0):  # bd3lm: BOS as the context token; EOS may end a sample
            if bundle.objective.ignore_bos:
                opts["bos_id"] = bundle.tokenizer.bos_id
            if scfg.stop_at_eos:
                opts["eos_id"] = bundle.tokenizer.eos_id
        with torch.no_grad():
            tokens, info = sample(bundle.objective, model_fn, b, cfg.data.seq_len, scfg.steps, gen,
                                  sampler=scfg.sampler, **opts)
        rows = tokens.tolist()
        if "lengths" in info:  # samples that ended at EOS
            rows = [row[:n] for row, n in zip(rows, info["lengths"].tolist())]
        seqs.extend(rows)
        nfe += int(info["nfe"])
        remaining -= b
    seconds = time.time() - t0
    texts = [bundle.tokenizer.decode(s) for s in seqs]
    out = scfg.out or _default_out(args.path)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as fh:
        for s, t in zip(seqs, texts):
            fh.write(json.dumps({"text": t, "ids": s}) + "\n")
    for i, t in enumerate(texts[: max(0, scfg.show)]):
        print(f"--- sample {i} ---\n{t}")
    print(json.dumps({"num_samples": len(seqs), "sampler": scfg.sampler, "steps": scfg.steps, "nfe": nfe,
                      "seconds": round(seconds, 3), "out": os.path.abspath(out)}))
    return 0


def _default_out(path: str) -> str:
    root = path if os.path.isdir(os.path.join(path, "checkpoints")) else os.path.dirname(path.rstrip("/"))
    return os.path.join(root, "samples", time.strftime("samples-%Y%m%d-%H%M%S.jsonl"))
