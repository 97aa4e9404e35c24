"""Duo's ancestral sampler for uniform-state diffusion (objective=uniform; Duo, arXiv 2506.10892, `_ancestral_update`).

The generated span starts as uniformly random tokens after [BOS, prompt…]. On a grid t_0 = 1 > … > t_N = 0 (uniform
in t, N = `steps`), step t → s runs the network once on the canvas z_t and draws every generated position anew from
the exact posterior with the prediction plugged in (objectives/uniform.py `uniform_posterior`, Duo's
`_compute_posterior`):

    z_s ~ q(z_s | z_t, x = x_θ(z_t, t)),   x_θ = softmax(logits / T), then top-k / top-p

from the objective (`UniformState.posterior`: the α(t) of the process the model was trained on). The last step lands at s = 0
(α = 1), where the posterior is x_θ tilted towards z_t: it is Duo's noise-removal step, so N steps cost N passes.
Any position may change on any step (no commitment). A self-conditioned backbone reads the softmax of the previous
step's logits (nothing on the first step).

With objective.block_size the span is decoded block by block (`generate_blocks`), each block as above on its own
grid, over sampler=block's exact KV cache of the committed prefix.

Batch = singles: every draw (the starting canvas, each step's posterior) comes from the row's own generator
(base.row_generators) in the frame of the generated span; padding is invisible (segment 0) to the other rows.
"""

from __future__ import annotations

import torch

from diffuse.contracts import (
    BLOCK_UNIFORM,
    UNIFORM,
    UniformState,
    block_size_of,
    is_self_conditioned,
)
from diffuse.core.checks import check_range
from diffuse.registry import SAMPLERS
from diffuse.sampling.base import (
    SampleOutput,
    check_temperature,
    check_truncation,
    draw,
    masked_canvas,
    rand_rows,
    row_generators,
    take_generated,
    trim_at_eos,
    truncate,
)
from diffuse.sampling.block import BlockWalk
from diffuse.sampling.trace import recorder


def random_tokens(gens, length: int, vocab: int, device) -> torch.Tensor:
    """[B, length] tokens uniform over the vocabulary, from each row's generator."""
    return (rand_rows(gens, (length,), device) * vocab).long().clamp_max(vocab - 1)


@SAMPLERS.register("uniform_ancestral")
class UniformAncestralSampler:
    processes = (UNIFORM, BLOCK_UNIFORM)
    requires = (UniformState,)  # the objective's exact posterior
    any_length = False

    def __init__(self, steps: int = 64, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None):
        self.steps = check_range("sampler.steps", steps, 1, integer=True)
        self.temperature = check_temperature(temperature)
        self.top_k, self.top_p = check_truncation(top_k, top_p)

    def x_theta(self, logits: torch.Tensor) -> torch.Tensor:
        """The denoiser's distribution the posterior plugs in: temperature (0: the argmax, one-hot), then truncation."""
        logits = logits.float()
        if self.temperature == 0:
            return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        return truncate((logits / self.temperature).log_softmax(-1), self.top_k, self.top_p).softmax(-1)

    @torch.no_grad()
    def generate(self, backbone, objective, prompts, length, seed=0) -> SampleOutput:
        if block_size_of(objective):
            return self.generate_blocks(backbone, objective, prompts, length, seed, block_size_of(objective))
        special = objective.special
        device = next(backbone.parameters()).device
        vocab = backbone.vocab_size
        ids, seg, starts = masked_canvas(prompts, length, special, device)
        gens = row_generators(seed, len(prompts), device)
        cols = starts[:, None] + torch.arange(length, device=device)  # the generated span's columns per row
        ids.scatter_(1, cols, random_tokens(gens, length, vocab, device))
        grid = torch.linspace(1.0, 0.0, self.steps + 1, dtype=torch.float64, device=device)
        self_cond = is_self_conditioned(backbone)
        prev, rec = None, recorder(self)
        for i in range(self.steps):
            t, s = grid[i], grid[i + 1]
            extra = {"prev_probs": prev} if prev is not None else {}
            logits = backbone.logits(backbone(ids=ids, t=t.float().expand(len(prompts)), segment_ids=seg, **extra))
            if self_cond:
                prev = logits.float().softmax(-1)
            z = take_generated(ids, starts, length)
            x = self.x_theta(logits.gather(1, cols[..., None].expand(-1, -1, logits.shape[-1])))
            q = objective.posterior(x.double(), z, s.expand(z.shape), t.expand(z.shape))
            new = draw(q, rand_rows(gens, (length,), device))
            ids.scatter_(1, cols, new)
            rec.step(new, nfe=i + 1, renoised=new != z, committed=(lambda z=z: torch.zeros_like(z, dtype=torch.bool))
                     if i < self.steps - 1 else None, logp=lambda q=q: q.clamp_min(1e-30).log(), t=float(t))
        tokens, lengths = trim_at_eos(take_generated(ids, starts, length), special)
        return SampleOutput(tokens, lengths, self.steps, [list(p) for p in prompts],
                            positions=self.steps * ids.shape[1])

    def generate_blocks(self, backbone, objective, prompts, length, seed, size) -> SampleOutput:
        """Block diffusion (objective.block_size): blocks of `size` left to right, each from random tokens through
        `steps` posterior steps on its own grid 1 → 0, reading the committed prefix through sampler=block's exact
        KV cache (or the uncached block-causal canvas for a backbone without one: the same tokens). A row stops
        after the block holding its first EOS. A self-conditioned backbone reads the block's previous step."""
        special, B = objective.special, len(prompts)
        walk = BlockWalk(backbone, prompts, special, size, length, special.pad)
        x, run, cost, done = walk.x, walk.run, walk.cost, walk.done
        device = x.device
        gens = row_generators(seed, B, device)
        grid = torch.linspace(1.0, 0.0, self.steps + 1, dtype=torch.float64, device=device)
        rec, self_cond = recorder(self), is_self_conditioned(backbone)
        for lo, hi in walk.blocks():
            active, prev = ~done, None
            start = (rand_rows(gens, (hi - lo,), device, active=active) * backbone.vocab_size).long()
            x[:, lo:hi] = torch.where(active[:, None], start.clamp_max(backbone.vocab_size - 1), x[:, lo:hi])
            for i in range(self.steps):
                logits = backbone.logits(run.block(x, lo, hi, float(grid[i]), prev))
                prev = logits.float().softmax(-1) if self_cond else None
                cost.forward(active)
                z = x[:, lo:hi]
                q = objective.posterior(self.x_theta(logits).double(), z, grid[i + 1].expand(z.shape),
                                        grid[i].expand(z.shape))
                new = torch.where(active[:, None], draw(q, rand_rows(gens, (hi - lo,), device, active=active)), z)
                x[:, lo:hi] = new
                rec.step(x, nfe=run.nfe, renoised=lambda new=new, z=z: new != z, committed=None if i == self.steps - 1
                         else (lambda z=z: torch.zeros_like(z, dtype=torch.bool)),
                         logp=lambda q=q: q.clamp_min(1e-30).log(), t=float(grid[i]), columns=slice(lo, hi))
        return walk.output(x)
