"""``mdtrain import mdlm``: a checkpoint of the MDLM reference code (kuleshov-group/mdlm) -> an mdtrain export.

Accepted: the ``DIT`` (or ``AR``) state dict, with or without the ``backbone.`` prefix its Lightning module and
its Hugging Face wrapper add, as safetensors, a plain state-dict file, or the trainer's Lightning ``.ckpt`` (whose
EMA shadow weights are taken when present, unless ``use_ema=False``); a directory holding one of those (and
maybe a ``config.json``). The weights map one to one onto mdtrain's DiT (``model.name=dit``, mdlm variant) or
causal transformer, except the fused qkv rows: MDLM lays them out (3, heads, head_dim), mdtrain per head
(heads, 3, head_dim). The architecture is read off the tensor shapes (the head count from the rotary table);
objective settings (parameterisation, time conditioning, T, schedule, length) from the Lightning checkpoint's
Hydra config or a ``config.json`` when there is one, else MDLM's defaults.
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional

import torch

from mdtrain.interop.common import build_config, check_against_model, new_rows, write_export
from mdtrain.interop.safeload import Opaque, load_tensor_file

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.ckpt", "last.ckpt", "best.ckpt")

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_BLOCK_MAP = {"norm1.weight": "norm1.weight", "norm2.weight": "norm2.weight", "attn_qkv.weight": "attn.qkv.weight",
              "attn_out.weight": "attn.out.weight", "mlp.0.weight": "mlp.fc1.weight", "mlp.0.bias": "mlp.fc1.bias",
              "mlp.2.weight": "mlp.fc2.weight", "mlp.2.bias": "mlp.fc2.bias",
              "adaLN_modulation.weight": "adaLN_modulation.weight", "adaLN_modulation.bias": "adaLN_modulation.bias"}
_TOP_MAP = {"vocab_embed.embedding": "embed.weight", "sigma_map.mlp.0.weight": "time_embed.fc1.weight",
            "sigma_map.mlp.0.bias": "time_embed.fc1.bias", "sigma_map.mlp.2.weight": "time_embed.fc2.weight",
            "sigma_map.mlp.2.bias": "time_embed.fc2.bias", "output_layer.norm_final.weight": "final_norm.weight",
            "output_layer.linear.weight": "head.weight", "output_layer.linear.bias": "head.bias",
            "output_layer.adaLN_modulation.weight": "final_adaLN.weight",
            "output_layer.adaLN_modulation.bias": "final_adaLN.bias"}
_BUFFERS = ("rotary_emb.inv_freq",)
_PARAMETERIZATION = {"subs": "mdlm", "sedd": "sedd", "d3pm": "d3pm", "ar": "ar"}
_SCHEDULE = {"loglinear": "loglinear", "cosine": "cosine", "cosinesqr": "cosinesqr", "linear": "linear_sigma",
             "geometric": "geometric_sigma"}


# ----------------------------------------------------------------------------------------------------------------
# reading


def find_weights(path: str) -> str:
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        for name in WEIGHT_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise FileNotFoundError(f"{path}: no MDLM weights here (looked for {', '.join(WEIGHT_FILES)})")
    raise FileNotFoundError(f"{path}: no such file or directory")


def plain(obj):
    """An unpickled OmegaConf config (inert records of DictConfig / ListConfig / value nodes) as plain data."""
    if isinstance(obj, Opaque):
        state = obj.state[0] if isinstance(obj.state, tuple) and obj.state else obj.state
        if isinstance(state, dict) and "_content" in state:
            return plain(state["_content"])
        if isinstance(state, dict) and "_val" in state:
            return plain(state["_val"])
        if obj.entries:
            return {k: plain(v) for k, v in obj.entries.items()}
        return [plain(v) for v in obj.items] if obj.items else None
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj if isinstance(obj, (str, int, float, bool, type(None))) else None


def _get(tree, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def read_checkpoint(path: str, use_ema: bool = True):
    """(DIT state dict without prefix, Hydra config as plain data or {}, which weights: 'ema' / 'raw')."""
    obj = load_tensor_file(path)
    config, which = {}, "raw"
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        hyper = obj.get("hyper_parameters")
        hyper = hyper.entries if isinstance(hyper, Opaque) else hyper
        if isinstance(hyper, dict):
            config = plain(hyper.get("config")) or {}
        state = {k: v for k, v in obj["state_dict"].items() if isinstance(v, torch.Tensor)}
        ema = obj.get("ema")
        if use_ema and isinstance(ema, dict) and ema.get("shadow_params"):
            state, which = _apply_ema(state, ema["shadow_params"], path), "ema"
    elif isinstance(obj, dict) and any(isinstance(v, torch.Tensor) for v in obj.values()):
        state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    else:
        raise ValueError(f"{path}: neither a state dict nor a Lightning checkpoint (top-level keys: "
                         f"{sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__})")
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    return state, config, which


def _apply_ema(state: dict, shadows: list, path: str) -> dict:
    """The EMA shadows replace the backbone's parameters. MDLM's EMA holds them in ``backbone.parameters()``
    order (its noise schedule has none), which is the state dict's order without its buffers."""
    names = [k for k in state if k.startswith("backbone.") and not k.endswith(_BUFFERS)]
    if len(names) != len(shadows):
        raise ValueError(f"{path}: its EMA holds {len(shadows)} tensors, its backbone {len(names)} parameters; "
                         "pass --no-ema to import the raw weights")
    out = dict(state)
    for name, shadow in zip(names, shadows):
        if not isinstance(shadow, torch.Tensor) or tuple(shadow.shape) != tuple(state[name].shape):
            raise ValueError(f"{path}: EMA tensor for {name} has shape {tuple(getattr(shadow, 'shape', ()))}, the "
                             f"weight {tuple(state[name].shape)}; pass --no-ema to import the raw weights")
        out[name] = shadow
    return out


def read_side_config(weights: str) -> dict:
    """A ``config.json`` beside the weights: the HF MDLM wrapper's (``model_length``, ``hidden_dim``...) or the
    ``{"model": {...}, "model.length": L}`` one; returned in the Hydra layout read_checkpoint gives."""
    path = os.path.join(os.path.dirname(os.path.abspath(weights)), "config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as fh:
            raw = json.load(fh)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable config ({e})") from None
    if "model_length" in raw or "hidden_dim" in raw:  # the HF wrapper's MDLMConfig
        return {"model": {"length": raw.get("model_length"), "dropout": raw.get("dropout"),
                          "n_heads": raw.get("n_heads")},
                "time_conditioning": raw.get("time_conditioning")}
    model = dict(raw.get("model", {}))
    if "model.length" in raw:
        model["length"] = raw["model.length"]
    return {**{k: v for k, v in raw.items() if k not in ("model", "model.length")}, "model": model}


# ----------------------------------------------------------------------------------------------------------------
# converting


def convert_state(state: dict, path: str, n_heads_hint: Optional[int] = None):
    """MDLM names -> mdtrain names (qkv rows regrouped per head). Returns (state, source names, dims dict)."""
    unknown = [k for k in state if k not in _TOP_MAP and k not in _BUFFERS
               and not (_BLOCK.match(k) and _BLOCK.match(k).group(2) in _BLOCK_MAP)]
    if unknown or "vocab_embed.embedding" not in state:
        what = unknown[0] if unknown else "no vocab_embed.embedding"
        raise ValueError(f"{path}: not an MDLM DIT/AR state dict ({what}; expected vocab_embed.embedding, "
                         f"blocks.N.attn_qkv.weight, output_layer.linear.weight, ... optionally under backbone.)")
    emb = state["vocab_embed.embedding"]
    vocab, d = emb.shape
    n_layers = 1 + max((int(_BLOCK.match(k).group(1)) for k in state if _BLOCK.match(k)), default=-1)
    if n_layers == 0:
        raise ValueError(f"{path}: no blocks.N.* weights")
    conditioned = "sigma_map.mlp.0.weight" in state
    if "rotary_emb.inv_freq" in state:
        half = state["rotary_emb.inv_freq"].numel()
        if half == 0 or d % (2 * half):
            raise ValueError(f"{path}: rotary_emb.inv_freq has {half} entries, which does not divide the hidden "
                             f"size {d} into heads")
        n_heads = d // (2 * half)
        expected = 1.0 / 10000 ** (torch.arange(0, 2 * half, 2, dtype=torch.float64) / (2 * half))
        if not torch.allclose(state["rotary_emb.inv_freq"].double(), expected, rtol=1e-5):
            raise ValueError(f"{path}: rotary_emb.inv_freq is not MDLM's base-10000 table")
    elif n_heads_hint:
        n_heads = int(n_heads_hint)
    else:
        raise ValueError(f"{path}: no rotary_emb.inv_freq to read the head count from; pass model.n_heads=H")
    head_dim = d // n_heads
    out, source = {}, {}
    for key, value in state.items():
        if key in _BUFFERS:
            continue
        m = _BLOCK.match(key)
        name = f"blocks.{m.group(1)}.{_BLOCK_MAP[m.group(2)]}" if m else _TOP_MAP[key]
        if name.endswith("attn.qkv.weight"):
            if value.dim() != 2 or value.shape[0] != 3 * d:
                raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, expected ({3 * d}, {d}) for hidden "
                                 f"size {d}")
            # (3, H, hd, d) -> (H, 3, hd, d): mdtrain keeps each head's q, k, v rows together
            value = value.reshape(3, n_heads, head_dim, -1).transpose(0, 1).reshape(3 * d, -1)
        out[name], source[name] = value, key
    cond_dim = state["sigma_map.mlp.2.weight"].shape[0] if conditioned else None
    dims = {"n_layers": n_layers, "d_model": d, "n_heads": n_heads, "vocab": vocab, "cond_dim": cond_dim,
            "conditioned": conditioned}
    return out, source, dims


def mdtrain_sections(dims: dict, hydra: dict) -> dict:
    """The config an imported checkpoint implies (objective settings from its Hydra config where given)."""
    model = {"name": "dit" if dims["conditioned"] else "causal", "flavor": "debug", "variant": "mdlm",
             "n_layers": dims["n_layers"], "d_model": dims["d_model"], "n_heads": dims["n_heads"]}
    if dims["cond_dim"]:
        model["cond_dim"] = dims["cond_dim"]
    dropout = _get(hydra, "model.dropout")
    if isinstance(dropout, (int, float)):
        model["dropout"] = float(dropout)
    param = _get(hydra, "parameterization") or ("subs" if dims["conditioned"] else "ar")
    if param not in _PARAMETERIZATION:
        raise ValueError(f"MDLM parameterization {param!r} has no mdtrain objective "
                         f"({', '.join(_PARAMETERIZATION)})")
    objective = {"name": _PARAMETERIZATION[param]}
    if objective["name"] == "ar" and dims["conditioned"]:
        raise ValueError("an AR parameterization on a DiT checkpoint: mdtrain's ar objective needs the causal model")
    if objective["name"] != "ar":
        for src, dst in (("time_conditioning", "time_conditioning"), ("T", "T"), ("subs_masking", "subs_masking"),
                         ("training.sampling_eps", "sampling_eps"),
                         ("training.importance_sampling", "importance_sampling"),
                         ("training.antithetic_sampling", "antithetic")):
            value = _get(hydra, src)
            if value is not None:
                objective[dst] = value
        kind = _get(hydra, "noise.type")
        if kind:
            if kind not in _SCHEDULE:
                raise ValueError(f"MDLM noise.type {kind!r} has no mdtrain schedule ({', '.join(_SCHEDULE)})")
            objective["schedule"] = _SCHEDULE[kind]
        if objective["name"] != "d3pm":
            objective.pop("subs_masking", None)
    length = _get(hydra, "model.length")
    sections = {"model": model, "objective": objective}
    if isinstance(length, int) and length > 0:
        sections["data"] = {"seq_len": length}
    return sections


def import_mdlm(path: str, out: str, tokenizer_spec: str, use_ema: bool = True, overrides: Optional[list] = None,
                recipe: Optional[str] = None) -> dict:
    """Write the export directory ``out`` from an MDLM checkpoint; returns what was imported."""
    from mdtrain.interop.tokenizer import import_tokenizer

    weights = find_weights(path)
    state, hydra, which = read_checkpoint(weights, use_ema=use_ema)
    if not hydra:
        hydra = read_side_config(weights)
    hint = _get(hydra, "model.n_heads")
    converted, source, dims = convert_state(state, weights, hint if isinstance(hint, int) else None)
    tokenizer = import_tokenizer(tokenizer_spec)
    rows = dims["vocab"]
    extra = [n for n in ("mask", "bos", "eos", "pad") if getattr(tokenizer, n + "_id") >= rows]
    if tokenizer.base_size + (tokenizer.mask_id >= tokenizer.base_size) != rows or "mask" in extra:
        raise ValueError(f"{weights}: the checkpoint has {rows} token rows (its mask is the last one unless the "
                         f"tokenizer has a mask token), the tokenizer {tokenizer_spec!r} has {tokenizer.base_size} ids "
                         f"and mask id {tokenizer.mask_id}; pass the tokenizer the model was trained with")
    if extra:  # specials mdtrain needs that MDLM did without (GPT-2 has no pad): rows that change nothing
        converted = new_rows(converted, tokenizer, rows, tied=False)
    cfg = build_config(mdtrain_sections(dims, hydra), recipe, overrides)
    cfg.checkpoint.load_from = os.path.abspath(out)
    state = check_against_model(cfg, tokenizer.vocab_size, converted, source, weights)
    info = {"from": "mdlm", "path": os.path.abspath(weights), "weights": which, "model": cfg.model.name,
            "objective": cfg.objective.name, "vocab_size": tokenizer.vocab_size, "mask_id": tokenizer.mask_id,
            "added_rows": extra,
            "n_params": int(sum(v.numel() for v in state.values()))}
    write_export(out, state, cfg, tokenizer, info)
    return info
