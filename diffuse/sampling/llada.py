"""LLaDA's reverse process: confidence remasking inside semi-autoregressive blocks, and threshold
(parallel) decoding. Both work for any absorbing-state objective (llada, masked_discrete).

- `llada`: the generated span is cut into blocks of `block_length`, decoded left to right; `steps`
  are split evenly across blocks and only the current block's masks are eligible. Each step commits
  k = round(n_masked · (1 − (1−α(s))/(1−α(t)))) tokens (the remask rule on a per-block time grid:
  the linear schedule splits a block evenly, as LLaDA does), the most confident sampled tokens
  (`low_confidence`, LLaDA's name: the *least* confident stay masked) or random ones. Optional
  classifier-free guidance: unconditional = the prompt masked, log-probs u + (w+1)(c − u).
- `threshold`: commit every eligible masked token whose confidence ≥ `threshold`, at least one per
  step; `steps` is then only a cap, so confident models spend fewer forward passes.

All per-sample work happens in the frame of the generated span ([B, length]), so the random draws
of a sample do not depend on the other prompts' lengths: a batch gives what its samples give alone.
"""

from __future__ import annotations

import math

import torch

from diffuse.errors import DiffuseError
from diffuse.registry import SAMPLERS
from diffuse.sampling.base import RowCost, SampleOutput, masked_canvas, row_generators, sample_tokens, trim_at_eos
from diffuse.sampling.masked import RemaskSampler, top_k_rows


@SAMPLERS.register("llada")
class LLaDASampler(RemaskSampler):
    def __init__(self, steps: int = 64, block_length: int | None = 32, schedule: str = "linear",
                 temperature: float = 1.0, remasking: str = "low_confidence", cfg_scale: float = 0.0,
                 eps: float = 1e-3):
        super().__init__(steps, schedule, temperature, eps, remasking)
        if block_length is not None and int(block_length) <= 0:
            raise DiffuseError(f"sampler.block_length={block_length} must be positive (or null: one block)")
        if cfg_scale < 0:
            raise DiffuseError(f"sampler.cfg_scale={cfg_scale} must be ≥ 0")
        self.block_length = None if block_length is None else int(block_length)
        self.cfg_scale = float(cfg_scale)

    def blocks(self, length: int) -> list[tuple[int, int, int]]:
        """(start, end, steps) per block; steps split as evenly as possible, earlier blocks first."""
        size = min(self.block_length or length, length)
        n = math.ceil(length / size)
        if self.steps < n:
            raise DiffuseError(f"sampler.steps={self.steps} is fewer than the {n} blocks of "
                               f"sampler.block_length={size} in a length of {length}")
        per, extra = divmod(self.steps, n)
        return [(b * size, min(length, (b + 1) * size), per + (b < extra)) for b in range(n)]

    @torch.no_grad()
    def generate(self, backbone, objective, prompts, length, seed=0) -> SampleOutput:
        special = objective.special
        device = next(backbone.parameters()).device
        canvas, seg, starts = masked_canvas(prompts, length, special, device)
        span = starts[:, None] + torch.arange(length, device=device)  # canvas column of each generated slot
        in_prompt = (torch.arange(canvas.shape[1], device=device) < starts[:, None]) & (canvas != special.bos)
        gens = row_generators(seed, len(prompts), device)
        reusable = not getattr(backbone, "time_conditioned", False)
        nfe, logp, row_cost = 0, None, RowCost(len(prompts), reusable, device)

        def predict(x, t):
            """Log-probs [B, length, V] for the generated span, and the forward passes it cost."""
            z = canvas.scatter(1, span, x)
            cond = take_span(objective.predict(backbone, z, t, {"segment_ids": seg}), span)
            if self.cfg_scale == 0:
                return cond, 1
            z_un = z.masked_fill(in_prompt, special.mask)
            un = take_span(objective.predict(backbone, z_un, t, {"segment_ids": seg}), span)
            guided = (un + (self.cfg_scale + 1.0) * (cond - un)).nan_to_num(nan=float("-inf"))
            return guided.log_softmax(-1), 2

        x = torch.full((len(prompts), length), special.mask, dtype=torch.long, device=device)
        for lo, hi, steps in self.blocks(length):
            in_block = torch.zeros(length, dtype=torch.bool, device=device)
            in_block[lo:hi] = True
            grid = self.schedule.grid(steps, self.eps, device)
            for i in range(steps):
                masked = (x == special.mask) & in_block
                active = masked.any(1)  # rows still decoding this block; the others wait for the batch
                if not active.any():
                    break
                if logp is None or not reusable:
                    logp, cost = predict(x, grid[i].float().expand(len(prompts), 1))
                    nfe += cost
                    row_cost.forward(active, cost)
                proposal = sample_tokens(logp, self.temperature, gens, active=active)
                reveal = self.choose(masked, proposal, logp, grid[i], grid[i + 1], gens, last=i == steps - 1) & masked
                if reveal.any():
                    x = torch.where(reveal, proposal, x)
                    logp = None  # the input changed: the next step needs a fresh forward pass
                    row_cost.changed(reveal.any(1))
        tokens, lengths = trim_at_eos(x, special)
        return SampleOutput(tokens, lengths, nfe, [list(p) for p in prompts], row_cost.per_row)


def take_span(values: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """values[b, span[b, j]] for every row b and generated slot j: [B, W, V] → [B, length, V]."""
    return values.gather(1, span[..., None].expand(-1, -1, values.shape[-1]))


@SAMPLERS.register("threshold")
class ThresholdSampler(LLaDASampler):
    """Parallel decoding: every eligible masked token with confidence ≥ `threshold` is committed, and
    at least the most confident one per step; the last step of a block commits the rest."""

    def __init__(self, threshold: float = 0.9, steps: int = 64, block_length: int | None = None,
                 temperature: float = 1.0, cfg_scale: float = 0.0, eps: float = 1e-3):
        super().__init__(steps, block_length, "linear", temperature, "low_confidence", cfg_scale, eps)
        if not 0.0 < threshold <= 1.0:
            raise DiffuseError(f"sampler.threshold={threshold} must lie in (0, 1]")
        self.threshold = float(threshold)

    def choose(self, masked, proposal, logp, t, s, gens, last):
        if last:
            return masked
        conf = logp.gather(-1, proposal[..., None]).squeeze(-1).exp()
        reveal = masked & (conf >= self.threshold)
        stalled = masked.any(1) & ~reveal.any(1)
        best = top_k_rows(conf.masked_fill(~masked, float("-inf")), stalled.long())
        return reveal | (best & masked)
