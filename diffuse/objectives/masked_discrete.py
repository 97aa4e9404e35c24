"""Absorbing-state ("masked") discrete diffusion with the SUBS parameterisation (MDLM / TDLM).

Each token is masked independently with probability 1 − α(t), t ∈ [ε, 1]. The network predicts x0 at
masked positions (the [MASK] logit is −∞; unmasked positions copy x0 and cost nothing). Per token:

    NELBO = ∫_ε^1 Σ_ℓ 1[masked_ℓ] · (−α′(t) / (1 − α(t))) · (−log p_θ(x0_ℓ | z_t)) dt / L

and the training loss is that NELBO. Everything but TDLM's per-token mask ratio is the family's
default (objectives/absorbing.py).
"""

from __future__ import annotations

from diffuse.objectives.absorbing import AbsorbingObjective
from diffuse.objectives.base import SpecialTokens
from diffuse.registry import OBJECTIVES
from diffuse.schedules import Schedule


@OBJECTIVES.register("masked_discrete")
class MaskedDiscrete(AbsorbingObjective):
    full_sequence_sampler = "ancestral"  # MDLM's own reverse process; confidence remasking repeats itself on small models

    def __init__(
        self,
        schedule: Schedule,
        special: SpecialTokens,
        eps: float = 1e-3,
        min_mask_ratio: float = 0.0,
        max_mask_ratio: float = 1.0,
        single_ratio_per_sequence: bool = True,
        block_size: int | None = None,
    ):
        super().__init__(schedule, special, eps, min_mask_ratio, max_mask_ratio, block_size)
        self.single_ratio_per_sequence = single_ratio_per_sequence

    def t_tail(self, x0, train: bool) -> tuple[int, ...]:
        """TDLM's switch: in training each token may draw its own mask ratio ([B, L] t)."""
        return (x0.shape[1],) if train and not self.single_ratio_per_sequence else (1,)
