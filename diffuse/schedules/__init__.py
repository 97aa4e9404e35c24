"""Noise schedules on t ∈ [0, 1], independent of models and objectives (as in diffusers). A new
schedule is a module in this package (found by diffuse/core/discovery.py) plus conf/schedule/<name>.yaml.

α(t) is the keep-probability for masked objectives and the signal level ᾱ for Gaussian ones:
α(0) = 1 (clean), α(1) ≈ 0 (all noise). Each schedule gives α and α′; the NELBO weight
−α′/(1−α) is computed here once, for every schedule.
"""

from __future__ import annotations

import math

import torch

from diffuse.registry import SCHEDULES


class Schedule:
    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def alpha_prime(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def t_for_alpha(self, alpha: torch.Tensor) -> torch.Tensor:
        """Inverse of α: the time at which the keep-probability (signal level) is `alpha`."""
        raise NotImplementedError

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """ELBO weight −α′(t) / (1 − α(t)) of a masked token at time t."""
        return -self.alpha_prime(t) / (1.0 - self.alpha(t)).clamp_min(1e-12)

    def grid(self, steps: int, eps: float = 1e-3, device=None) -> torch.Tensor:
        """Inference time grid t_0 = 1 > … > t_steps = ε (uniform in t; α shapes the updates)."""
        return torch.linspace(1.0, eps, steps + 1, device=device, dtype=torch.float64)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@SCHEDULES.register("linear")
class LinearSchedule(Schedule):
    """α(t) = 1 − t (MDLM's log-linear schedule): weight 1/t; each of N steps reveals 1/j of what is left."""

    def alpha(self, t):
        return 1.0 - t

    def alpha_prime(self, t):
        return -torch.ones_like(t)

    def t_for_alpha(self, alpha):
        return 1.0 - alpha


@SCHEDULES.register("cosine")
class CosineSchedule(Schedule):
    """α(t) = cos(πt/2), i.e. mask probability 1 − cos(πt/2) (MDLM's convention, not sin(πt/2)).

    Weight (π/2)·sin(πt/2)/(1 − cos(πt/2)). As a sampling step schedule it reveals MORE tokens early
    than linear (64 tokens in 8 steps: 12, 12, 11, 10, 8, 6, 4, 1); `cosine_maskgit` does the opposite.
    """

    def alpha(self, t):
        return torch.cos(0.5 * math.pi * t)

    def alpha_prime(self, t):
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def t_for_alpha(self, alpha):
        return torch.arccos(alpha.clamp(-1.0, 1.0)) * (2.0 / math.pi)


@SCHEDULES.register("cosine_maskgit")
class MaskGITCosineSchedule(Schedule):
    """α(t) = 1 − sin(πt/2), i.e. mask probability sin(πt/2) (MaskGIT's / TDLM's inference cosine).

    Weight (π/2)·cos(πt/2)/sin(πt/2). As a sampling step schedule it commits few tokens early and
    many late (64 tokens in 8 steps: 1, 4, 6, 8, 10, 11, 12, 12).
    """

    def alpha(self, t):
        return 1.0 - torch.sin(0.5 * math.pi * t)

    def alpha_prime(self, t):
        return -0.5 * math.pi * torch.cos(0.5 * math.pi * t)

    def t_for_alpha(self, alpha):
        return torch.arcsin((1.0 - alpha).clamp(-1.0, 1.0)) * (2.0 / math.pi)


def build_schedule(spec) -> Schedule:
    """A schedule from a name (`"cosine"`) or a config mapping (`{name: cosine}`)."""
    return SCHEDULES.build({"name": spec} if isinstance(spec, str) else spec)
