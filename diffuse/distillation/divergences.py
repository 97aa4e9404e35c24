"""Per-position divergences between a target distribution and a prediction, both given as log-probs
[..., V]. SDTT's ablation compares KL, MSE and TVD; KL(target ‖ prediction) is the default here.

SDTT's reference code (jdeschena/sdtt, src/sdtt/core/distill/multi_round_sdtt.py, `distill_mode`) defaults to
`kl-bwd`, the reverse KL(student ‖ teacher) = `reverse_kl` here; its `kl-fwd` is `kl`. Its `mse`
(F.mse_loss, a mean over positions and vocabulary) and `tvd` (Σ_V |·|, no ½) act on the log-probabilities,
on purpose (the author, jdeschena/sdtt#3: on probabilities the student hardly learned), where `mse` and `tvd`
here act on the probabilities (TVD the textbook ½ Σ |p − q|, in [0, 1])."""

from __future__ import annotations

import torch

from diffuse.errors import DiffuseError


def kl(target: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """KL(target ‖ pred) = Σ p_T (log p_T − log p_S); 0·log 0 = 0 (SUBS one-hots have −inf log-probs)."""
    p = target.exp()
    return torch.where(p > 0, p * (target - pred), 0.0).sum(-1)


def reverse_kl(target: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """KL(pred ‖ target) = Σ p_S (log p_S − log p_T): mode-seeking (SDTT's `kl-bwd`, its reference default)."""
    return kl(pred, target)


def mse(target: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    return (target.exp() - pred.exp()).square().sum(-1)


def tvd(target: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    return 0.5 * (target.exp() - pred.exp()).abs().sum(-1)


DIVERGENCES = {"kl": kl, "reverse_kl": reverse_kl, "mse": mse, "tvd": tvd}


def pick_divergence(name: str, key: str = "method.divergence"):
    if name not in DIVERGENCES:
        raise DiffuseError(f"{key}={name!r} must be one of {', '.join(DIVERGENCES)}")
    return DIVERGENCES[name]
