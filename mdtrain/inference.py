"""Inference-side loading and export: a run dir, a checkpoint dir or an export dir becomes a ``Bundle`` (model in
eval mode, objective, tokenizer, config) in one plain process, whatever engine, world size or TP size wrote it.

``mdtrain eval``, ``mdtrain sample``, ``mdtrain export``, ``checkpoint.load_from`` and the generative-perplexity
scorer all load through :func:`load_for_inference`. Loading reads JSON, YAML (``safe_load``), safetensors, and
checkpoints through ``parallel.engines.safe_io`` (every pickle scanned, then read weights-only): nothing it reads can
execute code.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
import yaml

from mdtrain.checkpoint import resolve_checkpoint
from mdtrain.config import config_from_dict
from mdtrain.configtools import parse_overrides, set_dotted
from mdtrain.data.tokenizers import load_tokenizer
from mdtrain.exported import Bundle, is_export_dir, load_exported, save_exported
from mdtrain.modeling import build_objective_and_model
from mdtrain.parallel.engines.consolidate import load_consolidated


def load_for_inference(path: str, use_ema: Optional[bool] = None, overrides: Optional[list[str]] = None,
                       device: str | torch.device = "cpu") -> Bundle:
    """The model at ``path`` (run dir: its newest valid checkpoint; checkpoint dir; export dir) with ``overrides``
    (``key=value``) applied to its stored config.

    ``use_ema``: the EMA weights when the checkpoint has them; None = the run's ``train.use_ema_for_eval`` (after
    the overrides). An export dir holds one set of weights (chosen at export time)."""
    if is_export_dir(path):
        bundle = load_exported(path, device=device)
        for k, v in parse_overrides(overrides or []):
            set_dotted(bundle.cfg, k, v)
        return bundle
    pairs = parse_overrides(overrides or [])
    # checkpoint.verify=sha256 on the command line hashes every file first (default: sizes and the manifest)
    ckpt = resolve_checkpoint(path, checksums=("checkpoint.verify", "sha256") in pairs)
    with open(os.path.join(ckpt, "config.yaml")) as fh:
        cfg = config_from_dict(yaml.safe_load(fh))
    for k, v in pairs:
        set_dotted(cfg, k, v)
    if use_ema is None:
        use_ema = cfg.train.use_ema_for_eval
    tokenizer = load_tokenizer(os.path.join(ckpt, "tokenizer"))
    model, objective = build_objective_and_model(cfg, tokenizer.vocab_size, tokenizer.mask_id, cfg.data.seq_len)
    model.load_state_dict(load_consolidated(ckpt, model.state_dict(), ema=use_ema))
    model.to(device).eval()
    return Bundle(model=model, objective=objective, tokenizer=tokenizer, cfg=cfg)


def checkpoint_step(path: str) -> Optional[int]:
    """The training step of the weights at ``path`` (None for an export dir)."""
    if is_export_dir(path):
        return None
    with open(os.path.join(resolve_checkpoint(path), "manifest.json")) as fh:
        return json.load(fh)["step"]


def export(path: str, out_dir: str, use_ema: bool = True) -> str:
    """Consolidate a checkpoint (from any engine, any world size) into the export dir ``out_dir``."""
    bundle = load_for_inference(path, use_ema=use_ema)
    save_exported(out_dir, bundle.model.state_dict(), bundle.cfg, bundle.tokenizer)
    return out_dir


def export_main(args) -> int:
    """``mdtrain export RUN --out DIR [--no-ema]``."""
    out = export(args.path, args.out, use_ema=not args.no_ema)
    print(json.dumps({"export": os.path.abspath(out)}))
    return 0
