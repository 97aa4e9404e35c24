"""Absorbing-state ("masked") discrete diffusion with the SUBS parameterisation (MDLM / TDLM).

Each token is masked independently with probability 1 − α(t). The network predicts x0 at masked
positions (the [MASK] logit is −∞; unmasked positions copy x0 and cost nothing). Per token:

    NELBO = ∫_ε^1 Σ_ℓ 1[masked_ℓ] · (−α′(t) / (1 − α(t))) · (−log p_θ(x0_ℓ | z_t)) dt / L
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffuse.errors import DiffuseError
from diffuse.objectives.base import LossOutput, SpecialTokens, antithetic_uniform, predicted_token_stats
from diffuse.registry import OBJECTIVES
from diffuse.schedules import Schedule


@OBJECTIVES.register("masked_discrete")
class MaskedDiscrete:
    causal = False
    default_sampler = "remask"

    def __init__(
        self,
        schedule: Schedule,
        special: SpecialTokens,
        eps: float = 1e-3,
        min_mask_ratio: float = 0.0,
        max_mask_ratio: float = 1.0,
        single_ratio_per_sequence: bool = True,
    ):
        if not 0.0 <= min_mask_ratio < max_mask_ratio <= 1.0:
            raise DiffuseError(
                f"objective.min_mask_ratio={min_mask_ratio} and max_mask_ratio={max_mask_ratio} "
                "must satisfy 0 ≤ min < max ≤ 1"
            )
        if not 0.0 < eps < 1.0:
            raise DiffuseError(f"objective.eps={eps} must lie in (0, 1)")
        self.schedule, self.special, self.eps = schedule, special, eps
        self.min_mask_ratio, self.max_mask_ratio = min_mask_ratio, max_mask_ratio
        self.single_ratio_per_sequence = single_ratio_per_sequence

    # -- the forward (noising) process ----------------------------------------------------------
    def maskable(self, batch) -> torch.Tensor:
        """Real tokens other than BOS (given, as for the AR model, so both predict the same tokens)."""
        return (batch["segment_ids"] > 0) & (batch["input_ids"] != self.special.bos)

    def sample_t(self, x0: torch.Tensor, generator=None, train: bool = True) -> torch.Tensor:
        """Antithetic t of shape [B, 1] (or [B, L] when each token draws its own ratio in training)."""
        B, L = x0.shape
        per_token = train and not self.single_ratio_per_sequence
        u = antithetic_uniform(B, x0.device, generator, (L,) if per_token else (1,))
        lo, hi = self.eps, 1.0
        if train:  # clamp the mask ratio 1 − α(t) to [min, max] by clamping t
            as_t = lambda r: float(self.schedule.t_for_alpha(torch.tensor(1.0 - r, dtype=torch.float64)))
            lo, hi = max(lo, as_t(self.min_mask_ratio)), min(hi, as_t(self.max_mask_ratio))
        return lo + (hi - lo) * u

    def draw_noise(self, x0: torch.Tensor, generator=None) -> torch.Tensor:
        return torch.rand(x0.shape, device=x0.device, generator=generator)

    def corrupt(self, x0, t, noise, batch) -> torch.Tensor:
        """Mask where noise < 1 − α(t): the same noise at two times gives nested (coupled) masks."""
        masked = (noise < 1.0 - self.schedule.alpha(t)) & self.maskable(batch)
        return torch.where(masked, torch.full_like(x0, self.special.mask), x0)

    def still_noisy(self, z: torch.Tensor) -> torch.Tensor:
        return z == self.special.mask

    def noise_level(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - self.schedule.alpha(t)

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
        masked = z == self.special.mask
        nll = -logp.gather(-1, x0[..., None]).squeeze(-1)
        weight = self.schedule.weight(t).expand_as(nll) * (1.0 - self.eps)  # ∫_ε^1 = (1−ε)·E_U[ε,1]
        n_tokens = self.maskable(batch).sum()
        nll_sum = (nll * weight)[masked].sum()
        loss = nll_sum / n_tokens.clamp_min(1)

        correct, conf = predicted_token_stats(logp, x0, masked)
        level = (masked.sum(1, keepdim=True) / self.maskable(batch).sum(1, keepdim=True).clamp_min(1)).expand_as(masked)
        return LossOutput(
            loss=loss,
            nll_sum=nll_sum.detach(),
            n_tokens=n_tokens,
            metrics={"mask_ratio": masked.sum() / n_tokens.clamp_min(1)},
            token_correct=correct,
            token_confidence=conf,
            token_level=level[masked],
        )


# -- shared by every absorbing-state objective (masked_discrete, llada) ------------------------------
def subs_log_probs(backbone, z, t, batch, mask_id: int) -> torch.Tensor:
    """SUBS log-probabilities over x0: [MASK] impossible; unmasked positions are one-hot on z."""
    t_in = t.squeeze(-1) if t.dim() == 2 and t.shape[1] == 1 else t
    logits = backbone.logits(backbone(ids=z, t=t_in, segment_ids=batch.get("segment_ids")))
    logits = logits.float()
    logits[..., mask_id] = float("-inf")
    logp = logits.log_softmax(-1)
    keep = z != mask_id
    return torch.where(keep[..., None], F.one_hot(z, logp.shape[-1]).float().log(), logp)


def kl_distance(pred, target, where) -> torch.Tensor:
    """KL(target ‖ pred) per position, on the vocabulary distribution (zero where not `where`)."""
    kl = (target.exp() * (target - pred)).nan_to_num(0.0).sum(-1)
    return kl * where
