"""LLaDA's masked diffusion objective (seed 002, the Axolotl diffusion plugin, done fully).

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

from diffuse.errors import DiffuseError
from diffuse.objectives.base import LossOutput, SpecialTokens, antithetic_uniform, predicted_token_stats
from diffuse.objectives.masked_discrete import kl_distance, subs_log_probs
from diffuse.registry import OBJECTIVES
from diffuse.schedules import Schedule, build_schedule


@OBJECTIVES.register("llada")
class LLaDA:
    causal = False
    default_sampler = "llada"

    def __init__(
        self,
        special: SpecialTokens,
        schedule: Schedule | None = None,
        noise_schedule: str | None = None,
        eps: float = 1e-3,
        min_mask_ratio: float = 0.0,
        max_mask_ratio: float = 1.0,
        importance_weighting: bool = True,
        mask_token_id: int | None = None,
        mask_eos: bool = False,
    ):
        if not 0.0 < eps < 1.0:
            raise DiffuseError(f"objective.eps={eps} must lie in (0, 1)")
        if not 0.0 <= min_mask_ratio < max_mask_ratio <= 1.0:
            raise DiffuseError(
                f"objective.min_mask_ratio={min_mask_ratio} and max_mask_ratio={max_mask_ratio} "
                "must satisfy 0 ≤ min < max ≤ 1"
            )
        if noise_schedule is not None:  # the plugin's own key wins over the schedule group
            schedule = build_schedule(noise_schedule)
        self.schedule = schedule or build_schedule("linear")
        if mask_token_id is not None:  # e.g. a pretrained LLaDA checkpoint's config.mask_token_id
            special = SpecialTokens(special.pad, special.bos, special.eos, int(mask_token_id))
        if special.mask is None:
            raise DiffuseError("objective=llada needs a [MASK] token: the tokenizer has none and "
                               "objective.mask_token_id is not set")
        self.special, self.eps = special, eps
        self.min_mask_ratio, self.max_mask_ratio = min_mask_ratio, max_mask_ratio
        self.importance_weighting, self.mask_eos = importance_weighting, mask_eos

    # -- the forward (noising) process ----------------------------------------------------------
    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        """p(t) = ε + (1 − ε)·(1 − α(t)) ∈ [ε, 1]."""
        return self.eps + (1.0 - self.eps) * (1.0 - self.schedule.alpha(t))

    def _t_for_p(self, p: float) -> float:
        alpha = 1.0 - (p - self.eps) / (1.0 - self.eps)
        return float(self.schedule.t_for_alpha(torch.tensor(alpha, dtype=torch.float64)))

    def maskable(self, batch) -> torch.Tensor:
        ids = batch["input_ids"]
        special = [self.special.bos, self.special.pad] + ([] if self.mask_eos else [self.special.eos])
        special = torch.tensor([s for s in special if s is not None], device=ids.device)
        out = (batch["segment_ids"] > 0) & ~torch.isin(ids, special)
        if batch.get("prompt_mask") is not None:
            out &= ~batch["prompt_mask"].bool()
        return out

    def sample_t(self, x0: torch.Tensor, generator=None, train: bool = True) -> torch.Tensor:
        """Antithetic t of shape [B, 1]; in training clamped so that p(t) ∈ [min_mask_ratio, max_mask_ratio]
        (p is monotone in t, so clamping t clamps p, and corrupt/noise_level need no train flag)."""
        t = antithetic_uniform(x0.shape[0], x0.device, generator, (1,))
        if train:
            lo = self._t_for_p(self.min_mask_ratio) if self.min_mask_ratio > self.eps else 0.0
            hi = self._t_for_p(self.max_mask_ratio) if self.max_mask_ratio < 1.0 else 1.0
            t = t.clamp(lo, hi)
        return t

    def draw_noise(self, x0: torch.Tensor, generator=None) -> torch.Tensor:
        return torch.rand(x0.shape, device=x0.device, generator=generator)

    def corrupt(self, x0, t, noise, batch) -> torch.Tensor:
        """Mask where noise < p(t): the same noise at two times gives nested (coupled) masks."""
        masked = (noise < self.mask_prob(t)) & self.maskable(batch)
        return torch.where(masked, torch.full_like(x0, self.special.mask), x0)

    def still_noisy(self, z: torch.Tensor) -> torch.Tensor:
        return z == self.special.mask

    def noise_level(self, t: torch.Tensor) -> torch.Tensor:
        return self.mask_prob(t)

    # -- the network's prediction ---------------------------------------------------------------
    def predict(self, backbone, z, t, batch) -> torch.Tensor:
        return subs_log_probs(backbone, z, t, batch, self.special.mask)

    def distance(self, pred, target, where) -> torch.Tensor:
        return kl_distance(pred, target, where)

    # -- the loss -------------------------------------------------------------------------------
    def loss(self, backbone, batch, generator=None, train: bool = True) -> LossOutput:
        x0 = batch["input_ids"]
        t = self.sample_t(x0, generator, train)
        z = self.corrupt(x0, t, self.draw_noise(x0, generator), batch)
        logp = self.predict(backbone, z, t, batch)
        masked = self.still_noisy(z)
        maskable = self.maskable(batch)
        ce = torch.where(masked, -logp.gather(-1, x0[..., None]).squeeze(-1), 0.0)
        p = self.mask_prob(t).float().expand_as(ce)
        n_tokens, n_masked = maskable.sum(), masked.sum()

        if not self.importance_weighting:
            loss = ce.sum() / n_masked.clamp_min(1)
        elif batch.get("prompt_mask") is not None:
            loss = per_sample_mean(ce / p, maskable, batch["segment_ids"])
        else:
            loss = (ce / p).sum() / n_tokens.clamp_min(1)
        # ELBO weight p′(t)/p(t) = −(1 − ε)·α′(t)/p(t): the bound reported as val/nelbo
        elbo_weight = (-(1.0 - self.eps) * self.schedule.alpha_prime(t)).float() / p
        nll_sum = (ce * elbo_weight).sum()

        correct, conf = predicted_token_stats(logp, x0, masked)
        level = masked.sum(1, keepdim=True) / maskable.sum(1, keepdim=True).clamp_min(1)
        denom = n_masked.clamp_min(1)
        metrics = {
            "mask_ratio": n_masked / n_tokens.clamp_min(1),  # of the maskable tokens
            "num_masked_tokens": n_masked.float(),
            "avg_p_mask": (p * masked).sum() / denom,
            "ce_loss": ce.sum().detach() / denom,
        }
        if self.importance_weighting:
            metrics["importance_weight_avg"] = (masked / p).sum() / denom
        return LossOutput(
            loss=loss,
            nll_sum=nll_sum.detach(),
            n_tokens=n_tokens,
            metrics=metrics,
            token_correct=correct,  # drives train/accuracy (the plugin's `accuracy`: argmax on masked tokens)
            token_confidence=conf,
            token_level=level.expand_as(masked)[masked],
        )


def per_sample_mean(weighted: torch.Tensor, maskable: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """Mean over samples of (Σ weighted over the sample) / (the sample's maskable, i.e. answer, length).
    A sample is one document (segment) of a row, so packed SFT rows count each conversation once."""
    B, L = weighted.shape
    lengths = torch.zeros(B, L + 1, device=weighted.device).scatter_add_(1, segment_ids, maskable.float())
    per_token = lengths.gather(1, segment_ids).clamp_min(1)
    n_samples = (lengths[:, 1:] > 0).sum().clamp_min(1)
    return (weighted / per_token).sum() / n_samples
