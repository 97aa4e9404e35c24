"""DiffusionGemma's decode loop over a backbone with an encoder pass and a canvas pass (contracts.EncodesCanvas):
the path of `sampler=entropy_bound` for model=diffusion_gemma.

Per canvas of C tokens: the committed tokens so far go through the causal encoder once (they join the KV cache);
the canvas starts as uniform random tokens; each of at most N steps runs the bidirectional decoder on it with the
previous step's (temperature-scaled) logits as self-conditioning, draws a candidate per position from softmax(z/T)
with T = t_min + (t_max − t_min)·n/N at step n = N…1, keeps the lowest-entropy positions whose summed entropy
minus its largest term stays ≤ γ (`gamma`, at least one), renoises every other position, and, with adaptive
stopping, freezes a row once its argmax canvas has not changed for `stability_threshold` steps and its mean entropy
is below `confidence_threshold`; the canvas commits its last argmax. A row with an EOS in a committed canvas is
finished: later canvases are PAD for it. `row_nfe` counts the denoising passes each row ran before it stopped or
finished (what transformers' `tokens_per_forward` divides by), `nfe` those of the batch; the encoder's passes show
only in `positions`.

This is transformers' `DiffusionGemmaGenerationMixin.generate` (dynamic cache) step for step, random draws
included: one generator for the batch, drawn in its order (randint canvas; per step multinomial, then randint
renoise, for every row), so `seed` here and `torch.manual_seed(seed)` before `model.generate` give the same
tokens (tests/test_diffusion_gemma.py). Unlike diffuse's other samplers a row of a batch therefore does not
equal the same prompt alone: the parity with transformers is the contract here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from diffuse.sampling.base import SampleOutput, eb_accept, left_padded, token_entropy
from diffuse.sampling.trace import OFF


def temperature_at(left: int, steps: int, t_min: float, t_max: float) -> torch.Tensor:
    """DiffusionGemma's linear schedule: `left` = n steps remaining (N … 1) → t_min + (t_max − t_min)·n/N, a
    float32 scalar computed as transformers computes it (n an int32 tensor), so the scaled logits match bit for bit."""
    return t_min + (t_max - t_min) * (torch.tensor(left, dtype=torch.int32) / steps)


@torch.no_grad()
def denoise_canvases(backbone, prompts: list[list[int]], length: int, special, loop, seed: int = 0,
                     new_stop: Callable[[], Callable] | None = None, rec=OFF) -> SampleOutput:
    """`loop`: sampler=entropy_bound's settings (gamma, steps, t_min, t_max: its EntropyBoundLoop); `new_stop`:
    one row's adaptive stopping rule, made afresh for every row and canvas (None: no early stop); `rec`: the
    sampler's trace recorder (sampling/trace.py), given every step's canvas over the generated span."""
    device = next(backbone.parameters()).device
    ids, seg = left_padded(prompts, special, device)  # [PAD…, BOS, prompt…]: the columns are the positions
    B, C, V, N = ids.shape[0], backbone.canvas_length, backbone.vocab_size, loop.steps
    gen = torch.Generator(device=device).manual_seed(seed)
    cache = backbone.new_cache(ids.shape[1] + length)
    mask = seg > 0
    new, start = ids, 0  # the tokens the encoder has not seen yet, from column `start`
    n_canvases = math.ceil(length / C)
    span = torch.full((B, n_canvases * C), special.pad, dtype=torch.long, device=device)  # what the trace shows
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    passes = torch.zeros(B, dtype=torch.long, device=device)
    nfe, positions = 0, 0
    for c in range(n_canvases):
        width = mask.shape[1]
        backbone.encode(new, mask, torch.arange(start, width, device=device)[None], cache)
        positions += B * new.shape[1]
        dec_mask = torch.cat([mask, mask.new_ones(B, C)], 1)
        dec_pos = torch.arange(width, width + C, device=device)[None]
        canvas = torch.randint(0, V, (B, C), generator=gen, device=device)
        argmax, sc_logits = canvas, None
        frozen = torch.zeros(B, dtype=torch.bool, device=device)
        stops = None if new_stop is None else [new_stop() for _ in range(B)]
        for step in range(N, 0, -1):
            passes += ~(frozen | finished)
            nfe, positions = nfe + 1, positions + B * C
            canvas, argmax, sc_logits, kept = _step(backbone, canvas, argmax, sc_logits, cache, dec_mask, dec_pos,
                                                    step, loop, gen, frozen, stops)
            span[:, c * C:(c + 1) * C] = canvas
            rec.step(span, nfe=nfe, committed=kept, renoised=lambda kept=kept: ~kept,
                     logp=lambda z=sc_logits: z.float().log_softmax(-1), columns=slice(c * C, (c + 1) * C))
            if frozen.all():
                break
        # PAD after a row's first EOS, and everywhere for a row finished earlier; the encoder reads the block so
        # padded (it changes a finished row's later canvases, and through its stopping the batch's draws)
        is_eos = argmax == special.eos
        block = argmax.masked_fill(is_eos.cumsum(1) - is_eos.long() > 0, special.pad)
        block = block.masked_fill(finished[:, None], special.pad)
        finished = finished | is_eos.any(-1) | (width + C - ids.shape[1] >= length)
        span[:, c * C:(c + 1) * C] = block
        if finished.all():
            break
        new, start, mask = block, width, dec_mask
    tokens = span[:, :(c + 1) * C]
    if tokens.shape[1] < length:
        tokens = torch.cat([tokens, tokens.new_full((B, length - tokens.shape[1]), special.pad)], 1)
    tokens = tokens[:, :length]
    lengths = (~((tokens == special.eos).cumsum(1) > 0)).sum(1)
    return SampleOutput(tokens=tokens, lengths=lengths, nfe=nfe, prompts=prompts, row_nfe=passes,
                        positions=positions)


def _step(backbone, canvas, argmax, sc_logits, cache, dec_mask, dec_pos, step, loop, gen, frozen, stops):
    """One denoising step, as transformers' `_denoising_step`; updates `frozen` in place."""
    B, C = canvas.shape
    logits = backbone.denoise(canvas, cache, dec_mask, dec_pos, self_conditioning_logits=sc_logits)
    logits = logits / temperature_at(step, loop.steps, loop.t_min, loop.t_max)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    candidate = torch.multinomial(probs.view(-1, probs.shape[-1]), 1, generator=gen).view(B, C)
    new_argmax = logits.argmax(-1)
    keep = eb_accept(token_entropy(logits), loop.gamma)  # the accepted positions (the trace's committed)
    noise = torch.randint(0, backbone.vocab_size, (B, C), generator=gen, device=canvas.device)
    new_canvas = torch.where(keep, candidate, noise)
    if stops is not None:
        if frozen.any():  # a stopped row keeps its canvas, argmax and logits
            new_argmax = torch.where(frozen[:, None], argmax, new_argmax)
            new_canvas = torch.where(frozen[:, None], canvas, new_canvas)
            logits = torch.where(frozen[:, None, None], sc_logits, logits)
        h = token_entropy(logits)
        for r, stop in enumerate(stops):  # every row, stopped or not, as transformers' batched criterion
            frozen[r] |= stop(new_argmax[r], h[r])
    return new_canvas, new_argmax, logits, keep
