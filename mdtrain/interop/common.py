"""What every importer shares: the mdtrain config of an imported model (plus a recipe and overrides), the shape
check against the model that config builds, and writing the export directory."""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from mdtrain.configtools import ConfigError, atomic_write_text, from_dict, parse_overrides, set_dotted, to_dict, \
    validate_tree

IMPORT_INFO = "import.json"

# What a recipe may change of an imported model: everything else under `model` fixes the weights' shapes or the
# function they compute.
RECIPE_MODEL_KEYS = {"dropout", "attention", "llama.attention", "llama.anneal_steps"}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "rope_scaling":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "rope_scaling" \
            else v
    return out


def build_config(sections: dict, recipe: Optional[str] = None, overrides: Optional[list] = None):
    """A full, validated ``Config``: defaults <- ``sections`` (what the importer read) <- the recipe YAML <- the
    ``key=value`` overrides. A recipe that changes the architecture is an error naming the key."""
    from mdtrain.config import Config, read_yaml

    data = _merge(to_dict(Config()), sections)
    if recipe:
        extra = read_yaml(recipe)
        before = _flatten(data.get("model", {}))
        data = _merge(data, extra)
        after = _flatten(data.get("model", {}))
        changed = sorted(k for k in after if after[k] != before.get(k) and k not in RECIPE_MODEL_KEYS)
        if changed:
            raise ConfigError(f"recipe {recipe} changes model.{changed[0]} of the imported model; a recipe may only "
                              f"set model.{', model.'.join(sorted(RECIPE_MODEL_KEYS))} (the rest is the weights')")
    try:
        cfg = from_dict(Config, data)
    except ConfigError as e:
        raise ConfigError(f"{recipe}: {e}" if recipe else str(e)) from None
    for key, value in parse_overrides(list(overrides or [])):
        set_dotted(cfg, key, value)
    validate_tree(cfg)
    return cfg


def check_against_model(cfg, vocab_size: int, state: dict, source_names: dict, path: str) -> dict:
    """Build the model ``cfg`` describes and check ``state`` fits it exactly; returns it in the model's dtypes.

    ``source_names`` maps each mdtrain name to the checkpoint key it came from (for the error message)."""
    from mdtrain.models import build_model

    with torch.device("meta"):
        model = build_model(cfg.model, vocab_size, cfg.data.seq_len)
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    if missing:
        raise ValueError(f"{path}: no weights for {missing[0]} (of {len(missing)} missing) of a "
                         f"{cfg.model.name} with {_dims(cfg)}")
    extra = [k for k in state if k not in want]
    if extra:
        raise ValueError(f"{path}: {source_names.get(extra[0], extra[0])} has no place in a {cfg.model.name} "
                         f"with {_dims(cfg)}")
    for k, v in want.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"{path}: {source_names.get(k, k)} has shape {tuple(state[k].shape)}, expected "
                             f"{tuple(v.shape)} for a {cfg.model.name} with {_dims(cfg)}")
    return {k: state[k].to(v.dtype).contiguous() for k, v in want.items()}


def _dims(cfg) -> str:
    m = cfg.model
    return f"n_layers={m.n_layers}, d_model={m.d_model}, n_heads={m.n_heads}"


def write_export(out: str, state: dict, cfg, tokenizer, info: dict) -> str:
    """An mdtrain export directory (``mdtrain.exported``) plus ``import.json`` saying where it came from."""
    from mdtrain.exported import save_exported

    if os.path.exists(os.path.join(out, "model.safetensors")) and not os.path.exists(os.path.join(out, IMPORT_INFO)):
        raise FileExistsError(f"{out} already holds an export that was not written by `mdtrain import`; choose "
                              "another --out")
    save_exported(out, state, cfg, tokenizer)
    atomic_write_text(os.path.join(out, IMPORT_INFO), json.dumps(info, indent=1) + "\n")
    return out


NEW_ROW_BIAS = -1e4  # a new non-mask special's logit on heads with a bias: probability exactly 0 in fp32


def new_rows(state: dict, tokenizer, keep: int, tied: bool) -> dict:
    """Rows for the ids from ``keep`` on (specials mdtrain appended): the mask's embedding (and head) row is the
    mean of the kept rows, a start for the token the diffusion objectives train most; any other new special
    (pad, which the loader never attends to or scores) gets zero rows and, on heads with a bias (MDLM's DiT), a
    bias of NEW_ROW_BIAS, so the distribution over the old ids does not change; a bias-free head (Llama's) gives
    it logit 0, a small extra class."""
    out = dict(state)
    want = tokenizer.vocab_size
    for name in ("embed.weight",) + (() if tied else ("head.weight", "head.bias")):
        if name not in state:
            continue
        w = state[name]
        new = w.new_zeros(want, *w.shape[1:])
        new[:keep] = w[:keep]
        if name == "head.bias":
            new[keep:] = NEW_ROW_BIAS
        if tokenizer.mask_id >= keep:
            new[tokenizer.mask_id] = w[:keep].double().mean(0).to(w.dtype)
        out[name] = new
    return out
