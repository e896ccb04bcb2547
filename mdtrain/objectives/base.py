"""What every objective shares: the Objective interface, noise drawing with stratification, the masked-family loop.

Conventions (objectives/README.md): ``vocab_size`` counts the mask token, whose logit is suppressed wherever the
parameterisation says so; losses are nats per valid token; every metric is a detached 0-dim float64 tensor,
a sum over the batch unless its name says otherwise, so it can be all-reduced and aggregated over a corpus.
"""
from __future__ import annotations

import abc
import math
from typing import Optional

import torch
from torch import nn

from mdtrain.objectives.logprob import LOCAL, LogitsReader
from mdtrain.objectives.protocol import ModelFn



def draw_noise(spec: dict, batch_size: int, generator: Optional[torch.Generator] = None,
               stratified_keys: tuple = (), index_offset: int = 0, total: Optional[int] = None,
               device: Optional[torch.device] = None) -> dict:
    """Uniform[0,1) draws (float64) of shape (batch_size, *spec[key]) for every key, in the spec's order.

    Keys in ``stratified_keys`` are stratified over a batch of ``total`` samples (default ``batch_size``) of which
    these are samples ``index_offset ... index_offset + batch_size − 1``: u ← (u + global_index) / total. Drawing
    sample by sample with the right offsets gives the same stratification as drawing the whole batch at once.
    """
    total = batch_size if total is None else total
    if total < index_offset + batch_size:
        raise ValueError(f"draw_noise: samples {index_offset}..{index_offset + batch_size - 1} do not fit in a "
                         f"batch of total={total}")
    gen_device = generator.device if generator is not None else device
    out = {}
    for key, shape in spec.items():
        u = torch.rand((batch_size, *shape), generator=generator, dtype=torch.float64, device=gen_device)
        if key in stratified_keys:
            idx = torch.arange(index_offset, index_offset + batch_size, dtype=torch.float64, device=u.device)
            u = (u + idx.view(-1, *([1] * len(shape)))) / total
        out[key] = u if device is None else u.to(device)
    return out


def valid_mask(x: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.ones_like(x, dtype=torch.bool) if attention_mask is None else attention_mask.to(x.device).bool()


def _metric(v) -> torch.Tensor:
    return (v if torch.is_tensor(v) else torch.tensor(v)).detach().to(torch.float64)


class Objective(nn.Module, abc.ABC):
    """Base class. An nn.Module so that objectives with parameters (genmd4's schedule) are trained and
    checkpointed like the model: include ``objective.parameters()`` in the optimizer and ``state_dict()``."""

    name: str = ""
    causal: bool = False
    first_target: int = 0  # positions before it are context: never predicted, never counted as tokens
    reports_bits: bool = False  # add metrics["bits_sum"] = nll_sum / ln 2 (MD4's unit)

    def __init__(self, settings: dict, vocab_size: int, mask_id: int):
        super().__init__()
        if not 0 <= mask_id < vocab_size:
            raise ValueError(f"mask_id={mask_id} must be a class of the vocabulary (vocab_size={vocab_size} "
                             "counts the mask token)")
        self.vocab_size, self.mask_id = vocab_size, mask_id
        # how this objective reads its network's logits (tensor parallelism gives it a reader of one rank's columns)
        self.logprob: LogitsReader = LOCAL
        self.time_conditioning = bool(settings["time_conditioning"])

    # --- noise -------------------------------------------------------------------------------------------
    stratified_keys: tuple = ()

    def noise_spec(self, seq_len: int) -> dict:
        """Per-sample shapes of the uniform[0,1) draws :meth:`loss` consumes."""
        return {}

    def _get_noise(self, noise, generator, x0) -> dict:
        B, L = x0.shape
        spec = self.noise_spec(L)
        if noise is None:
            return draw_noise(spec, B, generator, self.stratified_keys, device=x0.device)
        missing = set(spec) - set(noise)
        if missing:
            raise ValueError(f"{self.name}.loss: noise lacks {sorted(missing)} (noise_spec: {spec})")
        out = {}
        for k, shape in spec.items():
            if tuple(noise[k].shape) != (B, *shape):
                raise ValueError(f"{self.name}.loss: noise[{k!r}] has shape {tuple(noise[k].shape)}, "
                                 f"expected {(B, *shape)}")
            out[k] = noise[k].to(device=x0.device, dtype=torch.float64)
        return out

    # --- time conditioning -------------------------------------------------------------------------------
    def cond_value(self, t: torch.Tensor) -> torch.Tensor:
        """What a time-conditioned network receives at time t (objective's convention)."""
        return self.schedule.sigma(t)

    def cond(self, t: torch.Tensor) -> torch.Tensor:
        """The network's ``cond`` input, float32 (B,): zeros when not time-conditioned."""
        if not self.time_conditioning:
            return torch.zeros(t.shape, dtype=torch.float32, device=t.device)
        return self.cond_value(t.to(torch.float64)).to(torch.float32)

    # --- loss --------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def loss(self, model_fn: ModelFn, x0: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
             generator: Optional[torch.Generator] = None, noise: Optional[dict] = None):
        """(training scalar per valid token, metrics with at least ``nll_sum`` and ``tokens``)."""

    def _finish(self, nll_terms: torch.Tensor, valid: torch.Tensor, surrogate=None, **extra):
        """(training scalar, metrics). ``nll_terms`` (per token or per sequence, 0 where invalid) sum to the batch's
        NELBO in nats; the scalar is (that sum + Σ ``surrogate`` terms, if any) / #valid tokens. ``nll_per_sequence``
        (B,) float64 is each sequence's share of ``nll_sum``."""
        tokens = valid.sum()
        total = nll_terms.sum() if surrogate is None else nll_terms.sum() + surrogate.sum()
        loss = total / tokens.clamp_min(1)
        per_seq = nll_terms.detach().to(torch.float64)
        per_seq = per_seq.reshape(per_seq.shape[0], -1).sum(1) if per_seq.dim() > 1 else per_seq
        metrics = {"nll_sum": per_seq.sum(), "tokens": _metric(tokens),
                   "nll_per_sequence": per_seq}  # (B,): each sequence's NELBO, for Monte Carlo standard errors
        if self.reports_bits:
            metrics["bits_sum"] = metrics["nll_sum"] / math.log(2)
        metrics.update({k: _metric(v) for k, v in extra.items()})
        return loss, metrics


class MaskedObjective(Objective):
    """The absorbing-state family: t ~ stratified uniform, z_t = x0 masked w.p. 1 − α(t), one network pass."""

    def __init__(self, settings: dict, vocab_size: int, mask_id: int, schedule=None):
        super().__init__(settings, vocab_size, mask_id)
        if schedule is None:
            from mdtrain.objectives.schedules import build_schedule
            schedule = build_schedule(settings["schedule"], eps=settings["schedule_eps"],
                                      sigma_min=settings["sigma_min"], sigma_max=settings["sigma_max"])
        self.schedule = schedule
        self.sampling_eps = float(settings["sampling_eps"])
        self.T = int(settings["T"])
        self.stratified_keys = ("t",) if settings["antithetic"] else ()

    def noise_spec(self, seq_len: int) -> dict:
        return {"t": (), "mask": (seq_len,)}

    def continuous_time(self, u: torch.Tensor) -> torch.Tensor:
        """t = ε_s + (1−ε_s)u (MDLM's sampling_eps; MD4: ε_s = 0; GenMD4: ε_s = t1)."""
        return self.sampling_eps + (1 - self.sampling_eps) * u

    def sample_time(self, u: torch.Tensor) -> torch.Tensor:
        """Training time from a uniform: :meth:`continuous_time`, snapped up to the grid {1/T, ..., 1} if T > 0."""
        t = self.continuous_time(u)
        if self.T > 0:
            t = (torch.floor(t * self.T) + 1).clamp(max=self.T) / self.T
        return t

    def mask_prob(self, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """P(z_t = mask) per position, broadcastable to x0."""
        return self.schedule.mask_prob(t)[:, None]

    def corrupt(self, x0: torch.Tensor, t: torch.Tensor, u_mask: torch.Tensor) -> torch.Tensor:
        """z_t: position masked where its uniform falls below the mask probability."""
        return torch.where(u_mask < self.mask_prob(t, x0), torch.full_like(x0, self.mask_id), x0)

    def loss(self, model_fn, x0, attention_mask=None, generator=None, noise=None):
        noise = self._get_noise(noise, generator, x0)
        valid = self.targets(valid_mask(x0, attention_mask))
        t = self.sample_time(noise["t"])
        xt = self.corrupt(x0, t, noise["mask"])
        logits = model_fn(xt, self.cond(t))
        per_token = self.nelbo(logits, x0, xt, t, valid, **self.nelbo_extras(model_fn, x0, t))
        return self._finish(per_token, valid, masked_tokens=((xt == self.mask_id) & valid).sum())

    def targets(self, valid: torch.Tensor) -> torch.Tensor:
        """The valid positions that are predicted (all but the first ``first_target`` context positions)."""
        if not self.first_target:
            return valid
        valid = valid.clone()
        valid[:, :self.first_target] = False
        return valid

    def align_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The network's logits laid out so that row i predicts position i (what samplers read); identity unless
        the parameterisation is shifted."""
        return logits

    def nelbo_extras(self, model_fn, x0, t) -> dict:
        """Network outputs :meth:`nelbo` needs besides the logits at z_t (d3pm: its t = 0 pass on x0)."""
        return {}

    @abc.abstractmethod
    def nelbo(self, logits, x0, xt, t, attention_mask=None) -> torch.Tensor:
        """Per-token NELBO estimate in nats (B, L) at time t for noised input xt; 0 at invalid positions."""

    # --- what samplers need (rows: logits at masked positions, (N, V) in the network's dtype) -------------
    rows_for_unmask_prob: bool = False  # unmask_prob reads the logits (parameterisations with mass on the mask)

    def denoiser_logprobs(self, rows: torch.Tensor) -> torch.Tensor:
        """log x_θ over all classes, float64 (N, V); the mask column is −∞ unless the parameterisation keeps
        mass there (d3pm without subs_masking)."""
        out = rows.to(torch.float64, copy=True)
        out[:, self.mask_id] = -math.inf
        return torch.log_softmax(out, dim=-1)

    def _clean_logprobs(self, rows):
        out = self.denoiser_logprobs(rows)
        out[:, self.mask_id] = -math.inf
        return out

    def reveal_logits(self, rows: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """float64 log-weights (N, V) of the token a revealed position takes (mask column −∞, unnormalised)."""
        return self._clean_logprobs(rows)

    def unmask_prob(self, rows: Optional[torch.Tensor], t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """P(a masked token is revealed between t > s) under p_θ(z_s | z_t) = q(z_s | z_t, x0 = x_θ); t, s float64
        per row; ``rows`` is None unless ``rows_for_unmask_prob``."""
        mp_t, mp_s = self.schedule.mask_prob(t), self.schedule.mask_prob(s)
        return ((mp_t - mp_s) / mp_t).clamp(0, 1)

    def log_score(self, rows: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """SEDD ratios log[p_t(y)/p_t(mask)] at masked positions, float64 (N, V), mask column −∞:
        log x_θ(y) + log k with k = α/(1−α) = 1/expm1(σ) (MDLM's get_score). ``sigma``: (N,)."""
        return self._clean_logprobs(rows) - torch.log(torch.expm1(sigma.to(torch.float64)))[:, None]
