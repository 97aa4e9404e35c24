"""LLaDA's masked diffusion objective (Nie et al. 2025, arXiv 2502.09992; as the Axolotl diffusion plugin trains it).

t ~ U[0, 1] (antithetic over the batch); mask probability p(t) = ε + (1 − ε)·(1 − α(t)), which is
LLaDA's p = (1 − ε)·t + ε for the linear schedule; every maskable token is masked with probability
p. Never masked: BOS / EOS / PAD, padding, and prompt tokens (`batch["prompt_mask"]`).

Training loss with importance weighting on:  Σ_masked CE / p ÷ N, where N is the number of
*maskable* tokens in the batch (our B·L: real tokens that are neither special nor prompt). Since a
token is masked with probability p, E[Σ_masked CE/p] = Σ_maskable CE, so a uniform predictor costs
exactly ln V per token in expectation, for every t, schedule and clamp. In SFT (a batch with a
prompt_mask) each sample's sum is divided by its own answer length and samples are averaged.
Importance weighting off: the plain mean CE over masked tokens.

val/nelbo uses the ELBO weight p′(t)/p(t) instead (= (1 − ε)/p for the linear schedule), so it is
the same bound as masked_discrete's and sits on the shared bits-per-token scale.
"""

from __future__ import annotations

import torch

from diffuse.core.checks import check_range
from diffuse.errors import DiffuseError
from diffuse.objectives.absorbing import AbsorbingObjective
from diffuse.objectives.base import SpecialTokens, noisable_positions
from diffuse.registry import OBJECTIVES
from diffuse.schedules import Schedule, build_schedule


@OBJECTIVES.register("llada")
class LLaDA(AbsorbingObjective):
    full_sequence_sampler = "llada"

    def __init__(self, special: SpecialTokens, schedule: Schedule | None = None, eps: float = 1e-3,
                 min_mask_ratio: float = 0.0, max_mask_ratio: float = 1.0, importance_weighting: bool = True,
                 mask_token_id: int | None = None, mask_eos: bool = False, block_size: int | None = None):
        check_range("objective.mask_token_id", mask_token_id, 0, integer=True, null="the tokenizer's [MASK]")
        if mask_token_id is not None:  # e.g. a pretrained LLaDA checkpoint's config.mask_token_id
            special = SpecialTokens(special.pad, special.bos, special.eos, int(mask_token_id))
        if special.mask is None:
            raise DiffuseError("objective=llada needs a [MASK] token: the tokenizer has none and "
                               "objective.mask_token_id is not set")
        super().__init__(schedule or build_schedule("linear"), special, eps, min_mask_ratio, max_mask_ratio,
                         block_size)
        self.importance_weighting, self.mask_eos = importance_weighting, mask_eos

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        """p(t) = ε + (1 − ε)·(1 − α(t)) ∈ [ε, 1]."""
        return self.eps + (1.0 - self.eps) * (1.0 - self.schedule.alpha(t))

    def t_for_mask_prob(self, p: float) -> float:
        alpha = 1.0 - (p - self.eps) / (1.0 - self.eps)
        return float(self.schedule.t_for_alpha(torch.tensor(alpha, dtype=torch.float64)))

    def maskable(self, batch) -> torch.Tensor:
        """Real tokens other than BOS, PAD, EOS (unless `mask_eos`) and the prompt."""
        given = (self.special.bos, self.special.pad) + (() if self.mask_eos else (self.special.eos,))
        return noisable_positions(batch, given)

    def t_from_uniform(self, u: torch.Tensor, train: bool) -> torch.Tensor:
        """t ∈ [0, 1]; in training clamped so that p(t) ∈ [min_mask_ratio, max_mask_ratio] (p is monotone
        in t, so clamping t clamps p, and corrupt/noise_level need no train flag)."""
        if not train:
            return u
        lo = self.t_for_mask_prob(self.min_mask_ratio) if self.min_mask_ratio > self.eps else 0.0
        hi = self.t_for_mask_prob(self.max_mask_ratio) if self.max_mask_ratio < 1.0 else 1.0
        return u.clamp(lo, hi)

    def elbo_weight(self, t: torch.Tensor) -> torch.Tensor:
        """p′(t)/p(t) = −(1 − ε)·α′(t)/p(t)."""
        return (-(1.0 - self.eps) * self.schedule.alpha_prime(t)).float() / self.mask_prob(t).float()

    def train_weight(self, t, masked, maskable, batch) -> torch.Tensor:
        if not self.importance_weighting:  # the plain mean CE over masked tokens
            return 1.0 / masked.sum().clamp_min(1)
        p = self.mask_prob(t).float()
        if batch.get("prompt_mask") is not None:
            return per_sample_weight(maskable, batch["segment_ids"]) / p
        return 1.0 / (p * maskable.sum().clamp_min(1))

    def extra_metrics(self, t, masked, nll) -> dict[str, torch.Tensor]:
        p, n_masked = self.mask_prob(t).float(), masked.sum()
        denom = n_masked.clamp_min(1)
        metrics = {
            "num_masked_tokens": n_masked.float(),
            "avg_p_mask": (p * masked).sum() / denom,
            "ce_loss": nll.sum() / denom,
        }
        if self.importance_weighting:
            metrics["importance_weight_avg"] = (masked / p).sum() / denom
        return metrics


def per_sample_weight(maskable: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, L]: 1 / (the token's sample's maskable, i.e. answer, length · the number of samples), so that
    Σ weight·CE is the mean over samples of each sample's mean CE. A sample is one document (segment) of a
    row, so packed SFT rows count each conversation once."""
    B, L = maskable.shape
    lengths = torch.zeros(B, L + 1, device=maskable.device).scatter_add_(1, segment_ids, maskable.float())
    n_samples = (lengths[:, 1:] > 0).sum().clamp_min(1)
    return 1.0 / (lengths.gather(1, segment_ids).clamp_min(1) * n_samples)
