"""Reverse processes of masked (absorbing-state) diffusion.

- `ancestral` (MDLM): on t→s each masked position is revealed with probability
  (α(s) − α(t)) / (1 − α(t)), its token drawn from p_θ(x0 | z_t); the last step fills the rest.
- `remask` (TDLM / LLaDA confidence): on t→s reveal k = round(n_masked·(1 − (1−α(s))/(1−α(t))))
  positions, those whose sampled token is most confident (or random ones), plus every position
  above `confidence_threshold` when set.
"""

from __future__ import annotations

import torch

from diffuse.errors import DiffuseError
from diffuse.registry import SAMPLERS
from diffuse.sampling.base import (
    RowCost,
    Sampler,
    SampleOutput,
    masked_canvas,
    rand_rows,
    row_generators,
    sample_tokens,
    take_generated,
    trim_at_eos,
)
from diffuse.schedules import build_schedule


class MaskedSampler(Sampler):
    def __init__(self, steps: int = 64, schedule: str = "linear", temperature: float = 1.0, eps: float = 1e-3):
        if int(steps) <= 0:
            raise DiffuseError(f"sampler.steps={steps} must be positive")
        self.steps, self.temperature, self.eps = int(steps), float(temperature), eps
        self.schedule = build_schedule(schedule)

    @torch.no_grad()
    def generate(self, backbone, objective, prompts, length, seed=0) -> SampleOutput:
        special = objective.special
        device = next(backbone.parameters()).device
        canvas, seg, starts = masked_canvas(prompts, length, special, device)
        # work in the frame of the generated span [B, length]: a row's random draws then do not
        # depend on the other prompts' lengths, so a batch gives what its samples give alone
        span = starts[:, None] + torch.arange(length, device=device)
        x = take_generated(canvas, starts, length)
        gens = row_generators(seed, len(prompts), device)
        grid = self.schedule.grid(self.steps, self.eps, device)
        nfe, logp, reusable = 0, None, not getattr(backbone, "time_conditioned", False)
        cost = RowCost(len(prompts), reusable, device)
        for i in range(self.steps):
            t, s = grid[i], grid[i + 1]
            masked = x == special.mask
            if not masked.any():
                break
            if logp is None or not reusable:
                z = canvas.scatter(1, span, x)
                logp = objective.predict(backbone, z, t.float().expand(z.shape[0], 1), {"segment_ids": seg})
                logp = logp.gather(1, span[..., None].expand(-1, -1, logp.shape[-1]))
                nfe += 1
                cost.forward(masked.any(1))
            proposal = sample_tokens(logp, self.temperature, gens)
            reveal = self.choose(masked, proposal, logp, t, s, gens, last=i == self.steps - 1)
            if reveal.any():
                x = torch.where(reveal, proposal, x)
                logp = None  # the input changed: the next step needs a fresh forward pass
                cost.changed(reveal.any(1))
        tokens, lengths = trim_at_eos(x, special)
        return SampleOutput(tokens, lengths, nfe, [list(p) for p in prompts], cost.per_row)

    def choose(self, masked, proposal, logp, t, s, gens, last) -> torch.Tensor:
        raise NotImplementedError


@SAMPLERS.register("ancestral")
class AncestralSampler(MaskedSampler):
    def choose(self, masked, proposal, logp, t, s, gens, last):
        if last:
            return masked
        a_t, a_s = self.schedule.alpha(t), self.schedule.alpha(s)
        p_reveal = float((a_s - a_t) / (1.0 - a_t).clamp_min(1e-12))
        return masked & (rand_rows(gens, masked.shape[1:], masked.device) < p_reveal)


@SAMPLERS.register("remask")
class RemaskSampler(MaskedSampler):
    def __init__(self, steps: int = 64, schedule: str = "cosine", temperature: float = 1.0, eps: float = 1e-3,
                 remasking: str = "low_confidence", confidence_threshold: float | None = None):
        super().__init__(steps, schedule, temperature, eps)
        if remasking not in ("low_confidence", "random"):
            raise DiffuseError(f"sampler.remasking={remasking!r} must be low_confidence or random")
        self.remasking, self.confidence_threshold = remasking, confidence_threshold

    def choose(self, masked, proposal, logp, t, s, gens, last):
        if last:
            return masked
        a_t, a_s = self.schedule.alpha(t), self.schedule.alpha(s)
        frac = float(1.0 - (1.0 - a_s) / (1.0 - a_t).clamp_min(1e-12))
        n_masked = masked.sum(1)
        k = torch.round(n_masked.double() * frac).long()
        conf = logp.gather(-1, proposal[..., None]).squeeze(-1).exp()
        if self.remasking == "random":
            score = rand_rows(gens, masked.shape[1:], masked.device)
        else:
            score = conf
        reveal = top_k_rows(score.masked_fill(~masked, float("-inf")), k) & masked
        if self.confidence_threshold is not None:
            reveal |= masked & (conf >= self.confidence_threshold)
        return reveal


def top_k_rows(score: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Boolean mask of each row's k[r] highest scores (ties broken by position)."""
    order = score.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(score.shape[1], device=score.device).expand_as(order))
    return ranks < k[:, None]
