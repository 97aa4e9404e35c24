"""What every objective shares: the output of a loss, the special token ids, antithetic time draws, the
positions a noise process may corrupt.

An objective is a torch `nn.Module` (the contract is `Objective` in diffuse/contracts.py): class-declared
`process`, `causal`, `default_sampler` (or properties derived from the configuration, never written on the
instance: block diffusion's), an instance attribute `global_step` that DiffusionLM
sets before every training step, and `loss(backbone, batch, generator, train) -> LossOutput`. Objectives
with a noise process also give the hooks of `NoisingObjective` (`sample_t`, `draw_noise`, `corrupt`,
`predict`, `still_noisy`, `noise_level`, `distance`), which the consistency regularizer, the gradient
analysis and the samplers use. The absorbing-state family shares them in objectives/absorbing.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diffuse.contracts import is_self_conditioned
from diffuse.core.noise import batch_strata
from diffuse.models.layers import BlockLayout


@dataclass(frozen=True)
class SpecialTokens:
    pad: int
    bos: int
    eos: int
    mask: int

    @classmethod
    def from_tokenizer(cls, tok) -> "SpecialTokens":
        return cls(tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.mask_token_id)


@dataclass
class LossOutput:
    """`loss` is what is optimised; `nll_sum / n_tokens` is the per-token NLL bound (nats) that
    becomes val/nelbo. `metrics` are extra scalars; `token_*` (optional) are per-predicted-token
    correctness, confidence and corruption level for the bucketed metrics."""

    loss: torch.Tensor
    nll_sum: torch.Tensor
    n_tokens: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    token_correct: torch.Tensor | None = None
    token_confidence: torch.Tensor | None = None
    token_level: torch.Tensor | None = None


def antithetic_uniform(n: int, device, generator=None, shape_tail: tuple = ()) -> torch.Tensor:
    """n stratified draws on [0, 1): one shared offset plus i/n (lower variance than i.i.d.); with a
    sharded generator, this rank's rows of the global batch's strata (diffuse/core/noise.py)."""
    u0 = torch.rand((1, *shape_tail), device=device, generator=generator)
    strata = batch_strata(n, generator, device=device, dtype=u0.dtype).reshape(n, *([1] * len(shape_tail)))
    return (u0 + strata) % 1.0


def noisable_positions(batch, given: tuple[int | None, ...], prompt_given: bool = True) -> torch.Tensor:
    """[B, L] bool: the positions a noise process may corrupt, i.e. real tokens (segment > 0) other than the
    `given` token ids (BOS, for every objective; LLaDA adds PAD and EOS) and, with `prompt_given`, other than
    the prompt (`batch["prompt_mask"]`, SFT). The others are always given, never predicted."""
    ids = batch["input_ids"]
    given = [g for g in given if g is not None]
    out = batch["segment_ids"] > 0
    if len(given) == 1:
        out = out & (ids != given[0])
    elif given:
        out = out & ~torch.isin(ids, torch.tensor(given, device=ids.device))
    if prompt_given and batch.get("prompt_mask") is not None:
        out &= ~batch["prompt_mask"].bool()
    return out


def predicted_token_stats(logits: torch.Tensor, targets: torch.Tensor, where: torch.Tensor):
    """Correctness and confidence (max probability) of the argmax at the `where` positions."""
    with torch.no_grad():
        probs = logits[where].float().softmax(-1)
        conf, pred = probs.max(-1)
        return (pred == targets[where]).float(), conf


def per_block_uniform(x0: torch.Tensor, block_size: int, generator=None) -> torch.Tensor:
    """[B, L] antithetic u ∈ [0, 1): one draw per block of `block_size` tokens (BD3LM: a t per block), stratified over
    the batch block by block, repeated over the block's tokens."""
    n_blocks = -(-x0.shape[1] // block_size)
    u = antithetic_uniform(x0.shape[0], x0.device, generator, (n_blocks,))
    return u.repeat_interleave(block_size, dim=1)[:, : x0.shape[1]]


def noisy_and_clean_hidden(backbone, z: torch.Tensor, t: torch.Tensor, batch, block_size: int,
                           prev_probs: torch.Tensor | None = None) -> torch.Tensor:
    """Block diffusion (BD3LM): the network reads [z ; x0] (2L positions) under BlockLayout.noisy_and_clean, so a
    noisy block sees itself and the clean blocks before it; returns the noisy half's hidden states [B, L, D].
    `prev_probs` (self-conditioning, [B, L, V]) is given to the noisy half, zeros (nothing) to the clean one."""
    B, L = z.shape
    seg = batch.get("segment_ids")
    t_tok = t.expand(B, L) if t.dim() == 2 else t.reshape(B, 1).expand(B, L)  # t per token (t_range: [B, 1])
    t_in = torch.cat([t_tok, torch.zeros_like(t_tok)], 1)  # the clean copy is at t = 0
    layout = BlockLayout.noisy_and_clean(L, block_size, z.device)
    extra = {} if prev_probs is None else {"prev_probs": torch.cat([prev_probs, torch.zeros_like(prev_probs)], 1)}
    h = backbone(ids=torch.cat([z, batch["input_ids"]], 1), t=t_in,
                 segment_ids=None if seg is None else seg.repeat(1, 2), layout=layout, **extra)
    return h[:, :L]


SELF_CONDITION_RATE = 0.5  # training: the share of steps that run the first (no-grad) pass


def self_condition_probs(backbone, first_pass, generator=None, train: bool = True, to_probs=None) -> torch.Tensor | None:
    """Self-conditioning (Chen et al. 2022, arXiv 2208.04202; DESIGN §7): softmax of the logits of a first pass
    without gradient, which the second pass reads (`backbone(..., prev_probs=…)`); None (the network adds nothing)
    for a backbone without it, and in training on the other half of the steps. `first_pass()` returns hidden
    states [B, L, D]; `to_probs(logits)` their distribution (default softmax; the absorbing family's is SUBS, as its
    samplers pass it). One coin per batch (one host sync a step, only for self-conditioned backbones); validation
    always runs both passes, so val/nelbo is the bound of the two-pass network, which is a function of z_t alone."""
    if not is_self_conditioned(backbone):
        return None
    if train:
        coin = torch.rand((), generator=generator, device=generator.device if generator is not None else None)
        if float(coin) >= SELF_CONDITION_RATE:
            return None
    with torch.no_grad():
        logits = backbone.logits(first_pass())
        return to_probs(logits) if to_probs is not None else logits.float().softmax(-1)
