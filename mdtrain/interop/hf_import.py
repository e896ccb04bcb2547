"""``mdtrain import hf``: a local Hugging Face causal-LM directory (``config.json`` + safetensors) of the Llama,
Qwen2 or GPT-2 family -> an mdtrain export of ``model.name=llama``.

The config maps onto ``model.llama`` (norm, MLP, grouped-query heads, rotary base and scaling or GPT-2's position
table, tying, biases); the weights map one to one, with q/k/v fused per key/value group (``models/llama.py``) and
GPT-2's Conv1D weights transposed. The tokenizer (``hf:DIR`` by default) decides the vocabulary: ids the tokenizer
has keep their rows; the ids mdtrain appends get new rows (the mask token: the mean of the existing embedding and
head rows; a pad: zero rows, see :func:`new_rows`); rows past the tokenizer's vocabulary (padding some checkpoints
carry) are dropped. Imported as written the model is causal with the ``ar``
objective; a recipe (``--recipe configs/adapt_llada.yaml``) turns it into a diffusion model to fine-tune.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from mdtrain.interop.common import build_config, check_against_model, new_rows, write_export
from mdtrain.interop.safeload import load_sharded_safetensors, load_tensor_file

FAMILIES = ("llama", "qwen2", "gpt2")
_ACT = {"silu": "swiglu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


# ----------------------------------------------------------------------------------------------------------------
# config


def read_hf_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory}: no config.json (mdtrain import hf needs a local Hugging Face model "
                                "directory: config.json + model.safetensors)")
    try:
        with open(path) as fh:
            cfg = json.load(fh)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from None
    kind = cfg.get("model_type")
    if kind not in FAMILIES:
        raise ValueError(f"{path}: model_type {kind!r} is not supported (supported: {', '.join(FAMILIES)})")
    return cfg


def rope_from_hf(hf: dict) -> tuple[float, dict]:
    """(theta, scaling) from either layout: transformers 5's ``rope_parameters`` or 4's ``rope_theta`` +
    ``rope_scaling``."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    merged = {**scaling, **params}
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind == "default":
        return theta, {}
    merged["rope_type"] = kind
    merged.pop("type", None)
    return theta, merged


def llama_sections(hf: dict, path: str) -> dict:
    """The ``model`` (and ``data.seq_len``) config of an HF causal LM, imported causal for ``ar``."""
    kind = hf["model_type"]

    def bad(msg):
        return ValueError(f"{path}/config.json: {msg}")

    if kind == "gpt2":
        d, layers, heads = hf["n_embd"], hf["n_layer"], hf["n_head"]
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
            raise bad(f"activation_function {act!r} is not supported (gelu_new, gelu)")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise bad("scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn change the attention; not supported")
        if hf.get("scale_attn_weights") is False:
            raise bad("scale_attn_weights=false (unscaled attention) is not supported")
        llama = {"mlp": _ACT[act], "norm": "layernorm", "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
                 "positions": "learned", "max_positions": hf.get("n_positions", 1024),
                 "ffn_hidden": hf.get("n_inner") or 4 * d, "tie_embeddings": hf.get("tie_word_embeddings", True),
                 "qkv_bias": True, "out_bias": True, "mlp_bias": True}
        dropout = float(hf.get("resid_pdrop", 0.0))
        context = hf.get("n_positions", 1024)
    else:
        d, layers, heads = hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"]
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise bad(f"hidden_act {act!r} is not supported for {kind} (silu)")
        if hf.get("use_sliding_window") or (kind == "llama" and hf.get("sliding_window")):
            raise bad("sliding-window attention is not supported")
        theta, scaling = rope_from_hf(hf)
        head_dim = hf.get("head_dim") or d // heads
        llama = {"mlp": "swiglu", "norm": "rmsnorm", "norm_eps": hf.get("rms_norm_eps", 1e-6),
                 "positions": "rope", "max_positions": hf.get("max_position_embeddings", 0), "rope_theta": theta,
                 "rope_scaling": scaling, "ffn_hidden": hf["intermediate_size"],
                 "n_kv_heads": hf.get("num_key_value_heads") or heads,
                 "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
                 "head_dim": head_dim if head_dim != d // heads else None}
        if kind == "qwen2":
            llama.update(qkv_bias=True, out_bias=False, mlp_bias=False)
        else:
            bias = bool(hf.get("attention_bias", False))
            llama.update(qkv_bias=bias, out_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)))
        dropout = float(hf.get("attention_dropout", 0.0) or 0.0)
        context = hf.get("max_position_embeddings", 2048)
    if d % heads:
        raise bad(f"hidden size {d} is not a multiple of the {heads} heads")
    if heads % (llama.get("n_kv_heads") or heads):
        raise bad(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={llama['n_kv_heads']}")
    llama["attention"] = "causal"
    model = {"name": "llama", "flavor": "debug", "n_layers": layers, "d_model": d, "n_heads": heads,
             "dropout": dropout, "llama": llama}
    return {"model": model, "objective": {"name": "ar"}, "data": {"seq_len": int(min(context or 1024, 2048))}}


# ----------------------------------------------------------------------------------------------------------------
# weights


def load_hf_weights(directory: str) -> tuple[dict, str]:
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            state = load_sharded_safetensors(path) if name.endswith(".json") else load_tensor_file(path)
            if not isinstance(state, dict):
                raise ValueError(f"{path}: not a state dict")
            return state, path
    raise FileNotFoundError(f"{directory}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _fuse_qkv(q, k, v, n_kv: int):
    """q (H·hd, ...), k and v (Hkv·hd, ...) -> rows (Hkv, H/Hkv + 2, hd): each group's queries, key, value."""
    rest = q.shape[1:]
    hd = k.shape[0] // n_kv
    if k.shape != v.shape or k.shape[0] != n_kv * hd or q.shape[0] % (n_kv * hd):
        raise ValueError(f"q/k/v of shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} do not fit "
                         f"{n_kv} key/value heads")
    q = q.reshape(n_kv, -1, hd, *rest)
    return torch.cat([q, k.reshape(n_kv, 1, hd, *rest), v.reshape(n_kv, 1, hd, *rest)], 1).reshape(-1, *rest)


def convert_hf_state(hf_state: dict, hf: dict, llama: dict, path: str) -> tuple[dict, dict]:
    """HF names -> mdtrain names; returns (state, source names)."""
    out, source, used = {}, {}, set()

    def take(dst, src, transform=None):
        if src not in hf_state:
            raise ValueError(f"{path}: no {src} (expected for {hf['model_type']} with {llama})")
        value = hf_state[src]
        used.add(src)
        out[dst] = transform(value) if transform else value
        source[dst] = src

    def has(src):
        return src in hf_state

    n_kv = llama.get("n_kv_heads") or hf.get("n_head")
    if hf["model_type"] == "gpt2":
        p = "transformer." if has("transformer.wte.weight") else ""
        take("embed.weight", f"{p}wte.weight")
        take("pos_embed.weight", f"{p}wpe.weight")
        for i in range(hf["n_layer"]):
            b, t = f"{p}h.{i}.", f"blocks.{i}."
            for norm, mine in (("ln_1", "norm1"), ("ln_2", "norm2")):
                take(f"{t}{mine}.weight", f"{b}{norm}.weight")
                take(f"{t}{mine}.bias", f"{b}{norm}.bias")

            def split_fuse(w, conv=True):
                w = w.t() if conv else w  # Conv1D stores (in, out)
                return _fuse_qkv(*w.chunk(3, dim=0), n_kv)
            take(f"{t}attn.qkv.weight", f"{b}attn.c_attn.weight", split_fuse)
            take(f"{t}attn.qkv.bias", f"{b}attn.c_attn.bias", lambda w: _fuse_qkv(*w.chunk(3), n_kv))
            take(f"{t}attn.out.weight", f"{b}attn.c_proj.weight", lambda w: w.t())
            take(f"{t}attn.out.bias", f"{b}attn.c_proj.bias")
            take(f"{t}mlp.fc1.weight", f"{b}mlp.c_fc.weight", lambda w: w.t())
            take(f"{t}mlp.fc1.bias", f"{b}mlp.c_fc.bias")
            take(f"{t}mlp.fc2.weight", f"{b}mlp.c_proj.weight", lambda w: w.t())
            take(f"{t}mlp.fc2.bias", f"{b}mlp.c_proj.bias")
        take("final_norm.weight", f"{p}ln_f.weight")
        take("final_norm.bias", f"{p}ln_f.bias")
        ignored = (".attn.bias", ".attn.masked_bias")  # old checkpoints' causal-mask buffers
    else:
        p = "model."
        take("embed.weight", f"{p}embed_tokens.weight")
        for i in range(hf["num_hidden_layers"]):
            b, t = f"{p}layers.{i}.", f"blocks.{i}."
            take(f"{t}norm1.weight", f"{b}input_layernorm.weight")
            take(f"{t}norm2.weight", f"{b}post_attention_layernorm.weight")
            qkv = [hf_state.get(f"{b}self_attn.{x}_proj.weight") for x in "qkv"]
            if any(w is None for w in qkv):
                raise ValueError(f"{path}: missing {b}self_attn.q/k/v_proj.weight")
            used.update(f"{b}self_attn.{x}_proj.weight" for x in "qkv")
            out[f"{t}attn.qkv.weight"] = _fuse_qkv(*qkv, n_kv)
            source[f"{t}attn.qkv.weight"] = f"{b}self_attn.q_proj.weight"
            if llama["qkv_bias"]:
                bq = [hf_state.get(f"{b}self_attn.{x}_proj.bias") for x in "qkv"]
                if any(w is None for w in bq):
                    raise ValueError(f"{path}: missing {b}self_attn.q/k/v_proj.bias")
                used.update(f"{b}self_attn.{x}_proj.bias" for x in "qkv")
                out[f"{t}attn.qkv.bias"] = _fuse_qkv(*bq, n_kv)
                source[f"{t}attn.qkv.bias"] = f"{b}self_attn.q_proj.bias"
            take(f"{t}attn.out.weight", f"{b}self_attn.o_proj.weight")
            if llama["out_bias"]:
                take(f"{t}attn.out.bias", f"{b}self_attn.o_proj.bias")
            for mine, theirs in (("fc1", "up_proj"), ("gate", "gate_proj"), ("fc2", "down_proj")):
                take(f"{t}mlp.{mine}.weight", f"{b}mlp.{theirs}.weight")
                if llama["mlp_bias"]:
                    take(f"{t}mlp.{mine}.bias", f"{b}mlp.{theirs}.bias")
        take("final_norm.weight", f"{p}norm.weight")
        ignored = ("rotary_emb.inv_freq",)
    if not llama["tie_embeddings"]:
        take("head.weight", "lm_head.weight")
    elif has("lm_head.weight"):
        used.add("lm_head.weight")
        if not torch.equal(hf_state["lm_head.weight"], out["embed.weight"]):
            raise ValueError(f"{path}: tie_word_embeddings is set but lm_head.weight differs from the embedding")
    left = [k for k in hf_state if k not in used and not k.endswith(ignored)]
    if left:
        raise ValueError(f"{path}: {left[0]} (and {len(left) - 1} more) has no place in the imported model")
    return out, source


def fit_vocabulary(state: dict, tokenizer, tied: bool, path: str) -> tuple[dict, list]:
    """Embedding (and head) rows resized to the tokenizer's ``vocab_size`` (rows past the tokenizer's own ids
    dropped, the appended specials' rows made by :func:`new_rows`). Returns (state, notes)."""
    rows, base = state["embed.weight"].shape[0], tokenizer.base_size
    if base > rows:
        raise ValueError(f"{path}: the tokenizer has {base} ids but the model only {rows} embedding rows")
    notes = []
    if rows > base:
        notes.append(f"dropped {rows - base} embedding rows past the tokenizer's {base} ids")
    if tokenizer.vocab_size > base:
        new_ids = [n for n in ("mask", "bos", "eos", "pad") if getattr(tokenizer, n + "_id") >= base]
        notes.append(f"added rows for {', '.join(new_ids)} (mask: mean of the existing rows; others: zero)")
    return new_rows(state, tokenizer, base, tied), notes


def import_hf(directory: str, out: str, tokenizer_spec: Optional[str] = None, recipe: Optional[str] = None,
              overrides: Optional[list] = None) -> dict:
    """Write the export ``out`` from a Hugging Face causal-LM directory; returns what was imported."""
    from mdtrain.interop.tokenizer import import_tokenizer

    hf = read_hf_config(directory)
    sections = llama_sections(hf, directory)
    hf_state, weights = load_hf_weights(directory)
    state, source = convert_hf_state(hf_state, hf, sections["model"]["llama"], weights)
    tokenizer = import_tokenizer(tokenizer_spec or f"hf:{directory}")
    state, notes = fit_vocabulary(state, tokenizer, sections["model"]["llama"]["tie_embeddings"], weights)
    cfg = build_config(sections, recipe, overrides)
    cfg.checkpoint.load_from = os.path.abspath(out)
    state = check_against_model(cfg, tokenizer.vocab_size, state, source, weights)
    info = {"from": "hf", "path": os.path.abspath(directory), "model_type": hf["model_type"],
            "objective": cfg.objective.name, "attention": cfg.model.llama.attention,
            "vocab_size": tokenizer.vocab_size, "mask_id": tokenizer.mask_id, "notes": notes,
            "recipe": os.path.abspath(recipe) if recipe else None,
            "n_params": int(sum(v.numel() for k, v in state.items()))}
    write_export(out, state, cfg, tokenizer, info)
    return info
