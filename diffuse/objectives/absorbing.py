"""The absorbing-state ("masked") family: every token jumps to [MASK] independently with the mask
probability p(t); SUBS parameterisation (the [MASK] logit is −∞, unmasked positions copy x0 and cost
nothing). masked_discrete and llada are this class with a few hooks changed:

    mask_prob(t), t_for_mask_prob(p)   the noise level p(t) (increasing in t) and its inverse
    maskable(batch)                    the positions that may be masked (the others are always given)
    t_from_uniform(u, train)           t from the antithetic u ∈ [0, 1), with the train-time clamp
    t_tail(x0, train)                  the shape of t after the batch dim: (1,), or (L,) for a t per token
    elbo_weight(t)                     per masked token: Σ w·CE is the NLL bound behind val/nelbo
    train_weight(t, masked, maskable, batch)   per masked token: Σ w·CE is the loss that is optimised
    extra_metrics(t, masked, nll)      logged beside mask_ratio

Block diffusion (BD3LM, `block_size` b): the row is cut into blocks of b tokens from position 0; the
network reads [x_t ; x_0] (2L positions, models/layers.py BlockLayout): a noisy block sees itself and
the clean blocks before it, so the loss is the masked-diffusion NELBO of each block given the clean
prefix, summed over blocks and divided by the tokens. Each block draws its own t (antithetic over the
batch, block by block). b = L is the full-sequence model, b = 1 the autoregressive NLL in expectation
(tests/test_block_diffusion.py). Such a model decodes block by block with an exact KV cache
(sampling/block.py), and runs the `block_absorbing` process that only block samplers decode.

The loss computes the output head and the cross-entropy at the masked positions only, chunk by chunk
(objectives/losses.py); `predict` still gives the full [B, L, V] log-probabilities, for the samplers and
the consistency regularizer.
"""

from __future__ import annotations

import torch
from torch import nn

from diffuse.contracts import ABSORBING, BLOCK_ABSORBING, TakesBlockLayout
from diffuse.core.noise import batch_draw
from diffuse.errors import DiffuseError
from diffuse.objectives.base import (
    LossOutput,
    SpecialTokens,
    antithetic_uniform,
    noisable_positions,
    noisy_and_clean_hidden,
    per_block_uniform,
    self_condition_probs,
)
from diffuse.objectives.losses import selected_cross_entropy
from diffuse.schedules import Schedule


class AbsorbingObjective(nn.Module):
    causal = False
    # the sampler of the full-sequence model; a block diffusion model (`block_size` set) decodes with `block`
    full_sequence_sampler = "remask"
    trains_self_conditioning = True  # contracts.TrainsSelfConditioning: `conditioned_hidden` in the loss

    def __init__(self, schedule: Schedule, special: SpecialTokens, eps: float = 1e-3,
                 min_mask_ratio: float = 0.0, max_mask_ratio: float = 1.0, block_size: int | None = None):
        super().__init__()
        if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int)
                                       or block_size <= 0):
            raise DiffuseError(f"objective.block_size={block_size} must be a positive integer (or null: "
                               "the full-sequence model)")
        self.block_size = block_size
        if not 0.0 <= min_mask_ratio < max_mask_ratio <= 1.0:
            raise DiffuseError(
                f"objective.min_mask_ratio={min_mask_ratio} and max_mask_ratio={max_mask_ratio} "
                "must satisfy 0 ≤ min < max ≤ 1"
            )
        if not 0.0 < eps < 1.0:
            raise DiffuseError(f"objective.eps={eps} must lie in (0, 1)")
        self.schedule, self.special, self.eps = schedule, special, eps
        self.min_mask_ratio, self.max_mask_ratio = min_mask_ratio, max_mask_ratio
        self.global_step = 0

    @property
    def process(self) -> str:
        """Block diffusion is decoded block by block with an exact cache, by block samplers only."""
        return ABSORBING if self.block_size is None else BLOCK_ABSORBING

    @property
    def default_sampler(self) -> str:
        return self.full_sequence_sampler if self.block_size is None else "block"

    # -- hooks a variant changes --------------------------------------------------------------------
    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        """p(t) = 1 − α(t)."""
        return 1.0 - self.schedule.alpha(t)

    def t_for_mask_prob(self, p: float) -> float:
        return float(self.schedule.t_for_alpha(torch.tensor(1.0 - p, dtype=torch.float64)))

    def maskable(self, batch) -> torch.Tensor:
        """Real tokens other than BOS (given, as for the AR model, so both predict the same tokens)."""
        return noisable_positions(batch, (self.special.bos,), prompt_given=False)

    def t_tail(self, x0: torch.Tensor, train: bool) -> tuple[int, ...]:
        return (1,)

    def t_from_uniform(self, u: torch.Tensor, train: bool) -> torch.Tensor:
        """t ∈ [ε, 1]; in training the range shrinks so that p(t) ∈ [min_mask_ratio, max_mask_ratio]."""
        lo, hi = self.eps, 1.0
        if train:
            lo = max(lo, self.t_for_mask_prob(self.min_mask_ratio))
            hi = min(hi, self.t_for_mask_prob(self.max_mask_ratio))
        return lo + (hi - lo) * u

    def elbo_weight(self, t: torch.Tensor) -> torch.Tensor:
        """−α′(t)/(1 − α(t)) · (1 − ε): ∫_ε^1 dt = (1 − ε)·E_{t~U[ε,1]}."""
        return self.schedule.weight(t) * (1.0 - self.eps)

    def train_weight(self, t, masked, maskable, batch) -> torch.Tensor:
        """The ELBO weight over the number of maskable tokens: the loss is the per-token NELBO."""
        return self.elbo_weight(t) / maskable.sum().clamp_min(1)

    def extra_metrics(self, t, masked, nll) -> dict[str, torch.Tensor]:
        return {}

    def corruption_level(self, masked: torch.Tensor, maskable: torch.Tensor) -> torch.Tensor:
        """[B, L]: the realised mask ratio of each token's row, or of its block under block diffusion (a t per
        block: the row's average would sit near one half and empty the low/high accuracy buckets)."""
        B, L = masked.shape
        size = self.block_size or L
        pad = -L % size
        def per_block(x):
            return torch.nn.functional.pad(x.float(), (0, pad)).view(B, -1, size).sum(-1, keepdim=True)
        ratio = per_block(masked) / per_block(maskable).clamp_min(1)
        return ratio.expand(B, ratio.shape[1], size).reshape(B, -1)[:, :L]

    def check_backbone(self, backbone, model_name: str) -> None:
        """Block diffusion needs a backbone that takes a BlockLayout (the transformer does)."""
        if self.block_size is not None and not (isinstance(backbone, TakesBlockLayout) and backbone.supports_block_layout):
            raise DiffuseError(
                f"model={model_name} cannot train objective.block_size={self.block_size}: block diffusion needs "
                "block-causal attention over [x_t ; x_0], which this backbone does not take (a bidirectional "
                "scan has no block-causal form here); use model=transformer or model=hf (or objective.block_size=null)")

    # -- the forward (noising) process --------------------------------------------------------------
    def sample_t(self, x0: torch.Tensor, generator=None, train: bool = True,
                 t_range: tuple[float, float] | None = None) -> torch.Tensor:
        """Antithetic t [B, 1] (or [B, L]); `t_range` = (lo, hi): i.i.d. uniform in it, [B, 1], no clamp."""
        if t_range is not None:
            lo, hi = t_range
            return lo + (hi - lo) * torch.rand((x0.shape[0], 1), device=x0.device, generator=generator)
        tail = self.t_tail(x0, train)
        if self.block_size is not None and tail == (1,):  # a t per block, repeated over its tokens
            u = per_block_uniform(x0, self.block_size, generator)
        else:
            u = antithetic_uniform(x0.shape[0], x0.device, generator, tail)
        return self.t_from_uniform(u, train)

    def draw_noise(self, x0: torch.Tensor, generator=None) -> torch.Tensor:
        return batch_draw(torch.rand, x0.shape, generator, device=x0.device)

    def corrupt(self, x0, t, noise, batch) -> torch.Tensor:
        """Mask where noise < p(t): the same noise at two times gives nested (coupled) masks."""
        masked = (noise < self.mask_prob(t)) & self.maskable(batch)
        return torch.where(masked, torch.full_like(x0, self.special.mask), x0)

    def still_noisy(self, z: torch.Tensor) -> torch.Tensor:
        return z == self.special.mask

    def noise_level(self, t: torch.Tensor) -> torch.Tensor:
        return self.mask_prob(t)

    # -- the network's prediction -------------------------------------------------------------------
    def hidden(self, backbone, z, t, batch, prev_probs=None) -> torch.Tensor:
        """`prev_probs`: self-conditioning's previous prediction (objectives/base.py self_condition_probs)."""
        if self.block_size is None:  # else block diffusion: [x_t ; x_0] under the BD3LM mask
            t_in = t.squeeze(-1) if t.dim() == 2 and t.shape[1] == 1 else t
            extra = {} if prev_probs is None else {"prev_probs": prev_probs}
            return backbone(ids=z, t=t_in, segment_ids=batch.get("segment_ids"), **extra)
        return noisy_and_clean_hidden(backbone, z, t, batch, self.block_size, prev_probs)

    def conditioned_hidden(self, backbone, z, t, batch, generator=None, train: bool = True) -> torch.Tensor:
        """`hidden`, after self-conditioning's first pass where the backbone has it."""
        prev = self_condition_probs(backbone, lambda: self.hidden(backbone, z, t, batch), generator, train,
                                    lambda logits: self.log_probs(logits, z).exp())
        return self.hidden(backbone, z, t, batch) if prev is None else self.hidden(backbone, z, t, batch, prev)

    def predict(self, backbone, z, t, batch) -> torch.Tensor:
        """SUBS log-probabilities over x0 [B, L, V]: [MASK] impossible; unmasked positions one-hot on z. One pass: a
        self-conditioned backbone reads `batch["prev_probs"]` (a sampler's previous step), else nothing."""
        return self.log_probs(backbone.logits(self.hidden(backbone, z, t, batch, batch.get("prev_probs"))), z)

    def log_probs(self, logits: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """SUBS: the network's logits at the positions of z → log p(x0 | z) (samplers use it directly)."""
        logits = logits.float()
        logits[..., self.special.mask] = float("-inf")
        keep = (z != self.special.mask)[..., None]
        logp = torch.where(keep, float("-inf"), logits.log_softmax(-1))
        return logp.scatter_(-1, z[..., None], torch.where(keep, 0.0, float("-inf")))  # log 1 at z where kept

    def distance(self, pred, target, where) -> torch.Tensor:
        """KL(target ‖ pred) per position, on the vocabulary distribution (zero where not `where`)."""
        kl = (target.exp() * (target - pred)).nan_to_num(0.0).sum(-1)
        return kl * where

    # -- the loss -----------------------------------------------------------------------------------
    def loss(self, backbone, batch, generator=None, train: bool = True,
             t_range: tuple[float, float] | None = None) -> LossOutput:
        x0 = batch["input_ids"]
        t = self.sample_t(x0, generator, train, t_range)
        z = self.corrupt(x0, t, self.draw_noise(x0, generator), batch)
        masked, maskable = self.still_noisy(z), self.maskable(batch)
        ce = selected_cross_entropy(backbone, self.conditioned_hidden(backbone, z, t, batch, generator, train), masked, x0,
                                    self.train_weight(t, masked, maskable, batch), exclude=self.special.mask)
        nll_sum = (ce.nll * torch.broadcast_to(self.elbo_weight(t), masked.shape)[masked]).sum()
        n_tokens = maskable.sum()
        level = self.corruption_level(masked, maskable)
        return LossOutput(
            loss=ce.total,
            nll_sum=nll_sum,
            n_tokens=n_tokens,
            metrics={"mask_ratio": masked.sum() / n_tokens.clamp_min(1), **self.extra_metrics(t, masked, ce.nll)},
            token_correct=ce.correct,
            token_confidence=ce.confidence,
            token_level=level[masked],
        )
