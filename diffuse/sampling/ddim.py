"""Deterministic DDIM for Gaussian embedding diffusion (objective=continuous).

From x_T ~ N(0, noise_scale²·I) on the generated positions, on a grid of `steps` times k/T (T → 0):
    x̂0 = f(x_t, t);  ε̂ = (x_t − √ᾱ_t·x̂0) / √(1 − ᾱ_t);  x_s = √ᾱ_s·x̂0 + √(1 − ᾱ_s)·ε̂,
the last step landing on s = 0, where x_s = x̂0. BOS and prompt positions are held at their clean
embeddings on every step; `clamp` snaps x̂0 to the nearest token embedding each step (Diffusion-LM's
clamping trick); the tokens are the argmax of the rounding logits of the last x̂0.
"""

from __future__ import annotations

import torch

from diffuse.contracts import GAUSSIAN, Gaussian
from diffuse.errors import DiffuseError
from diffuse.registry import SAMPLERS
from diffuse.sampling.base import (
    SampleOutput,
    masked_canvas,
    row_generators,
    take_generated,
    trim_at_eos,
)
from diffuse.sampling.trace import recorder


@SAMPLERS.register("ddim")
class DDIMSampler:
    """Defaults as conf/sampler/ddim.yaml."""

    processes = (GAUSSIAN,)
    requires = (Gaussian,)  # the embedding table, ᾱ(t), rounding: checked at build time
    any_length = False

    def __init__(self, steps: int = 10, clamp: bool = False, noise_scale: float = 1.0):
        if int(steps) <= 0:
            raise DiffuseError(f"sampler.steps={steps} must be positive")
        if noise_scale < 0:
            raise DiffuseError(f"sampler.noise_scale={noise_scale} must be ≥ 0")
        self.steps, self.clamp, self.noise_scale = int(steps), bool(clamp), float(noise_scale)

    def grid(self, num_timesteps: int, device) -> torch.Tensor:
        """Integer steps T = k_0 > … > k_N = 0 (as evenly spaced as T allows)."""
        steps = min(self.steps, num_timesteps)
        k = torch.linspace(num_timesteps, 0, steps + 1, dtype=torch.float64).round().long()
        return k.unique_consecutive().to(device)

    @torch.no_grad()
    def generate(self, backbone, objective, prompts, length, seed=0) -> SampleOutput:
        special = objective.special
        device = next(backbone.parameters()).device
        ids, seg, starts = masked_canvas(prompts, length, special, device)
        generated = ids == special.mask
        table = objective.embedding_table(backbone)
        clean = table[ids]
        gens = row_generators(seed, len(prompts), device)
        # x_T per row over the generated positions only: independent of the canvas width (batch = singles)
        noise = torch.stack([torch.randn((length, clean.shape[-1]), generator=g, device=device, dtype=clean.dtype) for g in gens])
        x = clean.clone()
        x[generated] = self.noise_scale * noise.reshape(-1, clean.shape[-1])
        batch = {"input_ids": ids, "segment_ids": seg}
        T = objective.num_timesteps
        ks = self.grid(T, device)
        nfe, rec = 0, recorder(self)  # OFF unless traced (sampling/trace.py)
        for k_t, k_s in zip(ks[:-1], ks[1:]):
            t = (k_t.double() / T).expand(ids.shape[0], 1)
            x0_hat = objective.predict(backbone, objective.noised(x, generated), t.float(), batch)
            nfe += 1
            if self.clamp:
                x0_hat = table[objective.round_logits(backbone, x0_hat, table).argmax(-1)]
            a_t = objective.alpha_bar(t)[..., None]
            a_s = objective.alpha_bar(k_s.double() / T)
            eps_hat = (x - a_t.sqrt() * x0_hat) / (1.0 - a_t).sqrt().clamp_min(1e-12)
            x_s = (a_s.sqrt() * x0_hat + (1.0 - a_s).sqrt() * eps_hat).to(x.dtype)
            x = torch.where(generated[..., None], x_s, clean)
            # what the canvas reads as now: x̂0 rounded; every generated position is renoised on each step
            rec.step(lambda: take_generated(objective.round_logits(backbone, x0_hat, table).argmax(-1), starts, length),
                     nfe=nfe, renoised=lambda: torch.ones(len(prompts), length, dtype=torch.bool), t=t)
        tokens = objective.round_logits(backbone, x0_hat, table).argmax(-1)
        tokens = torch.where(generated, tokens, ids)
        tokens, lengths = trim_at_eos(take_generated(tokens, starts, length), special)
        return SampleOutput(tokens, lengths, nfe, [list(p) for p in prompts])
