"""CDLM consistency (self-consistency between two noise levels, generalised to any objective with the noising hooks).

Per row: t_early from the objective's own draw, δ ~ U{delta_min..delta_max} steps of the T grid,
t_late = max(t_early − δ/T, ε). Both corruptions use the *same* noise (coupled: nested masks for the
masked objectives, a shared ε for Gaussian ones). The prediction at t_late, made without a graph, is the
target; the prediction at t_early is pulled towards it with the objective's `distance` (KL for token
distributions, MSE for x̂0) on the positions still noisy at t_late, weighted by the noise level there:

    loss_c = Σ_ℓ noise_level(t_late)·distance_ℓ·1[still noisy at t_late] / #real tokens,   total += λ·loss_c.

Hooks used: the noising hooks of diffuse/contracts.py (NoiseProcess), and two capabilities declared
there: `CleanData.clean(backbone, batch)` — the clean data in the space the objective corrupts (without it:
the token ids; continuous diffusion gives its embeddings) — and `TimeGrid.num_timesteps`, the T grid (without
it: this regularizer's `num_timesteps`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from diffuse.contracts import CleanData, NoisingObjective, TimeGrid, component_name, missing_hooks
from diffuse.core.noise import batch_draw
from diffuse.errors import DiffuseError
from diffuse.registry import REGULARIZERS


@dataclass
class CoupledPair:
    t_early: torch.Tensor
    t_late: torch.Tensor
    z_early: object
    z_late: object


@REGULARIZERS.register("cdlm_consistency")
class CDLMConsistency(nn.Module):
    """Teacher-free self-consistency: the target is the same network's own prediction at t_late (not a
    distilled teacher's trajectory, as in the CDLM paper's student training)."""

    def __init__(self, weight: float = 0.5, delta_min: int = 50, delta_max: int = 200, num_timesteps: int = 1000):
        super().__init__()
        self.global_step = 0
        self.weight = float(weight)
        self.delta_min, self.delta_max = int(delta_min), int(delta_max)
        if self.weight < 0:
            raise DiffuseError(f"regularizer.weight={weight} must be ≥ 0")
        if self.delta_min < 0 or self.delta_min > self.delta_max:
            raise DiffuseError(f"regularizer.delta_min={delta_min} and delta_max={delta_max} must satisfy 0 ≤ delta_min ≤ delta_max")
        self.num_timesteps = int(num_timesteps)
        self._check_grid(self.num_timesteps, "regularizer.num_timesteps")

    def _check_grid(self, T: int, source: str) -> None:
        if self.delta_max >= T:
            raise DiffuseError(f"regularizer.delta_max={self.delta_max} must be below the T={T} steps of {source}")

    def grid(self, objective) -> int:
        if not isinstance(objective, TimeGrid):
            return self.num_timesteps
        T = objective.num_timesteps
        self._check_grid(int(T), "objective.num_timesteps")
        return int(T)

    def coupled_pair(self, objective, backbone, batch, generator=None) -> tuple[object, CoupledPair]:
        """Clean data x0 and its two corruptions at t_early > t_late under one shared noise draw."""
        missing = missing_hooks(objective)
        if missing:
            raise DiffuseError(
                f"regularizer=cdlm_consistency needs objective hooks {', '.join(missing)}, which objective="
                f"{component_name(objective)} does not have"
            )
        T = self.grid(objective)
        x0 = objective.clean(backbone, batch) if isinstance(objective, CleanData) else batch["input_ids"]
        ids = batch["input_ids"]
        t_early = objective.sample_t(ids, generator, train=True)
        delta = batch_draw(partial(torch.randint, self.delta_min, self.delta_max + 1), (ids.shape[0], 1), generator,
                           device=ids.device)
        eps = float(objective.eps if isinstance(objective, NoisingObjective) else 1.0 / T)
        t_late = (t_early - delta.to(t_early.dtype) / T).clamp_min(eps)
        noise = objective.draw_noise(x0, generator)
        z_early = objective.corrupt(x0, t_early, noise, batch)
        z_late = objective.corrupt(x0, t_late, noise, batch)
        return x0, CoupledPair(t_early, t_late, z_early, z_late)

    def forward(self, objective, backbone, batch, generator=None):
        _, pair = self.coupled_pair(objective, backbone, batch, generator)
        with torch.no_grad():  # stop-gradient target
            target = objective.predict(backbone, pair.z_late, pair.t_late, batch)
        pred = objective.predict(backbone, pair.z_early, pair.t_early, batch)
        where = objective.still_noisy(pair.z_late) & (batch["segment_ids"] > 0)
        level = objective.noise_level(pair.t_late).float().expand(where.shape)
        per_position = objective.distance(pred, target.detach(), where) * level
        loss = per_position.sum() / (batch["segment_ids"] > 0).sum().clamp_min(1)
        return self.weight * loss, {"consistency_loss": loss.detach()}
