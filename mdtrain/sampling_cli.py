"""``mdtrain sample``: generate with any sampler from a run dir, checkpoint or export; write text and token ids.

The ``sample`` config section picks the sampler and its options (``sample.sampler=first_hitting sample.top_p=0.9
...``); the prompt (``sample.prefix``) or infill template (``sample.infill="text <mask*8> more text"``) and the
output file are options of that section too. The last stdout line is a JSON summary (samples, network
evaluations, seconds, output file). A bad option or template is one ``config error`` line.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time

import torch

from mdtrain.configtools import ConfigError
from mdtrain.inference import load_for_inference
from mdtrain.objectives.protocol import make_model_fn
from mdtrain.objectives.samplers import sample

# SampleConfig fields the CLI consumes itself; every other field is passed to the sampler as an option.
_CLI_FIELDS = {"sampler", "steps", "num_samples", "batch_size", "seed", "out", "prefix", "infill", "show",
               "stop_at_eos"}
_BLANK = re.compile(r"<mask(?:\*(\d+))?>")


def sampler_options(scfg) -> dict:
    return {k: v for k, v in dataclasses.asdict(scfg).items() if k not in _CLI_FIELDS}


def parse_infill(text: str, encode, mask_id: int) -> list[int]:
    """Token ids of an infill template: text segments encoded as they are, ``<mask>`` one blank, ``<mask*N>`` N
    blanks (mask_id). Anything else starting with ``<mask`` is an error (there is no escape for it)."""
    ids, pos = [], 0
    for m in list(_BLANK.finditer(text)) + [None]:
        seg = text[pos:m.start() if m else len(text)]
        bad = seg.find("<mask")
        if bad >= 0:
            at = pos + bad
            raise ConfigError(f"sample.infill: malformed blank {text[at:at + 12]!r} at character {at}; write <mask> "
                              "or <mask*N> with N >= 1")
        if seg:
            ids.extend(encode(seg))
        if m is None:
            break
        n = 1 if m.group(1) is None else int(m.group(1))
        if n < 1:
            raise ConfigError(f"sample.infill: {m.group(0)!r} at character {m.start()} asks for no blank; N >= 1")
        ids.extend([mask_id] * n)
        pos = m.end()
    return ids


def build_template(tokenizer, scfg, length: int, causal: bool):
    """The (1, n) template the sampler starts from (given tokens, mask_id where free), or None: BOS (when the
    tokenizer has one), then the prefix or the infill template; the positions after it are generated."""
    text = scfg.infill or scfg.prefix
    if not text:
        return None
    key = "sample.infill" if scfg.infill else "sample.prefix"
    if scfg.infill and causal:
        raise ConfigError("sample.infill needs a masked-diffusion model; an ar model generates left to right "
                          "(use sample.prefix)")
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None and tokenizer.bos_id >= 0 else []
    try:
        body = parse_infill(text, tokenizer.encode, tokenizer.mask_id) if scfg.infill else tokenizer.encode(text)
    except ValueError as e:  # e.g. a character a byte-less alphabet tokenizer cannot encode
        raise ConfigError(f"{key}: {e}; write it with characters the run's tokenizer knows") from None
    ids = bos + body
    if len(ids) > length or (len(ids) == length and tokenizer.mask_id not in body):
        raise ConfigError(f"{key} encodes to {len(ids)} tokens{' with BOS' if bos else ''}; the model generates "
                          f"{length} (data.seq_len + sample.num_strides·sample.stride_length): it must leave "
                          "something to generate; shorten it")
    return torch.tensor([ids])


def prepared_options(bundle, scfg) -> dict:
    """The sampler's keyword options for ``scfg`` as `mdtrain sample` and `mdtrain eval`'s gen-PPL row use them:
    the sample.* options, the prefix/infill template, BOS as the context token where the objective needs one (ar,
    the shifted parameterisation, bd3lm with ignore_bos) and EOS for bd3lm's stop_at_eos."""
    objective, tok = bundle.objective, bundle.tokenizer
    length = bundle.cfg.data.seq_len + scfg.num_strides * scfg.stride_length
    template = build_template(tok, scfg, length, objective.causal)
    opts = sampler_options(scfg)
    if template is not None:
        opts["prefix"] = template
    if objective.causal or objective.first_target or (getattr(objective, "block_size", 0) and objective.ignore_bos):
        opts["bos_id"] = tok.bos_id
    if getattr(objective, "block_size", 0) and scfg.stop_at_eos:
        opts["eos_id"] = tok.eos_id
    return opts


def main(args) -> int:
    bundle = load_for_inference(args.path, overrides=args.overrides)
    cfg, scfg = bundle.cfg, bundle.cfg.sample
    scfg.validate()  # overrides are applied after the run's config was checked
    model_fn = make_model_fn(bundle.model)
    if cfg.model.image_shape:  # image runs write a PNG grid (mdtrain/sampling_images.py)
        if scfg.infill:
            raise ConfigError("sample.infill is text; image runs sample whole images (leave sample.infill empty)")
        from mdtrain.sampling_images import sample_images
        return sample_images(bundle, args.path, model_fn, sampler_options(scfg))
    gen = torch.Generator().manual_seed(scfg.seed)
    opts = prepared_options(bundle, scfg)
    seqs, nfe, t0, info = [], 0, time.time(), {"sampler": scfg.sampler}
    remaining = scfg.num_samples
    while remaining > 0:
        b = min(scfg.batch_size, remaining)
        try:
            with torch.no_grad():
                tokens, info = sample(bundle.objective, model_fn, b, cfg.data.seq_len, scfg.steps, gen,
                                      sampler=scfg.sampler, **opts)
        except ValueError as e:  # an option the chosen sampler or objective cannot take
            raise ConfigError(f"sample.sampler={scfg.sampler}: {e}") from None
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
    print(json.dumps({"num_samples": len(seqs), "sampler": info["sampler"], "steps": scfg.steps, "nfe": nfe,
                      "seconds": round(seconds, 3), "out": os.path.abspath(out)}))
    return 0


def _default_out(path: str) -> str:
    root = path if os.path.isdir(os.path.join(path, "checkpoints")) else os.path.dirname(path.rstrip("/"))
    return os.path.join(root, "samples", time.strftime("samples-%Y%m%d-%H%M%S.jsonl"))
