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

from diffuse.core.noise import batch_strata


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
