"""What samplers share: the output record, per-row random streams, the prompt canvas, EOS trimming.

Every sampler returns tokens and the number of forward passes (NFE). Randomness is drawn row by row
from one generator per sample, so a batch gives exactly what the same samples give one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffuse.errors import DiffuseError


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # [B, L] generated tokens only (prompt excluded), pad after the first EOS
    lengths: torch.Tensor  # [B] tokens before the first EOS
    nfe: int  # forward passes of the network for the whole batch
    prompts: list[list[int]]


def row_generators(seed: int, n: int, device) -> list[torch.Generator]:
    # row i of a batch drawn with `seed` is the single sample drawn with `seed + i`, so chunking a
    # request into batches of any size (diffuse.sample passes seed + chunk start) gives the same samples
    return [torch.Generator(device=device).manual_seed(seed + i) for i in range(n)]


def rand_rows(gens: list[torch.Generator], shape: tuple, device) -> torch.Tensor:
    return torch.stack([torch.rand(shape, generator=g, device=device) for g in gens])


def gumbel_rows(gens, shape, device) -> torch.Tensor:
    u = rand_rows(gens, shape, device).clamp_(1e-20, 1.0)
    return -torch.log(-torch.log(u))


def sample_tokens(logp: torch.Tensor, temperature: float, gens) -> torch.Tensor:
    """Draw from softmax(logp / T) with the Gumbel-max trick (T = 0: argmax)."""
    if temperature <= 0:
        return logp.argmax(-1)
    g = gumbel_rows(gens, logp.shape[1:], logp.device)
    return (logp / temperature + g).argmax(-1)


def masked_canvas(prompts: list[list[int]], length: int, special, device):
    """Rows [BOS, prompt…, MASK × length, PAD…] right-padded to one width, with segment ids
    (0 on padding, so it is invisible to the others). Returns ids, segment_ids, generation start per row."""
    if length <= 0:
        raise DiffuseError(f"sampler length={length} must be positive")
    heads = [[special.bos] + list(p) for p in prompts]
    width = max(len(h) for h in heads) + length
    ids = torch.full((len(heads), width), special.pad, dtype=torch.long, device=device)
    seg = torch.zeros_like(ids)
    for r, h in enumerate(heads):
        ids[r, : len(h)] = torch.tensor(h, device=device)
        ids[r, len(h) : len(h) + length] = special.mask
        seg[r, : len(h) + length] = 1
    starts = torch.tensor([len(h) for h in heads], device=device)
    return ids, seg, starts


def take_generated(ids: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    idx = starts[:, None] + torch.arange(length, device=ids.device)
    return ids.gather(1, idx)


def trim_at_eos(tokens: torch.Tensor, special) -> tuple[torch.Tensor, torch.Tensor]:
    """Everything after the first EOS becomes PAD; lengths count the tokens before it."""
    is_eos = tokens == special.eos
    after = is_eos.cumsum(1) > 0
    lengths = (~after).sum(1)
    return tokens.masked_fill(after, special.pad), lengths


class Sampler:
    """Base: `steps`, step `schedule` name, `temperature`; subclasses implement `generate`."""

    needs_causal = False  # True for samplers of autoregressive models
    sample_space = "tokens"  # what the reverse process moves through: tokens, or embeddings (ddim)

    @classmethod
    def compatible(cls, objective) -> bool:
        return objective.causal == cls.needs_causal and getattr(objective, "sample_space", "tokens") == cls.sample_space
