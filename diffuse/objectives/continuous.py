"""Gaussian diffusion on token embeddings (Diffusion-LM, Li et al. 2022, arXiv 2205.14217; DIMBA).

x0 is the embedding of each token, scaled to unit RMS times `embedding_scale` (s), so the embeddings
cannot collapse to zero to make denoising trivial, and ε ~ N(0, I) has a fixed signal-to-noise ratio
against them. T steps t = k/T (k = 1..T); x_t = √ᾱ(t)·x0 + √(1−ᾱ(t))·ε with ᾱ from the schedule
(`linear`: ᾱ = 1 − t, `cosine`: ᾱ = cos(πt/2)). BOS, padding and prompt tokens stay clean.

The backbone sees x_t / √(ᾱ·s² + 1 − ᾱ) (unit variance at every t, EDM's c_in) and t, and its hidden
state times s is x̂0: the backbone's final RMSNorm (with its learnable gain) is the projection to the
embedding space, so no parameter lives outside the backbone and its API is unchanged. Rounding
logits are x̂0 · e_wᵀ over the same scaled table (the tied head, normalised as x0 is): all rows have
the same norm, so this is the Gaussian decoder p(w | x̂0) ∝ exp(−‖x̂0 − e_w‖²/2) and its argmax is the
nearest embedding. Training loss per noised token: MSE(x̂0, x0) (mean over dims) + CE of the rounding.

val/nelbo is an exact variational bound on −log p(tokens | BOS) per token (Kingma et al. 2021, VDM):
the latents are x_1..x_T, the decoder is the rounding of x̂0(x_1) and p(x_{k−1} | x_k) is the DDPM
posterior at x̂0, so with SNR = ᾱ/(1 − ᾱ)

    NELBO = CE(w | x̂0(x_1)) + Σ_{k=2}^{T} ½·(SNR((k−1)/T) − SNR(k/T))·‖x0 − x̂0(x_k)‖² + KL(q(x_T|x0) ‖ N(0, I)).

Validation estimates the sum with one stratified k ∈ {2..T} per row (weight T − 1) plus one extra
forward pass at k = 1 for the decoder term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffuse.contracts import GAUSSIAN
from diffuse.core.noise import batch_draw
from diffuse.errors import DiffuseError
from diffuse.objectives.base import (
    LossOutput,
    SpecialTokens,
    antithetic_uniform,
    noisable_positions,
    predicted_token_stats,
)
from diffuse.registry import OBJECTIVES
from diffuse.schedules import Schedule


@dataclass
class NoisyEmbeddings:
    """A corrupted sequence: embeddings x_t [B, L, D] and which positions carry noise [B, L]."""

    x: torch.Tensor
    noisy: torch.Tensor


@OBJECTIVES.register("continuous")
class ContinuousEmbedding(nn.Module):
    process = GAUSSIAN  # samplers of token canvases (remask, ancestral, …) do not fit
    causal = False
    default_sampler = "ddim"

    def __init__(
        self,
        schedule: Schedule,
        special: SpecialTokens,
        num_timesteps: int = 1000,
        embedding_scale: float = 1.0,
        mse_weight: float = 1.0,
        ce_weight: float = 1.0,
    ):
        if int(num_timesteps) < 2:
            raise DiffuseError(f"objective.num_timesteps={num_timesteps} must be at least 2")
        if not embedding_scale > 0:
            raise DiffuseError(f"objective.embedding_scale={embedding_scale} must be positive")
        if mse_weight < 0 or ce_weight < 0 or mse_weight + ce_weight == 0:
            raise DiffuseError(f"objective.mse_weight={mse_weight} and ce_weight={ce_weight} must be ≥ 0, not both 0")
        super().__init__()
        self.global_step = 0
        self.schedule, self.special = schedule, special
        self.num_timesteps, self.scale = int(num_timesteps), float(embedding_scale)
        self.mse_weight, self.ce_weight = float(mse_weight), float(ce_weight)
        self.eps = 1.0 / self.num_timesteps  # the smallest t on the grid

    # -- embeddings -------------------------------------------------------------------------------
    def normalise(self, e: torch.Tensor) -> torch.Tensor:
        """Unit RMS over the last dim, times embedding_scale."""
        return self.scale * e * torch.rsqrt(e.float().pow(2).mean(-1, keepdim=True) + 1e-8).to(e.dtype)

    def embedding_table(self, backbone) -> torch.Tensor:
        """[V, D]: every token's x0."""
        return self.normalise(backbone.embed(torch.arange(backbone.vocab_size, device=_device(backbone))))

    def embed_tokens(self, backbone, ids: torch.Tensor) -> torch.Tensor:
        return self.normalise(backbone.embed(ids))

    def round_logits(self, backbone, x0_hat: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """Rounding logits x̂0 · e_wᵀ ([MASK] excluded: it is never a token of the text)."""
        table = self.embedding_table(backbone) if table is None else table
        logits = x0_hat.float() @ table.float().T
        if self.special.mask is not None:
            logits[..., self.special.mask] = float("-inf")
        return logits

    # -- the forward (noising) process: the hooks the consistency regularizer uses ----------------
    def clean(self, backbone, batch) -> torch.Tensor:
        return self.embed_tokens(backbone, batch["input_ids"])

    def noisable(self, batch) -> torch.Tensor:
        """Real tokens other than BOS and the prompt (given, as in the masked objectives)."""
        return noisable_positions(batch, (self.special.bos,))

    def sample_t(self, x0: torch.Tensor, generator=None, train: bool = True, k_min: int = 1,
                 t_range: tuple[float, float] | None = None) -> torch.Tensor:
        """t = k/T [B, 1] with k stratified over the batch on {k_min, …, T}; with `t_range`, t ~ U[lo, hi]."""
        if t_range is not None:
            lo, hi = t_range
            return lo + (hi - lo) * torch.rand((x0.shape[0], 1), device=x0.device, generator=generator)
        u = antithetic_uniform(x0.shape[0], x0.device, generator, (1,))
        span = self.num_timesteps - k_min + 1
        k = k_min + (u * span).floor().clamp_max(span - 1)
        return k / self.num_timesteps

    def draw_noise(self, x0: torch.Tensor, generator=None) -> torch.Tensor:
        return batch_draw(torch.randn, x0.shape, generator, device=x0.device, dtype=x0.dtype)

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ(t) in float64 (1 − ᾱ near t = 1/T is below float32's resolution for the cosine schedule)."""
        return self.schedule.alpha(t.double()).clamp(0.0, 1.0)

    def corrupt(self, x0, t, noise, batch) -> NoisyEmbeddings:
        """x_t = √ᾱ·x0 + √(1−ᾱ)·ε on noisable positions; the same ε at two times gives coupled x_t."""
        a = self.alpha_bar(t)[..., None]
        x_t = (a.sqrt() * x0 + (1.0 - a).sqrt() * noise).to(x0.dtype)
        noisy = self.noisable(batch)
        return NoisyEmbeddings(torch.where(noisy[..., None], x_t, x0), noisy)

    def noised(self, x: torch.Tensor, noisy: torch.Tensor) -> NoisyEmbeddings:
        """Wrap embeddings with their noisy-position mask (samplers build x_t themselves)."""
        return NoisyEmbeddings(x, noisy)

    def still_noisy(self, z: NoisyEmbeddings) -> torch.Tensor:
        return z.noisy

    def noise_level(self, t: torch.Tensor) -> torch.Tensor:
        return (1.0 - self.alpha_bar(t)).float()

    # -- the network's prediction -----------------------------------------------------------------
    def predict(self, backbone, z: NoisyEmbeddings, t, batch) -> torch.Tensor:
        """x̂0 [B, L, D]; clean positions copy their input (as SUBS copies unmasked tokens)."""
        if not backbone.time_conditioned:
            raise DiffuseError("objective=continuous needs a time-conditioned backbone: set model.time_conditioning=true")
        a = self.alpha_bar(t)[..., None]
        c_in = torch.rsqrt(a * self.scale**2 + 1.0 - a).to(z.x.dtype)
        t_in = t.squeeze(-1) if t.dim() == 2 and t.shape[1] == 1 else t
        hidden = backbone(embeds=z.x * c_in, t=t_in.float(), segment_ids=batch.get("segment_ids"))
        return torch.where(z.noisy[..., None], self.scale * hidden.to(z.x.dtype), z.x)

    def distance(self, pred, target, where) -> torch.Tensor:
        """Squared error per position (mean over the embedding dims), zero where not `where`."""
        return (pred.float() - target.float()).pow(2).mean(-1) * where

    # -- the loss and the bound -------------------------------------------------------------------
    def snr(self, t: torch.Tensor) -> torch.Tensor:
        a = self.alpha_bar(t)
        return a / (1.0 - a).clamp_min(1e-300)

    def prior_kl(self, x0: torch.Tensor) -> torch.Tensor:
        """KL(N(√ᾱ(1)·x0, (1−ᾱ(1))·I) ‖ N(0, I)) per token (0 when ᾱ(1) = 0)."""
        a = self.alpha_bar(torch.ones((), device=x0.device))
        D = x0.shape[-1]
        return 0.5 * (a * x0.double().pow(2).sum(-1) - D * a - D * torch.log1p(-a))

    def loss(self, backbone, batch, generator=None, train: bool = True, t_range=None) -> LossOutput:
        ids = batch["input_ids"]
        table = self.embedding_table(backbone)
        x0 = F.embedding(ids, table)
        noise = self.draw_noise(x0, generator)
        # validation draws k ≥ 2 for the bound's KL terms and adds the k = 1 decoder term below
        t = self.sample_t(ids, generator, train, k_min=1 if train else 2, t_range=t_range)
        z = self.corrupt(x0, t, noise, batch)
        x0_hat = self.predict(backbone, z, t, batch)
        where = z.noisy
        sq = (x0_hat.float() - x0.float()).pow(2).sum(-1)  # ‖x0 − x̂0‖² per token
        logits = self.round_logits(backbone, x0_hat, table)
        ce = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
        n_tokens = where.sum()
        denom = n_tokens.clamp_min(1)
        mse = (sq / x0.shape[-1])[where].sum() / denom
        ce_mean = ce[where].sum() / denom
        loss = self.mse_weight * mse + self.ce_weight * ce_mean

        with torch.no_grad():
            T = self.num_timesteps
            kl = 0.5 * (self.snr(t - 1.0 / T) - self.snr(t)).expand_as(sq) * sq.double()
            if train:  # one unbiased draw over k ∈ {1..T}: only val/nelbo reads nll_sum, this is cheap
                bound = T * torch.where((t * T).round().expand_as(sq) <= 1, ce.double(), kl)
            else:
                bound = (T - 1) * kl + self.decoder_nll(backbone, x0, noise, batch, table)
            bound = bound + self.prior_kl(x0)
            nll_sum = bound[where].sum().float()

        correct, conf = predicted_token_stats(logits, ids, where)
        level = self.noise_level(t).expand_as(where)[where]
        return LossOutput(
            loss=loss,
            nll_sum=nll_sum,
            n_tokens=n_tokens,
            metrics={"mse": mse.detach(), "ce": ce_mean.detach()},
            token_correct=correct,
            token_confidence=conf,
            token_level=level,
        )

    def decoder_nll(self, backbone, x0, noise, batch, table) -> torch.Tensor:
        """−log p(w | x_1): the rounding CE of x̂0 at k = 1 (t = 1/T), per token."""
        t1 = torch.full((x0.shape[0], 1), 1.0 / self.num_timesteps, device=x0.device)
        x0_hat = self.predict(backbone, self.corrupt(x0, t1, noise, batch), t1, batch)
        logits = self.round_logits(backbone, x0_hat, table)
        return F.cross_entropy(logits.transpose(1, 2), batch["input_ids"], reduction="none").double()


def _device(module) -> torch.device:
    return next(module.parameters()).device
