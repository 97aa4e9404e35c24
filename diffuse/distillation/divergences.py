"""Per-position divergences between a target distribution and a prediction, both given as log-probs
[..., V]. SDTT's ablation compares KL, MSE and TVD; KL(target ‖ prediction) is the default."""

from __future__ import annotations

import torch

from diffuse.errors import DiffuseError


def kl(target: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """KL(target ‖ pred) = Σ p_T (log p_T − log p_S); 0·log 0 = 0 (SUBS one-hots have −inf log-probs)."""
    p = target.exp()
    return torch.where(p > 0, p * (target - pred), 0.0).sum(-1)


def mse(target: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    return (target.exp() - pred.exp()).square().sum(-1)


def tvd(target: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    return 0.5 * (target.exp() - pred.exp()).abs().sum(-1)


DIVERGENCES = {"kl": kl, "mse": mse, "tvd": tvd}


def pick_divergence(name: str, key: str = "method.divergence"):
    if name not in DIVERGENCES:
        raise DiffuseError(f"{key}={name!r} must be one of {', '.join(DIVERGENCES)}")
    return DIVERGENCES[name]
