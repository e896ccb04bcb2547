"""Samplers: ``sample(objective, model_fn, batch_size, seq_len, steps, generator, sampler, **options)``.

Exact for an exact denoiser (they reproduce p_θ as steps grow, or at any step count for first_hitting):
- ``ddpm``: exact absorbing posterior, one network call per step (MDLM ``_ddpm_update``); uniform grid from 1
  to 1e-5, greedy noise removal.
- ``ddpm_cache``: ddpm, re-running the network only for the sequences that changed (exact without time
  conditioning; with it, one evaluation per step like ddpm).
- ``ancestral``: MD4's sampler, ddpm on MD4's cosine grid down to t = 0.
- ``analytic``: SEDD τ-leaping (sedd and every scalar-schedule objective); ancestral noise removal.
- ``first_hitting``: Zheng et al.'s first-hitting sampler, one call per revealed token (``tokens_per_call``).
- ``remdm``: ddpm with ReMDM remasking (``remdm_schedule`` cap / rescale / conf / loop, strength ``remdm_eta``).
Heuristics that trade fidelity for calls: ``llada`` (low-confidence remasking in blocks), ``fast_dllm``
(confidence threshold in blocks, optional approximate prefix KV cache).
- ``ar``: left to right, through the model's KV cache (``decode_step``) when it has one; ``steps`` unused.
- ``auto``: ar for the ar objective, else ddpm_cache.
- bd3lm: ddpm / ddpm_cache run block by block with an exact KV cache, to any length, stopping at ``eos_id``
  (``samplers/bd3lm.py``); ``steps`` per block.

Every masked sampler takes a template (``prefix``/``template``: given tokens, mask_id where free; given tokens
never change), semi-autoregressive strides and classifier-free ``guidance`` with the template's given tokens as
the condition. Returns ``(tokens LongTensor (B, seq_len + num_strides·stride_length), info)`` with
``info["nfe"]`` (network evaluations; a guided call counts 2), ``info["nfe_per_sample"]`` (evaluations of each
sequence) and the settings used. Every draw comes from ``generator`` (categoricals in float64), so a seed
reproduces the samples.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch

from mdtrain.objectives.samplers.ar import sample_ar
from mdtrain.objectives.samplers.common import Net, Stats
from mdtrain.objectives.samplers.confidence import REMASKING, denoise_confidence
from mdtrain.objectives.samplers.first_hitting import check_first_hitting, denoise_first_hitting
from mdtrain.objectives.samplers.masked import denoise_window, sample_windows, time_grid
from mdtrain.objectives.samplers.remdm import DEFAULT_ETA, check_remdm, denoise_remdm

SAMPLERS = ("ddpm", "ddpm_cache", "ancestral", "analytic", "first_hitting", "remdm", "llada", "fast_dllm", "ar")
_GRID = ("ddpm", "ddpm_cache", "ancestral", "analytic", "remdm")
_MASKED = _GRID + ("first_hitting", "llada", "fast_dllm")
# which samplers read each option (a non-default value for a sampler that ignores it is an error)
USES = {
    "noise_removal": _GRID + ("first_hitting",), "grid": _GRID, "t_min": _GRID + ("first_hitting",),
    "stride_length": _MASKED, "num_strides": _MASKED, "guidance": _MASKED, "tokens_per_call": ("first_hitting",),
    "remdm_schedule": ("remdm",), "remdm_eta": ("remdm",), "remdm_t_on": ("remdm",), "remdm_t_off": ("remdm",),
    "remdm_alpha_on": ("remdm",), "block_length": ("llada", "fast_dllm"), "remasking": ("llada", "fast_dllm"),
    "temperature": ("llada", "fast_dllm"), "threshold": ("fast_dllm",), "prefix_cache": ("llada", "fast_dllm"),
}


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
           bos_id: Optional[int] = None, eos_id: Optional[int] = None, device=None, guidance: float = 0.0,
           tokens_per_call: int = 1, remdm_schedule: str = "cap", remdm_eta: Optional[float] = None,
           remdm_t_on: float = 0.55, remdm_t_off: float = 0.05, remdm_alpha_on: float = 0.9, block_length: int = 0,
           remasking: str = "low_confidence", temperature: float = 0.0, threshold: float = 0.9,
           prefix_cache: bool = False):
    """Generate ``batch_size`` sequences of the model length ``seq_len`` (longer with semi-AR strides).

    Options (each read by the samplers listed in ``USES``; `mdtrain sample`'s ``sample.*`` keys document them):
    ``top_p`` nucleus; ``noise_removal`` greedy / ancestral / none for masks left at the end; ``grid`` uniform /
    cosine and ``t_min`` for the time grid; ``stride_length`` S and ``num_strides`` K for semi-autoregressive
    generation of seq_len + K·S tokens; ``prefix`` (alias ``template``): a LongTensor (B or 1, ≤ output length)
    of given tokens with mask_id where free (prefix, infill) — given tokens never change; ``bos_id``: first token
    for ar (and bd3lm, and a shifted model) without a prefix; ``eos_id``: bd3lm stops a sequence at its first
    generated EOS (``info["lengths"]``); ``device``: where tokens live (default: the prefix's, else
    ``model_fn.device`` if set, else the generator's); ``guidance``: classifier-free guidance scale w (0 = off);
    ``tokens_per_call`` (first_hitting); ``remdm_*`` (remdm); ``block_length``, ``remasking``, ``temperature``,
    ``prefix_cache`` (llada, fast_dllm); ``threshold`` (fast_dllm).
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
    given = dict(noise_removal=noise_removal, grid=grid, t_min=t_min, stride_length=stride_length,
                 num_strides=num_strides, guidance=guidance, tokens_per_call=tokens_per_call,
                 remdm_schedule=remdm_schedule, remdm_eta=remdm_eta, remdm_t_on=remdm_t_on, remdm_t_off=remdm_t_off,
                 remdm_alpha_on=remdm_alpha_on, block_length=block_length, remasking=remasking,
                 temperature=temperature, threshold=threshold, prefix_cache=prefix_cache)
    _check_unused(sampler, given)
    stats = Stats(batch_size, torch.device(device))
    info = {"sampler": sampler, "steps": steps, "top_p": top_p}

    if getattr(objective, "block_size", 0):  # bd3lm
        from mdtrain.objectives.samplers.bd3lm import sample_blocks
        if sampler not in ("ddpm", "ddpm_cache"):
            raise ValueError(f"bd3lm samples block by block with ddpm or ddpm_cache, not '{sampler}'")
        if guidance or grid != "auto":
            raise ValueError("bd3lm's block sampler takes no guidance and no grid (each block runs its own uniform "
                             "grid of `steps`)")
        x = _template(objective, prefix, batch_size, seq_len + num_strides * stride_length, device)
        if bos_id is not None:
            x[:, 0] = torch.where(x[:, 0] == objective.mask_id, bos_id, x[:, 0])
        tokens, lengths, extra = sample_blocks(
            objective, model_fn, x, seq_len, steps, generator, reuse_logits=sampler == "ddpm_cache", top_p=top_p,
            t_min=1e-5 if t_min is None else t_min, eos_id=eos_id, stats=stats,
            noise_removal="greedy" if noise_removal == "auto" else noise_removal)
        info.update(extra, lengths=lengths, nfe=stats.nfe, nfe_per_sample=stats.per_sample)
        return tokens, info
    if sampler == "ar":
        if stride_length or num_strides:
            raise ValueError("semi-autoregressive strides apply to the masked samplers, not ar")
        x = _template(objective, prefix, batch_size, seq_len, device)
        if bos_id is not None:
            x[:, 0] = torch.where(x[:, 0] == objective.mask_id, bos_id, x[:, 0])
        tokens = sample_ar(objective, model_fn, x, generator, top_p=top_p, stats=stats)
        info.update(nfe=stats.nfe, nfe_per_sample=stats.per_sample)
        return tokens, info

    if steps < 1 and sampler not in ("first_hitting", "fast_dllm"):
        raise ValueError(f"steps must be >= 1, got {steps}")
    if (stride_length > 0) != (num_strides > 0) or not 0 <= stride_length <= seq_len:
        raise ValueError(f"semi-AR needs 0 < stride_length <= seq_len and num_strides > 0 (got stride_length="
                         f"{stride_length}, num_strides={num_strides}, seq_len={seq_len})")
    if guidance < 0:
        raise ValueError(f"guidance must be >= 0 (0 = off), got {guidance}")
    x = _template(objective, prefix, batch_size, seq_len + num_strides * stride_length, device)
    if objective.first_target:  # shifted parameterisation: the context positions are predicted by no one
        if bos_id is not None:
            x[:, 0] = torch.where(x[:, 0] == objective.mask_id, bos_id, x[:, 0])
        if (x[:, :objective.first_target] == objective.mask_id).any():
            raise ValueError(f"objective '{objective.name}' with objective.shift=true predicts each token from "
                             "the one before: give the first token (a prefix, or bos_id=)")
    if guidance and not (x != objective.mask_id).any():
        raise ValueError("guidance needs a condition: give a prefix or an infill template (its given tokens are "
                         "masked in the unconditional pass)")
    net = Net(objective, model_fn, stats, guidance)
    denoise = _denoiser(sampler, objective, net, steps, generator, info, top_p=top_p, noise_removal=noise_removal,
                        grid=grid, t_min=t_min, tokens_per_call=tokens_per_call, remdm_schedule=remdm_schedule,
                        remdm_eta=remdm_eta, remdm_t_on=remdm_t_on, remdm_t_off=remdm_t_off,
                        remdm_alpha_on=remdm_alpha_on, block_length=block_length, remasking=remasking,
                        temperature=temperature, threshold=threshold, prefix_cache=prefix_cache)
    if guidance:
        info["guidance"] = guidance
    tokens = sample_windows(net, x, seq_len, stride_length, num_strides, denoise)
    info.update(nfe=stats.nfe, nfe_per_sample=stats.per_sample)
    return tokens, info


def _check_unused(sampler: str, given: dict) -> None:
    defaults = {k: p.default for k, p in inspect.signature(sample).parameters.items() if k in USES}
    unused = [k for k, v in given.items() if v != defaults[k] and sampler not in USES[k]]
    if unused:
        users = "; ".join(f"{k}: {', '.join(USES[k])}" for k in unused)
        raise ValueError(f"sampler '{sampler}' does not use {', '.join(unused)} (used by {users})")


def _denoiser(sampler, objective, net, steps, generator, info, *, top_p, noise_removal, grid, t_min,
              tokens_per_call, remdm_schedule, remdm_eta, remdm_t_on, remdm_t_off, remdm_alpha_on, block_length,
              remasking, temperature, threshold, prefix_cache):
    """The function that fills one window for ``sampler``, after checking its options; records them in info."""
    if sampler in _GRID + ("first_hitting",):
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
        if not 0 <= t_min < 1:
            raise ValueError(f"t_min must be in [0, 1), got {t_min}")
        info.update(t_min=t_min, noise_removal=noise_removal)
    if sampler == "first_hitting":
        check_first_hitting(objective)
        if tokens_per_call < 1:
            raise ValueError(f"tokens_per_call must be >= 1, got {tokens_per_call}")
        info.update(tokens_per_call=tokens_per_call)
        return lambda x: denoise_first_hitting(objective, net, x, generator, group=tokens_per_call, t_min=t_min,
                                               top_p=top_p, noise_removal=noise_removal)
    if sampler in _GRID:
        info.update(grid=grid)
        times = time_grid(steps, t_min, grid)
    if sampler == "remdm":
        eta = DEFAULT_ETA.get(remdm_schedule, 0.0) if remdm_eta is None else remdm_eta
        check_remdm(objective, remdm_schedule, eta, remdm_t_on, remdm_t_off, remdm_alpha_on)
        info.update(remdm_schedule=remdm_schedule, remdm_eta=eta)
        if remdm_schedule == "loop":
            info.update(remdm_t_on=remdm_t_on, remdm_t_off=remdm_t_off, remdm_alpha_on=remdm_alpha_on)
        return lambda x: denoise_remdm(objective, net, x, times, generator, schedule=remdm_schedule, eta=eta,
                                       t_on=remdm_t_on, t_off=remdm_t_off, alpha_on=remdm_alpha_on, top_p=top_p,
                                       noise_removal=noise_removal)
    if sampler in _GRID:
        rule = "analytic" if sampler == "analytic" else "ddpm"
        return lambda x: denoise_window(objective, net, x, times, generator, rule=rule,
                                        cached=sampler == "ddpm_cache", top_p=top_p, noise_removal=noise_removal)
    # llada / fast_dllm
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {', '.join(REMASKING)}, got {remasking!r}")
    if block_length < 0 or temperature < 0 or not 0 < threshold <= 1:
        raise ValueError(f"need block_length >= 0 (0 = one block), temperature >= 0 and 0 < threshold <= 1 (got "
                         f"{block_length}, {temperature}, {threshold})")
    if prefix_cache and objective.first_target:
        raise ValueError(f"prefix_cache does not combine with objective '{objective.name}' with objective.shift=true "
                         "(a block's first logits come from the cached position before it)")
    if prefix_cache and net.w:
        raise ValueError("prefix_cache does not combine with guidance (the unconditional pass would need its own "
                         "cache); drop one of them")
    info.update(block_length=block_length, remasking=remasking, temperature=temperature,
                prefix_cache=prefix_cache)
    if sampler == "fast_dllm":
        info["threshold"] = threshold
    return lambda x: denoise_confidence(objective, net, x, generator, rule=sampler, steps=steps,
                                        block_length=block_length, remasking=remasking, temperature=temperature,
                                        threshold=threshold, top_p=top_p, prefix_cache=prefix_cache)
