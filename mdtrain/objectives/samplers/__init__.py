"""Samplers: ``sample(objective, model_fn, batch_size, seq_len, steps, generator, sampler, **options)``.

- ``ddpm``: exact absorbing posterior, one network call per step (MDLM ``_ddpm_update``); uniform grid from 1
  to 1e-5, greedy noise removal.
- ``ddpm_cache``: ddpm, re-running the network only for the sequences that changed (exact without time
  conditioning; with it, one evaluation per step like ddpm).
- ``ancestral``: MD4's sampler, ddpm on MD4's cosine grid down to t = 0.
- ``analytic``: SEDD τ-leaping (sedd and every scalar-schedule objective); ancestral noise removal.
- ``ar``: left to right, through the model's KV cache (``decode_step``) when it has one; ``steps`` unused.
- ``auto``: ar for the ar objective, else ddpm_cache.
- bd3lm: ddpm / ddpm_cache run block by block with an exact KV cache, to any length, stopping at ``eos_id``
  (``samplers/bd3lm.py``); ``steps`` per block.

Returns ``(tokens LongTensor (B, seq_len + num_strides·stride_length), info)`` with ``info["nfe"]`` (network calls),
``info["nfe_per_sample"]`` (network evaluations of each sequence) and the settings used. Every draw comes from
``generator`` (categoricals in float64), so a seed reproduces the samples.
"""
from __future__ import annotations

from typing import Optional

import torch

from mdtrain.objectives.samplers.ar import sample_ar
from mdtrain.objectives.samplers.masked import Stats, sample_masked

SAMPLERS = ("ddpm", "ddpm_cache", "ancestral", "analytic", "ar")


def _template(objective, prefix, batch_size, length, device) -> torch.Tensor:
    x = torch.full((batch_size, length), objective.mask_id, dtype=torch.long, device=device)
    if prefix is None:
        return x
    prefix = torch.as_tensor(prefix, dtype=torch.long, device=device)
    if prefix.dim() == 1:
        prefix = prefix[None]
    if prefix.shape[0] == 1:
        prefix = prefix.expand(batch_size, -1)
    if prefix.shape[0] != batch_size or prefix.shape[1] > length:
        raise ValueError(f"prefix of shape {tuple(prefix.shape)} does not fit batch_size={batch_size} and the "
                         f"output length {length}")
    x[:, :prefix.shape[1]] = prefix
    return x


@torch.no_grad()
def sample(objective, model_fn, batch_size: int, seq_len: int, steps: int,
           generator: Optional[torch.Generator] = None, sampler: str = "ddpm_cache", *, top_p: float = 1.0,
           noise_removal: str = "auto", grid: str = "auto", t_min: Optional[float] = None, stride_length: int = 0,
           num_strides: int = 0, prefix: Optional[torch.Tensor] = None, template: Optional[torch.Tensor] = None,
           bos_id: Optional[int] = None, eos_id: Optional[int] = None, device=None):
    """Generate ``batch_size`` sequences of the model length ``seq_len`` (longer with semi-AR strides).

    Options: ``top_p`` nucleus; ``noise_removal`` greedy / ancestral / none for masks left at the end;
    ``grid`` uniform / cosine and ``t_min`` for the time grid; ``stride_length`` S and ``num_strides`` K for
    semi-autoregressive generation of seq_len + K·S tokens; ``prefix`` (alias ``template``): a LongTensor
    (B or 1, ≤ output length) of given tokens with mask_id where free (prefix, infill) — given tokens never change;
    ``bos_id``: first token for ar (and bd3lm) without a prefix; ``eos_id``: bd3lm stops a sequence at its first
    generated EOS (``info["lengths"]``); ``device``: where tokens live (default: the prefix's, else
    ``model_fn.device`` if set, else the generator's).
    """
    if prefix is not None and template is not None:
        raise ValueError("pass prefix= or its alias template=, not both")
    prefix = template if prefix is None else prefix
    if device is None:
        device = (prefix.device if torch.is_tensor(prefix) else getattr(model_fn, "device", None)
                  or (generator.device if generator is not None else "cpu"))
    if sampler == "auto" or (objective.causal and sampler == "ddpm_cache"):  # the signature's default
        sampler = "ar" if objective.causal else "ddpm_cache"
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler '{sampler}'; choose one of auto, {', '.join(SAMPLERS)}")
    if (sampler == "ar") != objective.causal:
        raise ValueError(f"sampler '{sampler}' does not fit objective '{objective.name}' (ar goes with ar only)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    stats = Stats(batch_size, torch.device(device))
    info = {"sampler": sampler, "steps": steps, "top_p": top_p}

    if getattr(objective, "block_size", 0):  # bd3lm
        from mdtrain.objectives.samplers.bd3lm import sample_blocks
        if sampler not in ("ddpm", "ddpm_cache"):
            raise ValueError(f"bd3lm samples block by block with ddpm or ddpm_cache, not '{sampler}'")
        x = _template(objective, prefix, batch_size, seq_len + num_strides * stride_length, device)
        if bos_id is not None:
            x[:, 0] = torch.where(x[:, 0] == objective.mask_id, bos_id, x[:, 0])
        tokens, lengths, extra = sample_blocks(
            objective, model_fn, x, seq_len, steps, generator, reuse_logits=sampler == "ddpm_cache", top_p=top_p,
            t_min=1e-5 if t_min is None else t_min, eos_id=eos_id, stats=stats,
            noise_removal="greedy" if noise_removal == "auto" else noise_removal)
        info.update(extra, lengths=lengths)
    elif sampler == "ar":
        if stride_length or num_strides:
            raise ValueError("semi-autoregressive strides apply to the masked samplers, not ar")
        x = _template(objective, prefix, batch_size, seq_len, device)
        if bos_id is not None:
            x[:, 0] = torch.where(x[:, 0] == objective.mask_id, bos_id, x[:, 0])
        tokens = sample_ar(objective, model_fn, x, generator, top_p=top_p, stats=stats)
    else:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if (stride_length > 0) != (num_strides > 0) or not 0 <= stride_length <= seq_len:
            raise ValueError(f"semi-AR needs 0 < stride_length <= seq_len and num_strides > 0 (got stride_length="
                             f"{stride_length}, num_strides={num_strides}, seq_len={seq_len})")
        if sampler == "analytic" and not hasattr(objective.schedule, "sigma"):
            raise ValueError(f"the analytic sampler needs σ(t); objective '{objective.name}' has a per-token "
                             "schedule: use ddpm, ddpm_cache or ancestral")
        grid = grid if grid != "auto" else ("cosine" if sampler == "ancestral" else "uniform")
        t_min = t_min if t_min is not None else (0.0 if sampler == "ancestral" else 1e-5)
        if noise_removal == "auto":
            noise_removal = "ancestral" if sampler == "analytic" else "greedy"
        if noise_removal not in ("greedy", "ancestral", "none") or grid not in ("uniform", "cosine"):
            raise ValueError(f"noise_removal must be greedy/ancestral/none and grid uniform/cosine, got "
                             f"{noise_removal!r}, {grid!r}")
        info.update(grid=grid, t_min=t_min, noise_removal=noise_removal)
        x = _template(objective, prefix, batch_size, seq_len + num_strides * stride_length, device)
        if objective.first_target:  # shifted parameterisation: the context positions are predicted by no one
            if bos_id is not None:
                x[:, 0] = torch.where(x[:, 0] == objective.mask_id, bos_id, x[:, 0])
            if (x[:, :objective.first_target] == objective.mask_id).any():
                raise ValueError(f"objective '{objective.name}' with objective.shift=true predicts each token from "
                                 "the one before: give the first token (a prefix, or bos_id=)")
        tokens = sample_masked(objective, model_fn, x, seq_len, steps, generator,
                               rule="analytic" if sampler == "analytic" else "ddpm", cached=sampler == "ddpm_cache",
                               grid=grid, t_min=t_min, top_p=top_p, noise_removal=noise_removal,
                               stride_length=stride_length, num_strides=num_strides, stats=stats)
    info.update(nfe=stats.nfe, nfe_per_sample=stats.per_sample)
    return tokens, info
