"""DiffusionGemma's fine-tuning recipe (`objective=diffusion_gemma`) for a backbone with an encoder pass and a
canvas pass (contracts.EncodesCanvas: model=diffusion_gemma).

Per row: the target starts after BOS and, in SFT, after the prompt; it is cut into canvases of C tokens (C the
backbone's canvas_length) and one canvas k is drawn uniformly among those holding a target token. Then

- the context, everything before that canvas (prompt and the target's earlier canvases), runs through the causal
  encoder once, writing the KV cache, and is trained with the next-token loss (`ar_weight`);
- the canvas is corrupted with objective=uniform's noise (each token replaced by a uniformly random vocabulary
  token with probability 1 − α(t), t ~ U[ε, 1 − ε] per row; no [MASK]), denoised bidirectionally over the cache,
  and trained with the unweighted cross-entropy on every valid canvas token (noised or not; positions past the
  row's end are PAD, neither noised nor learned);
- self-conditioning in two passes: a first decoder pass without gradient gives logits, which the second reads
  through transformers' `self_conditioning_mask`, on for each row with probability 0.5 in training (always on in
  validation; the generation loop always has it after its first step).

val/nelbo is objective=uniform's continuous-time NELBO of the canvas tokens given their context (a bound on
those tokens alone, so not comparable with a whole-sequence objective's). Rows are one document each: packed
documents would see each other through the context (SFT rows are one document).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffuse.contracts import BLOCK_UNIFORM, EncodesCanvas
from diffuse.core.checks import check_range
from diffuse.core.noise import batch_draw
from diffuse.errors import DiffuseError
from diffuse.objectives.base import LossOutput, SpecialTokens, noisable_positions
from diffuse.objectives.uniform import Uniform, uniform_nelbo_integrand, uniform_prior_kl
from diffuse.registry import OBJECTIVES
from diffuse.schedules import Schedule

SELF_CONDITIONING_P = 0.5


@OBJECTIVES.register("diffusion_gemma")
class DiffusionGemmaRecipe(nn.Module):
    process = BLOCK_UNIFORM  # uniform noise inside canvases, causal across them
    causal = False
    default_sampler = "entropy_bound"

    def __init__(self, schedule: Schedule, special: SpecialTokens, eps: float = 1e-3, ar_weight: float = 1.0,
                 self_conditioning: float = SELF_CONDITIONING_P):
        super().__init__()
        check_range("objective.ar_weight", ar_weight, 0)
        check_range("objective.self_conditioning", self_conditioning, 0, 1)
        self.noise = Uniform(schedule, special, loss="ce", eps=eps)  # objective=uniform's forward process
        self.special, self.ar_weight, self.sc_p = special, float(ar_weight), float(self_conditioning)
        self.global_step = 0

    def check_backbone(self, backbone, model_name: str) -> None:
        if not isinstance(backbone, EncodesCanvas):
            raise DiffuseError(f"objective=diffusion_gemma trains an encoder + canvas backbone; model={model_name} is "
                               "not one: use model=diffusion_gemma (or objective=uniform for this model)")

    def split(self, batch, C: int, generator=None):
        """(context [B, W] left-padded, its mask, target canvas [B, C], its valid mask) for one canvas a row."""
        ids, seg = batch["input_ids"], batch["segment_ids"]
        B, L = ids.shape
        n = (seg > 0).sum(1)
        target = noisable_positions(batch, (self.special.bos,))
        start = torch.where(target.any(1), target.long().argmax(1), n).clamp_min(1)  # the context is never empty
        blocks = (n - start).clamp_min(0).add(C - 1).div(C, rounding_mode="floor")
        u = batch_draw(torch.rand, (B,), generator, device=ids.device)  # DDP: this rank's rows of the global draw
        k = (u * blocks).long().clamp_max((blocks - 1).clamp_min(0))
        ctx_len = start + k * C
        W = int(ctx_len.max())
        idx = torch.arange(W, device=ids.device) - (W - ctx_len[:, None])  # left padding
        ctx_mask = idx >= 0
        context = ids.gather(1, idx.clamp(0, L - 1)).masked_fill(~ctx_mask, self.special.pad)
        tidx = ctx_len[:, None] + torch.arange(C, device=ids.device)
        valid = (tidx < n[:, None]) & target.gather(1, tidx.clamp_max(L - 1))
        return context, ctx_mask, ids.gather(1, tidx.clamp_max(L - 1)), valid

    def loss(self, backbone, batch, generator=None, train: bool = True) -> LossOutput:
        self.noise.bind(backbone)
        C = backbone.canvas_length
        context, ctx_mask, x0, valid = self.split(batch, C, generator)
        B, W = context.shape
        t = self.noise.sample_t(x0, generator, train)
        x0 = x0.masked_fill(~valid, self.special.pad)  # past the row's end: PAD, never noised nor learned
        z = self.noise.corrupt(x0, t, self.noise.draw_noise(x0, generator),
                               {"input_ids": x0, "segment_ids": valid.long()})

        cache = backbone.new_cache(W + C)
        hidden = backbone.encode(context, ctx_mask, torch.arange(W, device=z.device)[None], cache)
        pairs = ctx_mask[:, :-1] & ctx_mask[:, 1:]  # next-token loss inside the context
        ar = F.cross_entropy(backbone.logits(hidden[:, :-1][pairs]), context[:, 1:][pairs], reduction="sum")
        ar = ar / pairs.sum().clamp_min(1)

        dec_mask = torch.cat([ctx_mask, ctx_mask.new_ones(B, C)], 1)
        positions = torch.arange(W, W + C, device=z.device)[None]
        with torch.no_grad():
            first = backbone.denoise(z, cache, dec_mask, positions)
        on = (batch_draw(torch.rand, (B,), generator, device=z.device) < self.sc_p) if train else torch.ones_like(valid[:, 0])
        logits = backbone.denoise(z, cache, dec_mask, positions, self_conditioning_logits=first,
                                  self_conditioning_mask=on)
        log_x = logits[valid].float().log_softmax(-1)
        ce = -log_x.gather(-1, x0[valid][:, None]).squeeze(-1)
        n_tokens = valid.sum()
        loss = ce.sum() / n_tokens.clamp_min(1) + self.ar_weight * ar
        with torch.no_grad():  # val/nelbo: objective=uniform's bound on the canvas tokens
            sched, t_tok = self.noise.schedule, t.expand_as(x0)[valid].to(log_x.dtype)
            prior = uniform_prior_kl(sched.alpha(torch.tensor(self.noise.t_max, dtype=torch.float64)), log_x.shape[-1])
            nll = (self.noise.t_max - self.noise.eps) * uniform_nelbo_integrand(
                log_x, z[valid], x0[valid], sched.alpha(t_tok), sched.alpha_prime(t_tok)) + float(prior)
            conf, pred = log_x.exp().max(-1)
        return LossOutput(loss=loss, nll_sum=nll.sum(), n_tokens=n_tokens,
                          metrics={"ce": ce.detach().sum() / n_tokens.clamp_min(1), "ar_loss": ar.detach(),
                                   "self_conditioned": on.float().mean()},
                          token_correct=(pred == x0[valid]).float(), token_confidence=conf,
                          token_level=self.noise.noise_level(t_tok).float())
