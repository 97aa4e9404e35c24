"""Entropy-bounded acceptance (EB-sampler, Ben-Hamu et al., arXiv 2505.24857) and DiffusionGemma's decode loop
for uniform-state models (`sampler=entropy_bound`).

The rule (`base.eb_accept`): sort a row's eligible positions by entropy H ascending and accept the largest k with

    Σ_{i≤k} H_i − max_{i≤k} H_i ≤ γ        (at least one: k = 1 always passes)

— the sum bounds the joint dependence of the accepted tokens, so they are nearly independent given the canvas.
Masked models commit the accepted (`sampler=eb`, absorbing.py's `EntropyBounded`); the loop below keeps them.

The loop, per canvas (one block of `block_size` for a block-causal objective; the whole generation otherwise),
as transformers' `DiffusionGemmaGenerationMixin.generate` runs it (generation_diffusion_gemma.py), step n = N … 1:

    canvas ← U{0 … V−1}^L                                   (before the first step)
    z = logits(canvas) / T_n,   T_n = t_min + (t_max − t_min)·n/N   (t_max first; the last step is at n = 1)
    candidate ~ softmax(z) per position;  A = eb_accept(H(softmax z), γ)
    canvas ← candidate on A, fresh U{0 … V−1} tokens elsewhere
    stop when argmax z has equalled the argmax of each of the last s steps (s = `stability_threshold`)
    and the mean of H over the canvas is below c (`confidence_threshold`); either null: no early stop
    commit argmax z of the row's last step

Self-conditioning (contracts.SelfConditioned): the next step's pass reads softmax(z) of this one (none on a
canvas's first step), DiffusionGemma's `self_conditioning_logits` (the temperature-scaled logits). A
time-conditioned backbone reads t = n/N (1 on the all-noise canvas; the loop itself has no time grid).

RNG order, per row, from the row's own generator: the canvas (`torch.randint(0, V, (1, L))`), then on every
step `torch.multinomial(probs.view(-1, V), 1)` (float32 probabilities) then the renoising `torch.randint(0, V,
(1, L))` — transformers' calls on its global generator, in its order and shapes, so a single row seeded as
`torch.manual_seed(seed)` there reproduces `generate` here (tests/test_entropy_bound.py). A row that stopped
draws nothing more (batch = singles); transformers draws for every row of its batch, so only batch 1 matches.
A backbone with its own encoder and canvas passes (contracts.EncodesCanvas: model=diffusion_gemma) is decoded by
sampling/encoder_canvas.py instead, with transformers' one generator for the batch (any batch matches there).
Differences that are not decisions: EOS and what follows it become PAD and `lengths` count the tokens before it
(sampling/base.trim_at_eos; transformers keeps the EOS), and `row_nfe` counts the passes that write a finished
canvas to the cache (transformers' tokens_per_forward counts denoising passes only: `Denoised.steps`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from diffuse.contracts import BLOCK_UNIFORM, UNIFORM, EncodesCanvas, block_size_of, is_self_conditioned
from diffuse.core.checks import check_order, check_range
from diffuse.errors import DiffuseError
from diffuse.registry import SAMPLERS
from diffuse.sampling.base import (  # noqa: F401 (eb_accept, token_entropy: the rule's home is base.py)
    RowCost,
    SampleOutput,
    eb_accept,
    left_padded,
    masked_canvas,
    row_generators,
    token_entropy,
    trim_at_eos,
)
from diffuse.sampling.block import BlockWalk  # the block runners (exact KV cache, or none) and their loop
from diffuse.sampling.encoder_canvas import (  # model=diffusion_gemma's loop (EncodesCanvas); the T schedule
    denoise_canvases,
    temperature_at,
)
from diffuse.sampling.trace import OFF, recorder


@dataclass
class Step:
    canvas: torch.Tensor  # [1, L] the next canvas: the accepted candidates, fresh noise elsewhere
    accepted: torch.Tensor  # [1, L] bool
    argmax: torch.Tensor  # [1, L] argmax of the scaled logits: what the row commits if it stops here
    logits: torch.Tensor  # [1, L, V] the temperature-scaled logits (self-conditioning reads their softmax)
    entropy: torch.Tensor  # [1, L] entropy of softmax(scaled logits)


def eb_step(logits: torch.Tensor, temperature: torch.Tensor | float, gamma: float, generator: torch.Generator) -> Step:
    """One denoising step of one row (module docstring): `logits` [1, L, V] of the current canvas. Draws, from
    `generator`: the candidates (multinomial), then the renoising tokens (randint over V = logits.shape[-1])."""
    z = logits / temperature
    V = z.shape[-1]
    probs = torch.softmax(z, dim=-1, dtype=torch.float32)
    candidate = torch.multinomial(probs.view(-1, V), 1, generator=generator).view(z.shape[:-1])
    h = token_entropy(z)
    accepted = eb_accept(h, gamma)
    noise = torch.randint(0, V, tuple(z.shape[:-1]), generator=generator, device=z.device)
    return Step(torch.where(accepted, candidate, noise), accepted, z.argmax(-1), z, h)


class StableAndConfident:
    """Early stopping of one row's canvas: the argmax canvas equals that of each of the last `stable` steps and
    the mean entropy is below `confidence`."""

    def __init__(self, stable: int, confidence: float):
        self.stable, self.confidence, self.history = stable, confidence, []

    def __call__(self, argmax: torch.Tensor, entropy: torch.Tensor) -> bool:
        steady = len(self.history) >= self.stable and all(torch.equal(a, argmax) for a in self.history)
        if self.stable:
            self.history = (self.history + [argmax])[-self.stable:]
        return steady and bool(entropy.mean() < self.confidence)


@dataclass
class Denoised:
    tokens: torch.Tensor  # [B, L] the committed argmax canvas (rows that did not decode: zeros)
    steps: torch.Tensor  # [B] denoising passes each row ran (alone)


# (canvas [B, L], probabilities of the previous step [B, L, V] or None, n steps left) → logits [B, L, V]
Logits = Callable[[torch.Tensor, torch.Tensor | None, int], torch.Tensor]


class EntropyBoundLoop:
    """The per-canvas loop of the module docstring over any network (`Logits`), one generator per row; its
    settings (and `eb_step`'s rule) also drive sampling/encoder_canvas.py's batch-generator loop."""

    def __init__(self, gamma: float, steps: int, t_min: float, t_max: float,
                 stability_threshold: int | None, confidence_threshold: float | None):
        check_range("sampler.gamma", gamma, 0)
        check_range("sampler.steps", steps, 1, integer=True)
        check_range("sampler.t_min", t_min, 0)
        check_range("sampler.t_max", t_max, 0, low_open=True)
        check_order("sampler.t_min", t_min, "sampler.t_max", t_max)
        check_range("sampler.stability_threshold", stability_threshold, 0, integer=True, null="no early stop")
        check_range("sampler.confidence_threshold", confidence_threshold, 0, low_open=True, null="no early stop")
        self.gamma, self.steps, self.t_min, self.t_max = float(gamma), int(steps), float(t_min), float(t_max)
        self.early_stop = stability_threshold is not None and confidence_threshold is not None
        self.stable, self.confidence = stability_threshold, confidence_threshold

    def denoise(self, logits_of: Logits, rows: torch.Tensor, length: int, vocab: int, gens, device,
                on_step=None) -> Denoised:
        """Denoise one canvas of `length` for the `rows` [B] bool that decode it (the others draw nothing and
        return zeros); the network runs for the whole batch until its slowest row stops."""
        B = rows.shape[0]
        canvas = torch.zeros(B, length, dtype=torch.long, device=device)
        for r in rows.nonzero().squeeze(1).tolist():
            canvas[r] = torch.randint(0, vocab, (1, length), generator=gens[r], device=device)[0]
        tokens, steps = canvas.clone(), torch.zeros(B, dtype=torch.long, device=device)
        stops = [StableAndConfident(self.stable, self.confidence) if self.early_stop else None for _ in range(B)]
        active, prev = rows.clone(), None
        for left in range(self.steps, 0, -1):
            logits = logits_of(canvas, prev, left)
            steps += active
            T = temperature_at(left, self.steps, self.t_min, self.t_max)
            accepted = torch.zeros(B, length, dtype=torch.bool, device=device)
            for r in active.nonzero().squeeze(1).tolist():
                step = eb_step(logits[r:r + 1], T, self.gamma, gens[r])
                canvas[r], tokens[r], accepted[r] = step.canvas[0], step.argmax[0], step.accepted[0]
                probs = step.logits[0].softmax(-1)
                if prev is None:
                    prev = torch.zeros(B, *probs.shape, dtype=probs.dtype, device=device)
                prev[r] = probs  # a stopped row keeps its last (it rides along on the batch's passes)
                if stops[r] is not None and stops[r](step.argmax[0], step.entropy[0]):
                    active[r] = False
            if on_step is not None:
                on_step(canvas, accepted, logits, T)
            if not active.any():
                break
        return Denoised(tokens, steps)


@SAMPLERS.register("entropy_bound")
class EntropyBoundSampler:
    """DiffusionGemma's decoding (module docstring) for uniform-state objectives: block by block with the exact
    KV cache for a block-causal one (objective.block_size, as sampler=block), else one canvas of the whole
    generation after [BOS, prompt…]. A row stops at the end of the canvas holding its first EOS."""

    processes = (UNIFORM, BLOCK_UNIFORM)
    requires = ()  # the backbone's logits only
    any_length = False  # as sampler=uniform_ancestral: past data.seq_len only with +beyond_context=true

    def __init__(self, gamma: float = 0.1, steps: int = 48, t_min: float = 0.4, t_max: float = 0.8,
                 stability_threshold: int | None = 1, confidence_threshold: float | None = 0.005,
                 use_cache: bool | None = None):
        self.loop = EntropyBoundLoop(gamma, steps, t_min, t_max, stability_threshold, confidence_threshold)
        self.use_cache = use_cache

    @torch.no_grad()
    def generate(self, backbone, objective, prompts, length, seed=0) -> SampleOutput:
        if length <= 0:
            raise DiffuseError(f"sampler length={length} must be positive")
        if isinstance(backbone, EncodesCanvas):  # model=diffusion_gemma: encoder + canvas passes, transformers' batch RNG
            stop = self.loop.early_stop and (lambda: StableAndConfident(self.loop.stable, self.loop.confidence))
            return denoise_canvases(backbone, prompts, length, objective.special, self.loop, seed, stop or None,
                                    recorder(self))
        special, device, B = objective.special, next(backbone.parameters()).device, len(prompts)
        gens, rec = row_generators(seed, B, device), recorder(self)
        size = block_size_of(objective)
        if size:
            return self._blocks(backbone, objective, prompts, length, size, gens, rec)
        ids, seg, starts = masked_canvas(prompts, length, special, device)
        span = starts[:, None] + torch.arange(length, device=device)
        cost, nfe = RowCost(B, False, device), 0

        def logits_of(canvas, prev, left):
            nonlocal nfe
            nfe += 1
            extra = {}
            if prev is not None and is_self_conditioned(backbone):
                full = prev.new_zeros(*ids.shape, prev.shape[-1])
                extra["prev_probs"] = full.scatter(1, span[..., None].expand(-1, -1, prev.shape[-1]), prev)
            t = torch.full((B,), left / self.loop.steps, device=device)
            hidden = backbone(ids=ids.scatter(1, span, canvas), segment_ids=seg, t=t, **extra)
            return backbone.logits(hidden).gather(1, span[..., None].expand(-1, -1, backbone.vocab_size))

        out = self.loop.denoise(logits_of, torch.ones(B, dtype=torch.bool, device=device), length,
                                backbone.vocab_size, gens, device, self._trace(rec, slice(0, length), lambda: nfe, lambda c: c))
        cost.per_row += out.steps
        tokens, lengths = trim_at_eos(out.tokens, special)
        return SampleOutput(tokens, lengths, nfe, [list(p) for p in prompts], cost.per_row, nfe * ids.shape[1])

    def _blocks(self, backbone, objective, prompts, length, size, gens, rec) -> SampleOutput:
        special = objective.special
        walk = BlockWalk(backbone, prompts, special, size, length, special.pad, self.use_cache)
        x, run, cost, done = walk.x, walk.run, walk.cost, walk.done
        device = x.device
        self_cond = is_self_conditioned(backbone)  # the block runners place the block's prev_probs
        for lo, hi in walk.blocks():

            def logits_of(canvas, prev, left, lo=lo, hi=hi):
                x[:, lo:hi] = canvas
                return backbone.logits(run.block(x, lo, hi, left / self.loop.steps, prev if self_cond else None))

            out = self.loop.denoise(logits_of, ~done, hi - lo, backbone.vocab_size, gens, device,
                                    self._trace(rec, slice(lo, hi), lambda: run.nfe,
                                                lambda c, lo=lo, hi=hi: torch.cat([x[:, :lo], c, x[:, hi:]], 1)))
            cost.per_row += out.steps
            x[:, lo:hi] = torch.where(done[:, None], special.pad, out.tokens)
        return walk.output(x)

    @staticmethod
    def _trace(rec, columns: slice, nfe, place):
        """The loop's per-step hook for sampling/trace.py while a recording is open (None otherwise: no work);
        `place`: the canvas [B, b] → the generated span [B, length] with it in `columns`."""
        if rec is OFF:
            return None

        def on_step(canvas, accepted, logits, T):
            rec.step(place(canvas), nfe=nfe(), committed=accepted, renoised=~accepted,
                     logp=(logits.float() / T).log_softmax(-1), columns=columns)
        return on_step
