"""``mdtrain export RUN --format hf --out DIR``: a run, checkpoint or export as a Hugging Face model directory.

* AR models of the Llama family (``model.name=llama``, causal, ``ar``) become a native ``LlamaForCausalLM``,
  ``Qwen2ForCausalLM`` or ``GPT2LMHeadModel`` (whichever has their biases and positions): no remote code. The
  mask row mdtrain appended is dropped (the ar objective never gives it probability, so the exported softmax is
  mdtrain's); the ids after it (an appended pad) move down by one.
* Everything else (DiT, the causal transformer, a bidirectional or annealed Llama) gets ``configuration_mdtrain.py``
  and ``modeling_mdtrain.py`` beside its weights: ``AutoModelForMaskedLM`` (diffusion) or
  ``AutoModelForCausalLM`` (ar) loads it with ``trust_remote_code=True``, as MDLM's published models load.

Always written: ``config.json``, ``model.safetensors`` (fp32, EMA weights unless ``--no-ema``),
``tokenizer.json`` + ``tokenizer_config.json`` (``AutoTokenizer.from_pretrained(DIR)``, same ids). GenMD4's learned
schedule goes to ``objective.safetensors``. No file needs unpickling.
"""
from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import save_file

from mdtrain.configtools import share_like_open, to_dict

REMOTE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "remote")
REMOTE_FILES = ("configuration_mdtrain.py", "modeling_mdtrain.py")


def native_family(cfg) -> str | None:
    """The transformers architecture an AR Llama-family model is exactly, or None."""
    if cfg.model.name != "llama" or cfg.objective.name != "ar" or cfg.model.llama.attention != "causal":
        return None
    s = cfg.model.llama
    if s.positions == "learned":
        gpt2 = (s.norm == "layernorm" and s.mlp in ("gelu_tanh", "gelu") and s.qkv_bias and s.out_bias and s.mlp_bias
                and (s.n_kv_heads or cfg.model.n_heads) == cfg.model.n_heads and not s.head_dim)
        return "gpt2" if gpt2 else None
    if s.norm != "rmsnorm" or s.mlp != "swiglu":
        return None
    if s.qkv_bias and not s.out_bias and not s.mlp_bias:
        return "qwen2"
    return "llama" if s.qkv_bias == s.out_bias else None


def _unfuse(w: torch.Tensor, n_kv: int, group: int):
    rest = w.shape[1:]
    w = w.reshape(n_kv, group + 2, -1, *rest)
    q = w[:, :group].reshape(-1, *rest)
    return q, w[:, group].reshape(-1, *rest), w[:, group + 1].reshape(-1, *rest)


def _native(cfg, m, spec, state: dict, vocab: int, tok) -> tuple[dict, dict]:
    """(config.json, weights) of the native transformers model; ``m`` the resolved model dims."""
    family = native_family(cfg)
    n_kv, hd = spec.n_kv_heads, spec.head_dim
    group = m.n_heads // n_kv
    shift = lambda i: i - 1 if tok.mask_id >= tok.base_size and i > tok.mask_id else i  # noqa: E731 (mask dropped)
    specials = {"bos_token_id": shift(tok.bos_id), "eos_token_id": shift(tok.eos_id), "pad_token_id": shift(tok.pad_id)}
    out = {}
    if family == "gpt2":
        config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab,
                  "n_embd": m.d_model, "n_layer": m.n_layers, "n_head": m.n_heads, "n_positions": spec.max_positions,
                  "n_inner": spec.ffn_hidden, "activation_function": "gelu_new" if spec.mlp == "gelu_tanh" else "gelu",
                  "layer_norm_epsilon": spec.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                  "tie_word_embeddings": spec.tie_embeddings}
        p = "transformer."
        out[f"{p}wte.weight"] = state["embed.weight"]
        out[f"{p}wpe.weight"] = state["pos_embed.weight"]
        for i in range(m.n_layers):
            b, t = f"{p}h.{i}.", f"blocks.{i}."
            for norm, mine in (("ln_1", "norm1"), ("ln_2", "norm2")):
                out[f"{b}{norm}.weight"], out[f"{b}{norm}.bias"] = state[f"{t}{mine}.weight"], state[f"{t}{mine}.bias"]
            out[f"{b}attn.c_attn.weight"] = torch.cat(_unfuse(state[f"{t}attn.qkv.weight"], n_kv, group)).t()
            out[f"{b}attn.c_attn.bias"] = torch.cat(_unfuse(state[f"{t}attn.qkv.bias"], n_kv, group))
            out[f"{b}attn.c_proj.weight"] = state[f"{t}attn.out.weight"].t()
            out[f"{b}attn.c_proj.bias"] = state[f"{t}attn.out.bias"]
            out[f"{b}mlp.c_fc.weight"] = state[f"{t}mlp.fc1.weight"].t()
            out[f"{b}mlp.c_fc.bias"] = state[f"{t}mlp.fc1.bias"]
            out[f"{b}mlp.c_proj.weight"] = state[f"{t}mlp.fc2.weight"].t()
            out[f"{b}mlp.c_proj.bias"] = state[f"{t}mlp.fc2.bias"]
        out[f"{p}ln_f.weight"], out[f"{p}ln_f.bias"] = state["final_norm.weight"], state["final_norm.bias"]
    else:
        rope = {"rope_type": "default", **spec.rope_scaling, "rope_theta": spec.rope_theta}
        config = {"architectures": ["Qwen2ForCausalLM" if family == "qwen2" else "LlamaForCausalLM"],
                  "model_type": family, "vocab_size": vocab, "hidden_size": m.d_model,
                  "intermediate_size": spec.ffn_hidden, "num_hidden_layers": m.n_layers,
                  "num_attention_heads": m.n_heads, "num_key_value_heads": n_kv, "head_dim": hd,
                  "hidden_act": "silu", "max_position_embeddings": spec.max_positions or cfg.data.seq_len,
                  "rms_norm_eps": spec.norm_eps, "rope_parameters": rope,
                  # transformers 4 reads these two instead of rope_parameters
                  "rope_theta": spec.rope_theta, "rope_scaling": dict(spec.rope_scaling) or None,
                  "tie_word_embeddings": spec.tie_embeddings, "attention_dropout": 0.0}
        if family == "llama":
            config.update(attention_bias=spec.qkv_bias, mlp_bias=spec.mlp_bias)
        else:
            config.update(use_sliding_window=False, sliding_window=None)
        p = "model."
        out[f"{p}embed_tokens.weight"] = state["embed.weight"]
        for i in range(m.n_layers):
            b, t = f"{p}layers.{i}.", f"blocks.{i}."
            out[f"{b}input_layernorm.weight"] = state[f"{t}norm1.weight"]
            out[f"{b}post_attention_layernorm.weight"] = state[f"{t}norm2.weight"]
            for x, w in zip("qkv", _unfuse(state[f"{t}attn.qkv.weight"], n_kv, group)):
                out[f"{b}self_attn.{x}_proj.weight"] = w
            if spec.qkv_bias:
                for x, w in zip("qkv", _unfuse(state[f"{t}attn.qkv.bias"], n_kv, group)):
                    out[f"{b}self_attn.{x}_proj.bias"] = w
            out[f"{b}self_attn.o_proj.weight"] = state[f"{t}attn.out.weight"]
            if spec.out_bias:
                out[f"{b}self_attn.o_proj.bias"] = state[f"{t}attn.out.bias"]
            for mine, theirs in (("fc1", "up_proj"), ("gate", "gate_proj"), ("fc2", "down_proj")):
                out[f"{b}mlp.{theirs}.weight"] = state[f"{t}mlp.{mine}.weight"]
                if spec.mlp_bias:
                    out[f"{b}mlp.{theirs}.bias"] = state[f"{t}mlp.{mine}.bias"]
        out[f"{p}norm.weight"] = state["final_norm.weight"]
    if not spec.tie_embeddings:
        out["lm_head.weight"] = state["head.weight"]
    config.update(specials, torch_dtype="float32")
    return config, out


def _cond_kind(cfg) -> str:
    from mdtrain.objectives.config import resolve_objective
    if cfg.objective.name == "ar" or not resolve_objective(cfg.objective)["time_conditioning"]:
        return "none (timesteps are ignored; pass nothing)"
    return "t" if cfg.objective.name in ("md4", "genmd4") else "sigma(t) = -log(alpha(t))"


def _which_weights(source: str, cfg, use_ema: bool) -> str:
    from mdtrain.exported import is_export_dir
    if is_export_dir(source):
        info = os.path.join(source, "import.json")
        if os.path.isfile(info):
            with open(info) as fh:
                return f"imported ({json.load(fh).get('weights', 'as stored')})"
        return "as stored in the export"
    return "ema" if use_ema and cfg.train.ema > 0 else "raw"


def _remote(cfg, m, spec, state: dict, vocab: int, tok, source: str, use_ema: bool) -> tuple[dict, dict]:
    causal = cfg.objective.name == "ar"
    arch = "MdtrainForCausalLM" if causal else "MdtrainForMaskedLM"
    llama = {}
    if m.name == "llama":
        llama = {k: v for k, v in spec._asdict().items() if k not in ("anneal_steps", "init_std")}
        llama["attention"] = "causal" if spec.attention == "causal" else "bidirectional"
    config = {"architectures": [arch], "model_type": "mdtrain",
              "auto_map": {"AutoConfig": "configuration_mdtrain.MdtrainConfig",
                           "AutoModelForMaskedLM": "modeling_mdtrain.MdtrainForMaskedLM",
                           "AutoModelForCausalLM": "modeling_mdtrain.MdtrainForCausalLM"},
              "backbone": m.name, "vocab_size": vocab, "d_model": m.d_model, "n_layers": m.n_layers,
              "n_heads": m.n_heads, "cond_dim": m.cond_dim, "variant": m.variant.name, "llama": llama,
              "mask_token_id": tok.mask_id, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
              "pad_token_id": tok.pad_id, "torch_dtype": "float32",
              "mdtrain": {"objective": to_dict(cfg.objective), "cond": _cond_kind(cfg), "seq_len": cfg.data.seq_len,
                          "source": os.path.abspath(source), "weights": _which_weights(source, cfg, use_ema)}}
    return config, dict(state)


def export_hf(path: str, out: str, use_ema: bool = True) -> dict:
    """Write the Hugging Face directory ``out`` for the run / checkpoint / export ``path``; returns a summary."""
    from mdtrain.interop.tokenizer import write_hf_tokenizer
    from mdtrain.models.flavors import resolve
    from mdtrain.inference import load_for_inference

    bundle = load_for_inference(path, use_ema=use_ema)
    cfg, tok = bundle.cfg, bundle.tokenizer
    if cfg.model.name == "dimamba":
        raise ValueError(f"{path}: model.name=dimamba has no Hugging Face export (its scan is not in the remote "
                         "code); use `mdtrain export` (mdtrain's own format)")
    dims = resolve(cfg.model)  # the flavor's sizes with the overrides
    state = {k: v.detach().to(torch.float32).cpu().contiguous() for k, v in bundle.model.state_dict().items()}
    extra = {k: state.pop(k) for k in list(state) if k.startswith("objective.")}
    spec = bundle.model.spec if cfg.model.name == "llama" else None
    vocab = tok.vocab_size
    family = native_family(cfg)
    drop_mask = bool(family) and tok.mask_id >= tok.base_size
    if drop_mask:  # the ar objective never gives the mask probability: without its row HF's softmax is mdtrain's
        vocab -= 1
        m = tok.mask_id
        for k in ("embed.weight", "head.weight"):
            if k in state:
                state[k] = torch.cat([state[k][:m], state[k][m + 1:]]).contiguous()
    if family:
        config, weights = _native(cfg, dims, spec, state, vocab, tok)
    else:
        config, weights = _remote(cfg, dims, spec, state, vocab, tok, path, use_ema)
    os.makedirs(out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(out, "model.safetensors"),
              metadata={"format": "pt"})
    share_like_open(os.path.join(out, "model.safetensors"))  # safetensors writes 0600
    if extra:
        save_file(extra, os.path.join(out, "objective.safetensors"), metadata={"format": "mdtrain-objective"})
        share_like_open(os.path.join(out, "objective.safetensors"))
    if not family:
        for name in REMOTE_FILES:
            shutil.copyfile(os.path.join(REMOTE_DIR, name), os.path.join(out, name))
    with open(os.path.join(out, "config.json"), "w") as fh:
        json.dump(config, fh, indent=1)
    write_hf_tokenizer(tok, out, cfg.data.seq_len, drop_mask=drop_mask)
    return {"hf_export": os.path.abspath(out), "architecture": config["architectures"][0],
            "remote_code": not family, "vocab_size": vocab, "mask_token_id": None if drop_mask else tok.mask_id}


def export_hf_main(args) -> int:
    print(json.dumps(export_hf(args.path, args.out, use_ema=not args.no_ema)))
    return 0
