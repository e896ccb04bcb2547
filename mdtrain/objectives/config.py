"""The `objective` and `sample` config sections (owned by objectives/).

Fields left at ``None`` / ``"auto"`` take the chosen objective's (or sampler's) own convention, resolved in one
place, :func:`resolve_objective`, so that `mdtrain train --help-config` and the built objective agree.
"""
from __future__ import annotations

import dataclasses

import math
from dataclasses import dataclass
from typing import Optional

from mdtrain.configtools import ConfigError, doc

OBJECTIVE_NAMES = ("mdlm", "md4", "genmd4", "d3pm", "sedd", "ar", "bd3lm")
SAMPLER_NAMES = ("auto", "ddpm", "ddpm_cache", "ancestral", "analytic", "first_hitting", "remdm", "llada", "fast_dllm",
                 "ar")

# Per-objective conventions (MDLM's configs/config.yaml; MD4's and GenMD4's configs/openwebtext.py and Shi et al. 2024,
# §4 and App. F): schedule, sampling_eps (GenMD4: t1), T, time conditioning.
_DEFAULTS = {
    "mdlm": dict(schedule="loglinear", sampling_eps=1e-3, T=0, time_conditioning=False),
    "md4": dict(schedule="md4_linear", sampling_eps=0.0, T=0, time_conditioning=True),
    "genmd4": dict(schedule="genmd4_poly", sampling_eps=1e-3, T=0, time_conditioning=True),
    "d3pm": dict(schedule="loglinear", sampling_eps=1e-3, T=1000, time_conditioning=True),
    "sedd": dict(schedule="loglinear", sampling_eps=1e-3, T=0, time_conditioning=True),
    "ar": dict(schedule="", sampling_eps=0.0, T=0, time_conditioning=False),
    # BD3-LM (Arriola et al. 2025): MDLM's conventions inside each block (bd3lms configs/algo/bd3lm.yaml)
    "bd3lm": dict(schedule="loglinear", sampling_eps=1e-3, T=0, time_conditioning=False),
}


@dataclass
class ObjectiveConfig:
    name: str = doc("mdlm", "training objective", choices=OBJECTIVE_NAMES)
    schedule: str = doc("", "noise schedule; empty = the objective's own (mdlm/d3pm/sedd: loglinear, md4: md4_linear, "
                            "genmd4: its learnable genmd4_poly). MDLM family: loglinear, cosine, cosinesqr, "
                            "linear_sigma, geometric_sigma; MD4 family: md4_linear, md4_cosine, md4_polyK (md4_poly3)")
    schedule_eps: Optional[float] = doc(None, "schedule ε; null = the schedule's own (MDLM family 1e-3, MD4 family "
                                              "and genmd4 1e-4)", ge=0, lt=1)
    sigma_min: Optional[float] = doc(None, "linear_sigma / geometric_sigma: σ(0); null = 1e-3", ge=0)
    sigma_max: Optional[float] = doc(None, "linear_sigma / geometric_sigma: σ(1); null = 7.0 / 1.0", gt=0)
    sampling_eps: Optional[float] = doc(None, "training t = eps + (1-eps)·u; null = the objective's own (mdlm/"
                                              "d3pm/sedd 1e-3, md4 0, genmd4 1e-3 = its t1; its recon term covers "
                                              "[0, t1))", ge=0, lt=1)
    antithetic: bool = doc(True, "stratify u over the batch: u_i = (r_i + i)/B (MDLM/MD4 low-discrepancy t)")
    T: Optional[int] = doc(None, "time steps of the discrete-time NELBO; 0 = continuous time; null = the objective's "
                                 "own (d3pm 1000, others 0)", ge=0)
    time_conditioning: Optional[bool] = doc(None, "feed time to the network (σ(t) for mdlm/d3pm/sedd, t for md4/"
                                                  "genmd4); null = the objective's own (mdlm off, others on)")
    importance_sampling: bool = doc(False, "mdlm, loglinear/linear_sigma only: log-uniform masking rate in u with "
                                           "the constant weight of the change of variables")
    subs_masking: bool = doc(False, "d3pm only: suppress the mask logit (zero masking probability)")
    genmd4_power_init: float = doc(1.0, "genmd4: initial value of every per-token power w_v (1 = linear schedule)",
                                   gt=0)
    shift: bool = doc(False, "mdlm/md4: shifted parameterisation (Dream, DiffuLLaMA): the network's output at position "
                             "i predicts token i+1, so an AR model's head is reused; position 0 is context (never "
                             "masked, not counted) and sampling needs it given (a prefix or BOS)")
    block_size: int = doc(0, "bd3lm: tokens per block, dividing data.seq_len (1 = the AR likelihood, seq_len = "
                             "MDLM; the paper: 4, 8, 16); 0 for every other objective", ge=0)
    clip: list[float] = doc([], "bd3lm: [beta, omega], training draws each block's t from U[beta, omega] (the "
                                "paper's clipped, variance-reduced schedule, e.g. [0.45, 0.95]); evaluation always "
                                "uses the full interval; [] = U[sampling_eps, 1]", ge=0.0, le=1.0)
    resample: bool = doc(False, "bd3lm with clip: keep every block's masked fraction inside [beta, omega] (the "
                                "reference's training.resample; drawn exactly from the truncated binomial)")
    ignore_bos: bool = doc(True, "bd3lm: the first token of every sequence is context, never masked nor scored "
                                 "(the reference's ignore_bos; with block_size=1 the NELBO is the AR likelihood)")

    def validate(self):
        resolve_objective(self)


def with_conventions(cfg: ObjectiveConfig) -> ObjectiveConfig:
    """A copy of ``cfg`` whose unset schedule, sampling_eps, T and time_conditioning hold the values that will run
    (the objective's conventions): what ``--print-config`` shows. Loading it back trains the same objective."""
    d = resolve_objective(cfg)
    return dataclasses.replace(cfg, **{k: d[k] for k in ("schedule", "sampling_eps", "T", "time_conditioning")})


def resolve_objective(cfg: ObjectiveConfig) -> dict:
    """The objective's settings with every ``None``/empty field replaced by its convention; ConfigError on a bad mix."""
    if cfg.name not in _DEFAULTS:
        raise ConfigError(f"objective.name={cfg.name!r} is not one of {', '.join(OBJECTIVE_NAMES)}")
    d = dict(_DEFAULTS[cfg.name])
    if cfg.schedule:
        d["schedule"] = cfg.schedule
    for key in ("sampling_eps", "T", "time_conditioning"):
        if getattr(cfg, key) is not None:
            d[key] = getattr(cfg, key)
    d.update(name=cfg.name, schedule_eps=cfg.schedule_eps, sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max,
             antithetic=cfg.antithetic, importance_sampling=cfg.importance_sampling, subs_masking=cfg.subs_masking,
             genmd4_power_init=cfg.genmd4_power_init, shift=cfg.shift, block_size=cfg.block_size,
             clip=list(cfg.clip), resample=cfg.resample, ignore_bos=cfg.ignore_bos)
    name, sched = cfg.name, d["schedule"]

    def bad(msg):
        return ConfigError(f"objective.name={name}: {msg}")

    _check_block_diffusion(cfg, bad)
    if name == "ar":
        if cfg.schedule or cfg.T or cfg.time_conditioning or cfg.importance_sampling:
            raise bad("ar has no schedule, time steps or time conditioning; leave objective.schedule, T, "
                      "time_conditioning and importance_sampling unset")
        return d
    if name == "genmd4":
        if sched != "genmd4_poly":
            raise bad(f"genmd4 learns its own per-token polynomial schedule; objective.schedule={sched!r} must be "
                      "empty or genmd4_poly")
        if cfg.sigma_min is not None or cfg.sigma_max is not None:
            raise bad("genmd4 takes no sigma_min/sigma_max")
        if cfg.genmd4_power_init <= 0:
            raise bad(f"objective.genmd4_power_init must be > 0, got {cfg.genmd4_power_init}")
    else:
        from mdtrain.objectives.schedules import build_schedule
        try:
            build_schedule(sched, eps=cfg.schedule_eps, sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max)
        except ValueError as e:
            raise bad(f"objective.schedule: {e}") from None
    if d["T"] < 0:
        raise bad(f"objective.T must be >= 0, got {d['T']}")
    if not 0 <= d["sampling_eps"] < 1:
        raise bad(f"objective.sampling_eps must be in [0, 1), got {d['sampling_eps']}")
    if name == "genmd4" and d["sampling_eps"] <= 0:
        raise bad("genmd4 needs objective.sampling_eps (its t1) > 0: its weight −w/t is not integrable at 0")
    if d["T"] > 0 and name in ("sedd", "genmd4"):
        raise bad(f"{name} is continuous-time only; set objective.T=0")
    if name == "d3pm" and d["T"] == 0:
        raise bad("d3pm is discrete-time: set objective.T > 0 (MDLM uses 1000)")
    if name == "sedd" and not d["time_conditioning"]:
        raise bad("sedd's log-score parameterisation needs σ(t): objective.time_conditioning must be true")
    if cfg.shift and name not in ("mdlm", "md4"):
        raise bad("objective.shift applies to mdlm and md4 only")
    if cfg.subs_masking and name != "d3pm":
        raise bad("objective.subs_masking applies to d3pm only")
    if cfg.importance_sampling:
        if name != "mdlm" or sched not in ("loglinear", "linear_sigma"):
            raise bad("objective.importance_sampling needs objective.name=mdlm with schedule loglinear or "
                      f"linear_sigma (got schedule {sched!r})")
    return d


def _check_block_diffusion(cfg: ObjectiveConfig, bad) -> None:
    if cfg.name != "bd3lm":
        if cfg.block_size or cfg.clip or cfg.resample:
            raise bad("objective.block_size, clip and resample belong to objective.name=bd3lm")
        return
    b = cfg.block_size
    if b < 1:
        raise bad(f"set objective.block_size >= 1 (tokens per block, dividing data.seq_len; the paper uses 4, 8, "
                  f"16), got {b}")
    if cfg.clip:
        if len(cfg.clip) != 2 or not 0 < cfg.clip[0] <= cfg.clip[1] <= 1:
            raise bad(f"objective.clip must be [beta, omega] with 0 < beta <= omega <= 1, got {cfg.clip}")
        if cfg.T:
            raise bad("objective.clip is a continuous-time schedule; set objective.T=0")
    if cfg.resample:
        if not cfg.clip:
            raise bad("objective.resample keeps masked fractions inside objective.clip; set clip=[beta, omega]")
        lo, hi = math.ceil(cfg.clip[0] * b - 1e-9), math.floor(cfg.clip[1] * b + 1e-9)
        if lo > hi:
            raise bad(f"objective.clip={cfg.clip} admits no masked count of a block of {b} tokens "
                      f"(needs ceil(beta*b) <= floor(omega*b)); widen it or turn objective.resample off")


@dataclass
class SampleConfig:
    """`mdtrain sample` and generative evaluation. Every option is read by the samplers named in its doc (a
    non-default value for a sampler that ignores it is an error); README "Sampling" has one command per sampler."""
    sampler: str = doc("auto", "auto (ddpm_cache, or ar for the ar objective), ddpm (exact absorbing posterior), "
                               "ddpm_cache (re-run the network only for sequences that changed), ancestral (MD4, "
                               "cosine grid), analytic (SEDD tau-leaping), first_hitting (Zheng et al.: one call per "
                               "revealed token), remdm (ddpm + ReMDM remasking), llada (low-confidence remasking in "
                               "blocks), fast_dllm (confidence threshold in blocks), ar", choices=SAMPLER_NAMES)
    steps: int = doc(1000, "reverse steps T (ddpm family, remdm); llada: steps over all blocks; ignored by "
                           "first_hitting, fast_dllm and ar", ge=1)
    num_samples: int = doc(8, "how many sequences to generate", ge=1)
    batch_size: int = doc(8, "sequences generated at once", ge=1)
    seed: int = doc(0, "generator seed", ge=0)
    top_p: float = doc(1.0, "nucleus sampling: keep the smallest set of tokens with probability >= top_p (1 = off); "
                            "every sampler (llada/fast_dllm: with temperature > 0)", gt=0, le=1)
    noise_removal: str = doc("auto", "ddpm family, remdm, first_hitting: fill masks left at the end: greedy (argmax), "
                                     "ancestral (sample), none; auto = the sampler's own (analytic: ancestral, "
                                     "others: greedy)", choices=("auto", "greedy", "ancestral", "none"))
    grid: str = doc("auto", "ddpm family, remdm: time grid uniform or cosine (MD4's t = cos(π/2·(1−u))); auto = "
                            "cosine for ancestral, uniform otherwise", choices=("auto", "uniform", "cosine"))
    t_min: Optional[float] = doc(None, "ddpm family, remdm, first_hitting: last time; null = 1e-5 (MDLM), 0 for "
                                       "ancestral (MD4)", ge=0, lt=1)
    stride_length: int = doc(0, "masked samplers, semi-autoregressive: new tokens per extra window (0 = off)", ge=0)
    num_strides: int = doc(0, "masked samplers, semi-autoregressive: extra windows; output length = model length "
                              "+ num_strides·stride_length", ge=0)
    guidance: float = doc(0.0, "masked samplers: classifier-free guidance scale w with the prompt as the condition "
                               "(LLaDA's form: logits u + (1+w)(c−u), u with the prefix/infill tokens masked); "
                               "0 = off; doubles the network evaluations", ge=0)
    tokens_per_call: int = doc(1, "first_hitting: tokens revealed per network call (1 = exact)", ge=1)
    remdm_schedule: str = doc("cap", "remdm: remasking schedule sigma_t: cap = min(eta, sigma_max), rescale = "
                                     "eta·sigma_max, conf = eta·softmax(−confidence)·sigma_max, loop = remask with "
                                     "eta while alpha is held at remdm_alpha_on on (t_off, t_on]",
                              choices=("cap", "rescale", "conf", "loop"))
    remdm_eta: Optional[float] = doc(None, "remdm: remasking strength eta (0 = ddpm exactly); null = the paper's "
                                           "for the schedule (cap 0.008, rescale 0.015, conf 1, loop 0.02)", ge=0)
    remdm_t_on: float = doc(0.55, "remdm loop: time the loop starts (alpha reaches remdm_alpha_on)", ge=0, le=1)
    remdm_t_off: float = doc(0.05, "remdm loop: time the loop ends (then ddpm to alpha = 1)", ge=0, le=1)
    remdm_alpha_on: float = doc(0.9, "remdm loop: alpha held during the loop", ge=0, le=1)
    block_length: int = doc(0, "llada, fast_dllm: semi-autoregressive block length from the first free position "
                               "(0 = one block)", ge=0)
    remasking: str = doc("low_confidence", "llada, fast_dllm: which candidates are kept: low_confidence (the most "
                                           "probable) or random", choices=("low_confidence", "random"))
    temperature: float = doc(0.0, "llada, fast_dllm: candidates drawn from x_theta^(1/temperature) in float64; "
                                  "0 = argmax (deterministic)", ge=0)
    threshold: float = doc(0.9, "fast_dllm: keep every candidate whose probability is >= threshold (and the best)",
                           ge=0, le=1)
    prefix_cache: bool = doc(False, "llada, fast_dllm: Fast-dLLM's approximate prefix KV cache for bidirectional "
                                    "backbones (stale within a block: not exact); off by default")
    prefix: str = doc("", "`mdtrain sample`: text every sample starts with (given tokens never change)")
    infill: str = doc("", "`mdtrain sample`: a template of text and <mask> / <mask*N> blanks, e.g. "
                          "\"def <mask*4>(x): return <mask*8>\"; the text is kept, the blanks and the positions "
                          "after the template are generated (masked samplers)")
    stop_at_eos: bool = doc(False, "bd3lm: end each sample at its first generated EOS (variable length; the "
                                   "output length num_strides·stride_length past the model length is the cap)")
    out: str = doc("", "`mdtrain sample`: output JSONL of texts and ids; empty = next to the checkpoint")
    show: int = doc(4, "`mdtrain sample`: print the first N samples", ge=0)

    def validate(self):
        if self.steps < 1:
            raise ConfigError(f"sample.steps must be >= 1, got {self.steps}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"sample.top_p must be in (0, 1], got {self.top_p}")
        if (self.stride_length > 0) != (self.num_strides > 0):
            raise ConfigError("semi-autoregressive sampling needs both sample.stride_length and sample.num_strides "
                              f"> 0 (got {self.stride_length}, {self.num_strides})")
        if self.guidance < 0:
            raise ConfigError(f"sample.guidance must be >= 0 (0 = off), got {self.guidance}")
        if self.tokens_per_call < 1:
            raise ConfigError(f"sample.tokens_per_call must be >= 1, got {self.tokens_per_call}")
        if self.prefix and self.infill:
            raise ConfigError("set sample.prefix or sample.infill, not both (a prefix is an infill template "
                              "without blanks)")
