"""Masking noise schedules: α(t) (probability a token is still clean at time t), α′(t), σ = −log α, NELBO weight.

Two families, with different conventions (see objectives/README.md):

* MDLM's (``loglinear`` default, ``cosine``, ``cosinesqr``, ``linear_sigma``, ``geometric_sigma``), ε = 1e-3,
  α(0) = 1 for the first three; ``*_sigma`` schedules are defined through σ(t) (SEDD naming).
* MD4's (``md4_linear``, ``md4_cosine``, ``md4_polyK`` e.g. ``md4_poly3``): α = (1−2ε)·ā(t) + ε with
  ε = 1e-4, so α(0) = 1−ε and α(1) = ε.

Every quantity is written in a closed form that stays accurate in float64 at t → 0 and t → 1 (no 1 − α
cancellations); pass float64 ``t`` for float64 accuracy. ``weight(t) = α′/(1−α)`` is ≤ 0: the per-token NELBO
integrand is ``weight · log p_θ(x0 | z_t)`` at masked positions.
"""
from __future__ import annotations

import abc
import difflib
import math

import torch

HALF_PI = math.pi / 2


class Schedule(abc.ABC):
    """α(t) for t ∈ [0, 1]. Subclasses give ``alpha``, ``mask_prob`` (= 1 − α) and ``dalpha`` in closed form."""

    name: str = ""
    eps: float = 0.0

    @abc.abstractmethod
    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """α(t): the probability that a token is still clean at time t."""

    @abc.abstractmethod
    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        """1 − α(t): the probability that a token is masked at time t ("move chance")."""

    @abc.abstractmethod
    def dalpha(self, t: torch.Tensor) -> torch.Tensor:
        """α′(t)."""

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Total noise σ(t) = −log α(t) (MDLM/SEDD naming); what MDLM feeds to a time-conditioned network."""
        a = self.alpha(t)
        return torch.where(a < 0.5, -torch.log(a), -torch.log1p(-self.mask_prob(t)))

    def dsigma(self, t: torch.Tensor) -> torch.Tensor:
        """Rate noise σ′(t) = −α′/α."""
        return -self.dalpha(t) / self.alpha(t)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """NELBO weight α′(t)/(1 − α(t)) ≤ 0 (= −σ′/expm1(σ)); −1/t for ``loglinear``."""
        return self.dalpha(t) / self.mask_prob(t)

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r}, eps={self.eps})"


# ---------------------------------------------------------------------------------------------------------
# MDLM family (noise_schedule.py of kuleshov-group/mdlm)


class LogLinear(Schedule):
    """α = 1 − (1−ε)t, σ = −log(1 − (1−ε)t); weight exactly −1/t. MDLM's default."""

    name = "loglinear"

    def __init__(self, eps: float = 1e-3):
        self.eps = eps
        # MDLM's attributes, used by the importance-sampling transform (sigma_min includes MDLM's ε offset).
        self.sigma_max = -math.log(eps) if eps > 0 else math.inf
        self.sigma_min = eps

    def alpha(self, t):
        return self.eps + (1 - self.eps) * (1 - t)  # no cancellation at t → 1

    def mask_prob(self, t):
        return (1 - self.eps) * t

    def dalpha(self, t):
        return torch.full_like(t, -(1 - self.eps))

    def sigma(self, t):
        return -torch.log1p(-(1 - self.eps) * t)

    def dsigma(self, t):
        return (1 - self.eps) / (1 - (1 - self.eps) * t)

    def importance_sampling_t(self, u):
        return _is_mask_prob(u, self.sigma_min, self.sigma_max) / (1 - self.eps)


class Cosine(Schedule):
    """α = ε + (1−ε)·cos(πt/2)."""

    name = "cosine"

    def __init__(self, eps: float = 1e-3):
        self.eps = eps

    def alpha(self, t):
        return self.eps + (1 - self.eps) * torch.sin(HALF_PI * (1 - t))

    def mask_prob(self, t):
        return (1 - self.eps) * 2 * torch.sin(math.pi / 4 * t) ** 2

    def dalpha(self, t):
        return -(1 - self.eps) * HALF_PI * torch.sin(HALF_PI * t)


class CosineSqr(Schedule):
    """α = ε + (1−ε)·cos²(πt/2)."""

    name = "cosinesqr"

    def __init__(self, eps: float = 1e-3):
        self.eps = eps

    def alpha(self, t):
        return self.eps + (1 - self.eps) * torch.sin(HALF_PI * (1 - t)) ** 2

    def mask_prob(self, t):
        return (1 - self.eps) * torch.sin(HALF_PI * t) ** 2

    def dalpha(self, t):
        return -(1 - self.eps) * HALF_PI * _sin_pi(t)


def _sin_pi(t):
    """sin(πt) accurate at both ends (π·t loses the tiny distance to π when t → 1)."""
    return torch.where(t < 0.5, torch.sin(math.pi * t), torch.sin(math.pi * (1 - t)))


class _SigmaSchedule(Schedule):
    """Schedules defined through σ(t): α = exp(−σ), 1 − α = −expm1(−σ), α′ = −σ′α, weight = −σ′/expm1(σ)."""

    def alpha(self, t):
        return torch.exp(-self.sigma(t))

    def mask_prob(self, t):
        return -torch.expm1(-self.sigma(t))

    def dalpha(self, t):
        return -self.dsigma(t) * self.alpha(t)

    def weight(self, t):
        return -self.dsigma(t) / torch.expm1(self.sigma(t))


class LinearSigma(_SigmaSchedule):
    """σ = σ_min + t(σ_max − σ_min) (MDLM's ``linear``; yaml 1e-3, 7.0)."""

    name = "linear_sigma"

    def __init__(self, sigma_min: float = 1e-3, sigma_max: float = 7.0):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def sigma(self, t):
        return self.sigma_min + t * (self.sigma_max - self.sigma_min)

    def dsigma(self, t):
        return torch.full_like(t, self.sigma_max - self.sigma_min)

    def importance_sampling_t(self, u):
        s = -torch.log1p(-_is_mask_prob(u, self.sigma_min, self.sigma_max))
        return (s - self.sigma_min) / (self.sigma_max - self.sigma_min)


class GeometricSigma(_SigmaSchedule):
    """σ = σ_min^(1−t)·σ_max^t (MDLM's ``geometric``; constructor defaults 1e-3, 1)."""

    name = "geometric_sigma"

    def __init__(self, sigma_min: float = 1e-3, sigma_max: float = 1.0):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def sigma(self, t):
        return self.sigma_min ** (1 - t) * self.sigma_max ** t

    def dsigma(self, t):
        return self.sigma(t) * (math.log(self.sigma_max) - math.log(self.sigma_min))


def _is_mask_prob(u, sigma_min, sigma_max):
    """MDLM's importance-sampling map: log(1 − α) linear in u between f_0 = log(1−e^{−σ_min}) and f_T."""
    f_T, f_0 = math.log1p(-math.exp(-sigma_max)), math.log1p(-math.exp(-sigma_min))
    return torch.exp(u * f_T + (1 - u) * f_0)


def importance_sampling_weight(schedule: Schedule) -> float:
    """The constant NELBO weight in the importance-sampled time variable u: d(1−α)/du / (1−α) negated,
    = f_0 − f_T (≤ 0). MDLM's code uses f_0 alone (drops f_T ≈ −1e-3); we keep the exact change of variables."""
    f_T = math.log1p(-math.exp(-schedule.sigma_max))
    f_0 = math.log1p(-math.exp(-schedule.sigma_min))
    return f_0 - f_T


# ---------------------------------------------------------------------------------------------------------
# MD4 family (md4/models/diffusion/md4.py MaskingSchedule): α = (1−2ε)·ā(t) + ε


class _MD4(Schedule):
    def __init__(self, eps: float = 1e-4):
        self.eps = eps

    @abc.abstractmethod
    def abar(self, t):
        """ā(t), the unshifted schedule."""

    @abc.abstractmethod
    def one_minus_abar(self, t):
        """1 − ā(t) in a form without cancellation."""

    @abc.abstractmethod
    def dabar(self, t):
        """ā′(t)."""

    def alpha(self, t):
        return (1 - 2 * self.eps) * self.abar(t) + self.eps

    def mask_prob(self, t):
        return (1 - 2 * self.eps) * self.one_minus_abar(t) + self.eps

    def dalpha(self, t):
        return (1 - 2 * self.eps) * self.dabar(t)


class MD4Linear(_MD4):
    """ā = 1 − t; weight = −(1−2ε)/(ε + (1−2ε)t) (MD4's default)."""

    name = "md4_linear"

    def abar(self, t):
        return 1 - t

    def one_minus_abar(self, t):
        return t

    def dabar(self, t):
        return torch.full_like(t, -1.0)


class MD4Cosine(_MD4):
    """ā = 1 − cos(π/2·(1−t)) (MaskGIT's schedule)."""

    name = "md4_cosine"

    def abar(self, t):
        return 2 * torch.sin(math.pi / 4 * (1 - t)) ** 2  # 1 − sin(πt/2) without cancellation at t → 1

    def one_minus_abar(self, t):
        return torch.sin(HALF_PI * t)

    def dabar(self, t):
        return -HALF_PI * torch.sin(HALF_PI * (1 - t))  # cos(πt/2) written stably at t → 1


class MD4Poly(_MD4):
    """ā = 1 − t^K (``md4_polyK``, e.g. ``md4_poly3``); weight ≈ −K/t."""

    def __init__(self, power: float, eps: float = 1e-4):
        super().__init__(eps)
        self.power = power
        self.name = f"md4_poly{power:g}"

    def abar(self, t):
        return -torch.expm1(self.power * torch.log(t))

    def one_minus_abar(self, t):
        return t ** self.power

    def dabar(self, t):
        return -self.power * t ** (self.power - 1)


# ---------------------------------------------------------------------------------------------------------

_MDLM = {"loglinear": LogLinear, "cosine": Cosine, "cosinesqr": CosineSqr}
_SIGMA = {"linear_sigma": LinearSigma, "geometric_sigma": GeometricSigma}
_MD4_FIXED = {"md4_linear": MD4Linear, "md4_cosine": MD4Cosine}
NAMES = tuple(_MDLM) + tuple(_SIGMA) + tuple(_MD4_FIXED) + ("md4_polyK",)


def build_schedule(name: str, eps: float | None = None, sigma_min: float | None = None,
                   sigma_max: float | None = None) -> Schedule:
    """A schedule by name; ``None`` parameters take the schedule's own default (MDLM ε = 1e-3, MD4 ε = 1e-4,
    linear_sigma σ ∈ [1e-3, 7], geometric_sigma σ ∈ [1e-3, 1])."""
    if name in _MDLM or name in _MD4_FIXED:
        if sigma_min is not None or sigma_max is not None:
            raise ValueError(f"schedule '{name}' takes no sigma_min/sigma_max (only linear_sigma, geometric_sigma)")
        cls = _MDLM.get(name) or _MD4_FIXED[name]
        return cls() if eps is None else cls(eps)
    if name in _SIGMA:
        if eps is not None:
            raise ValueError(f"schedule '{name}' takes sigma_min/sigma_max, not eps")
        kw = {k: v for k, v in (("sigma_min", sigma_min), ("sigma_max", sigma_max)) if v is not None}
        return _SIGMA[name](**kw)
    if name.startswith("md4_poly"):
        try:
            power = float(name[len("md4_poly"):])
        except ValueError:
            power = -1.0
        if not power > 0:
            raise ValueError(f"schedule '{name}': write the power after md4_poly, e.g. md4_poly3 or md4_poly0.5")
        if sigma_min is not None or sigma_max is not None:
            raise ValueError(f"schedule '{name}' takes no sigma_min/sigma_max")
        return MD4Poly(power) if eps is None else MD4Poly(power, eps)
    close = difflib.get_close_matches(name, NAMES, n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ValueError(f"unknown schedule '{name}'{hint}; known: {', '.join(NAMES)}. MDLM's 'linear' and "
                     "'geometric' are 'linear_sigma' and 'geometric_sigma'; MD4's are prefixed 'md4_'.")
