"""``mdtrain sample`` for image runs (``model.image_shape`` set): samples -> a PNG grid and a ``.npy`` of them.

The sampler and its options come from the ``sample`` section as for text (MD4's defaults: ``sample.sampler=
ancestral``, which runs on the cosine grid down to t = 0, with ``sample.steps=256``). A class-conditional model
(``model.num_classes > 0``) draws one grid row per class, ``ceil(sample.num_samples / num_classes)`` images each;
every batch holds one class, so the samplers may re-run the network on any subset of its rows. The last stdout line
is a JSON summary (samples, network evaluations, seconds, the PNG and the array).
"""
from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import torch

from mdtrain.configtools import ConfigError
from mdtrain.data.images import write_image_grid


def _labelled(model, label: int):
    """The model_fn of one class: every row the sampler passes is conditioned on ``label``."""
    def model_fn(x, cond=None, attention_mask=None):
        return model(x, cond, attention_mask, labels=torch.full((x.shape[0],), label, dtype=torch.long,
                                                                device=x.device))
    model_fn.device = next(model.parameters()).device
    return model_fn


def sample_images(bundle, path: str, model_fn, sampler_options: dict) -> int:
    from mdtrain.objectives.samplers import sample

    cfg, scfg = bundle.cfg, bundle.cfg.sample
    if scfg.prefix:
        raise ConfigError("sample.prefix is text; image runs sample whole images (leave sample.prefix empty)")
    shape, k = cfg.model.image_shape, cfg.model.num_classes
    per_class = math.ceil(scfg.num_samples / k) if k else scfg.num_samples
    gen = torch.Generator().manual_seed(scfg.seed)
    tokens, nfe, t0 = [], 0, time.time()
    for label in (range(k) if k else [None]):
        fn = model_fn if label is None else _labelled(bundle.model, label)
        remaining = per_class
        while remaining > 0:
            b = min(scfg.batch_size, remaining)
            with torch.no_grad():
                out, info = sample(bundle.objective, fn, b, cfg.data.seq_len, scfg.steps, gen, sampler=scfg.sampler,
                                   **sampler_options)
            tokens.append(out.cpu())
            nfe += int(info["nfe"])
            remaining -= b
    seconds = time.time() - t0
    out = scfg.out or _default_out(path)
    png = out if out.endswith(".png") else os.path.splitext(out)[0] + ".png"
    images = write_image_grid(torch.cat(tokens).numpy(), shape, png, ncol=per_class if k else None)
    array = os.path.splitext(png)[0] + ".npy"
    np.save(array, images, allow_pickle=False)
    print(json.dumps({"num_samples": len(images), "sampler": scfg.sampler, "steps": scfg.steps, "nfe": nfe,
                      "classes": k, "seconds": round(seconds, 3), "out": os.path.abspath(png),
                      "array": os.path.abspath(array)}))
    return 0


def _default_out(path: str) -> str:
    root = path if os.path.isdir(os.path.join(path, "checkpoints")) else os.path.dirname(path.rstrip("/"))
    return os.path.join(root, "samples", time.strftime("samples-%Y%m%d-%H%M%S.png"))
