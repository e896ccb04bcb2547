"""The consolidated export format, loadable without the trainer.

An export directory holds ``model.safetensors`` (fp32 weights under the single-device model's names),
``config.yaml`` (the full resolved training config) and ``tokenizer/``. To use one in your own code::

    from mdtrain.exported import load_exported
    bundle = load_exported("exports/owt-mdlm")          # model (eval mode), objective, tokenizer, cfg
    logits = bundle.model(x, cond)                       # x: LongTensor[B, L]
    tokens, info = bundle.sample(num_samples=4, steps=128)

Loading reads safetensors and YAML only: nothing pickled is ever executed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from mdtrain.configtools import atomic_write_text, dump_yaml, share_like_open
from mdtrain.objectives.protocol import make_model_fn


@dataclass
class Bundle:
    """A model ready for inference, with what is needed to use it."""
    model: torch.nn.Module
    objective: Any
    tokenizer: Any
    cfg: Any

    def model_fn(self):
        return make_model_fn(self.model)

    def sample(self, num_samples: int = 1, steps: int = None, seed: int = 0, **options):
        from mdtrain.objectives.samplers import sample
        scfg = self.cfg.sample
        gen = torch.Generator().manual_seed(seed)
        return sample(self.objective, make_model_fn(self.model), num_samples, self.cfg.data.seq_len,
                      steps or scfg.steps, gen, sampler=options.pop("sampler", scfg.sampler), **options)


def save_exported(out_dir: str, state_dict: dict, cfg, tokenizer) -> None:
    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: v.detach().to(torch.float32).contiguous().cpu() if v.is_floating_point() else v.contiguous().cpu()
               for k, v in state_dict.items()}
    tmp = os.path.join(out_dir, ".model.safetensors.tmp")
    save_file(tensors, tmp, metadata={"format": "mdtrain-export-v1"})
    share_like_open(tmp)  # safetensors writes 0600
    os.replace(tmp, os.path.join(out_dir, "model.safetensors"))
    atomic_write_text(os.path.join(out_dir, "config.yaml"), dump_yaml(cfg))
    tok_dir = os.path.join(out_dir, "tokenizer")
    if tokenizer is not None:
        tokenizer.save(tok_dir)


def is_export_dir(path: str) -> bool:
    return os.path.exists(os.path.join(path, "model.safetensors")) and os.path.exists(os.path.join(path, "config.yaml"))


def load_exported(path: str, device: str = "cpu") -> Bundle:
    from mdtrain.config import config_from_dict
    from mdtrain.data.tokenizers import load_tokenizer
    from mdtrain.modeling import build_objective_and_model

    if not is_export_dir(path):
        raise FileNotFoundError(f"'{path}' is not an mdtrain export (expected model.safetensors and config.yaml)")
    with open(os.path.join(path, "config.yaml")) as fh:
        cfg = config_from_dict(yaml.safe_load(fh))
    tokenizer = load_tokenizer(os.path.join(path, "tokenizer"))
    model, objective = build_objective_and_model(cfg, tokenizer.vocab_size, tokenizer.mask_id, cfg.data.seq_len)
    missing, unexpected = model.load_state_dict(load_file(os.path.join(path, "model.safetensors")), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{path}/model.safetensors does not match model '{cfg.model.name}' "
                           f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.to(device).eval()
    return Bundle(model=model, objective=objective, tokenizer=tokenizer, cfg=cfg)
