"""Left-to-right sampling for autoregressive models, with temperature / top-k / top-p.

Uses the backbone's cache (a static KV cache sized prompt width + length for the transformer, the
recurrent state for mamba2) when it has one, so each new token costs one position; prompts of different lengths are left-padded with invisible padding.
"""

from __future__ import annotations

import torch

from diffuse.contracts import AUTOREGRESSIVE, new_cache
from diffuse.registry import SAMPLERS
from diffuse.sampling.base import (
    SampleOutput,
    check_temperature,
    check_truncation,
    left_padded,
    row_generators,
    sample_tokens,
    trim_at_eos,
    truncate,
)
from diffuse.sampling.trace import recorder


@SAMPLERS.register("ar")
class ARSampler:
    """One forward pass per token (no `steps`, no step schedule); defaults as conf/sampler/ar.yaml."""

    processes = (AUTOREGRESSIVE,)
    requires = ()  # `special` only (every Objective has it)
    any_length = False  # positions past data.seq_len were never trained

    def __init__(self, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None):
        self.temperature, self.top_k, self.top_p = check_temperature(temperature), *check_truncation(top_k, top_p)

    @torch.no_grad()
    def generate(self, backbone, objective, prompts, length, seed=0) -> SampleOutput:
        special = objective.special
        device = next(backbone.parameters()).device
        ids, seg = left_padded(prompts, special, device)  # every row's next token sits in the last column
        width = ids.shape[1]
        gens = row_generators(seed, len(prompts), device)
        # room for the prompt and every token generated (the last one is never fed back)
        cache = new_cache(backbone, width + length)
        tokens = torch.full((len(prompts), length), special.pad, dtype=torch.long, device=device)
        done, nfe = torch.zeros(len(prompts), dtype=torch.bool, device=device), 0
        rec = recorder(self)  # OFF unless traced (sampling/trace.py)
        row_nfe = torch.zeros(len(prompts), dtype=torch.long, device=device)
        positions = 0
        step_ids, step_seg = ids, seg
        for i in range(length):
            if cache is None:  # no cache: re-run the whole prefix
                step_ids = torch.cat([ids, tokens[:, :i]], 1)
                step_seg = torch.cat([seg, torch.ones_like(tokens[:, :i])], 1)
            hidden = backbone(ids=step_ids, segment_ids=step_seg, causal=True, **({"cache": cache} if cache is not None else {}))
            nfe += 1
            positions += step_ids.shape[1]
            row_nfe += ~done  # alone, a row stops at its own EOS
            logits = backbone.logits(hidden[:, -1:]).float()
            logits[..., special.mask] = float("-inf")
            logp = logits.log_softmax(-1)
            nxt = sample_tokens(truncate(logp, self.top_k, self.top_p), self.temperature, gens)[:, 0]
            nxt = nxt.masked_fill(done, special.pad)
            tokens[:, i] = nxt
            rec.step(tokens, nfe=nfe, committed=lambda: ~done[:, None], logp=logp, proposal=nxt[:, None],
                     columns=slice(i, i + 1))
            done |= nxt == special.eos
            if done.all():
                break
            step_ids, step_seg = nxt[:, None], torch.ones_like(nxt[:, None])
        tokens, lengths = trim_at_eos(tokens, special)
        return SampleOutput(tokens, lengths, nfe, [list(p) for p in prompts], row_nfe, positions)
