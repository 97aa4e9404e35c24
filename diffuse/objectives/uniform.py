"""Uniform-state discrete diffusion (UDLM, arXiv 2412.10193; Duo, arXiv 2506.10892; DiffusionGemma's noise).

Each noisable token is kept with probability α(t) and otherwise replaced by a token drawn uniformly from the
vocabulary, q(z_t | x) = Cat(α_t·x + (1 − α_t)/V): there is no [MASK], and the network revises every position.
V is the backbone's whole vocabulary (len(tokenizer)), special tokens included, as DiffusionGemma draws its noise:
the state space of the bound is then exactly the softmax's, and the network learns that specials (other than EOS)
never occur in x. BOS, padding and (SFT) prompt tokens are never noised and never predicted.

`loss=nelbo`: the exact continuous-time NELBO (UDLM's eq. for L∞; Duo's `DUO_BASE.nll_per_token`). With
x̄ = V·α·x + (1 − α) (true), x̄_θ = V·α·x_θ + (1 − α) (predicted), i = z_t, per noisable token

    ∫ α′/(Vα) · [ V/x̄_i − V/x̄_θ,i − Σ_j (x̄_j/x̄_i)·log( x̄_θ,i·x̄_j / (x̄_θ,j·x̄_i) ) ] dt,

zero for a perfect predictor and the limit of the T-step NELBO of exact categorical KLs
(tests/test_uniform.py checks both and equality with a transcription of Duo's function, in float64). t is drawn
antithetically on [ε, 1 − ε] (α(t) > 0: the coefficient 1/α would make float32 cancel at α → 0) and the prior
term KL(q(z_{1−ε} | x) ‖ Uniform) is added in closed form; as for the absorbing family, the reconstruction term
at t = ε is left out (MDLM, Duo).

`loss=ce`: DiffusionGemma's training loss, the unweighted cross-entropy −log x_θ(x) at every noisable position
(noised or not), averaged over them; not a bound, so val/nelbo still reports the NELBO above.

The NELBO needs the whole [N, V] prediction at the noisable positions (a sum over the vocabulary), unlike the
absorbing family's chunked cross-entropy. `block_size`: block diffusion (BD3LM layout [z_t ; x_0], a t per block),
exactly as objectives/absorbing.py, with the `block_uniform` process. A self-conditioned backbone
(model.self_condition=true) gets its first pass through objectives/base.py `self_condition_probs`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffuse.contracts import BLOCK_UNIFORM, UNIFORM, TakesBlockLayout
from diffuse.core.checks import check_range
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
from diffuse.registry import OBJECTIVES
from diffuse.schedules import Schedule

LOSSES = ("nelbo", "ce")


def uniform_nelbo_integrand(log_x_theta: torch.Tensor, z: torch.Tensor, x0: torch.Tensor, alpha: torch.Tensor,
                            dalpha: torch.Tensor) -> torch.Tensor:
    """The continuous-time NELBO integrand per token (module docstring), ≥ 0. log_x_theta [..., V] (log x_θ),
    z and x0 [...] token ids, alpha = α(t) and dalpha = α′(t) broadcastable to z's shape."""
    V = log_x_theta.shape[-1]
    a = alpha.to(log_x_theta.dtype)
    a_, da = a[..., None], dalpha.to(log_x_theta.dtype)
    log_xbar_theta = torch.log(V * a_ * log_x_theta.exp() + (1 - a_))  # [..., V]
    xbar_theta_i = log_xbar_theta.gather(-1, z[..., None]).squeeze(-1).exp()
    log_xbar_theta_x = log_xbar_theta.gather(-1, x0[..., None]).squeeze(-1)
    xbar_i = (1 - a) + V * a * (z == x0)
    # Σ_j x̄_j log x̄_j (x̄ is 1 − α off x0, Vα + 1 − α at x0) and Σ_j x̄_j log x̄_θ,j
    xbar_log_xbar = (V - 1) * torch.xlogy(1 - a, 1 - a) + torch.xlogy(V * a + 1 - a, V * a + 1 - a)
    xbar_log_xbar_theta = (1 - a) * log_xbar_theta.sum(-1) + V * a * log_xbar_theta_x
    # Σ_j (x̄_j/x̄_i)·log(x̄_θ,i x̄_j / (x̄_θ,j x̄_i)), with Σ_j x̄_j = V
    log_ratio_sum = (V * (xbar_theta_i.log() - xbar_i.log()) + xbar_log_xbar - xbar_log_xbar_theta) / xbar_i
    return da / (V * a) * (V / xbar_i - V / xbar_theta_i - log_ratio_sum)


def nelbo_from_logits(logits: torch.Tensor, z: torch.Tensor, x0: torch.Tensor, alpha: torch.Tensor,
                      dalpha: torch.Tensor) -> torch.Tensor:
    """`uniform_nelbo_integrand` of softmax(logits) [N, V] with its gradient written out (`_NelboFromLogits`):
    autograd through the formula keeps about five [N, V] tensors for backward, this keeps the logits alone."""
    return _NelboFromLogits.apply(logits, z, x0, alpha.to(logits.dtype), dalpha.to(logits.dtype))


class _NelboFromLogits(torch.autograd.Function):
    """With p = softmax(ℓ), A = Vα, B = 1 − α, x̄_θ = A·p + B and c = α′/(Vα), the integrand is
        f = c·[V/x̄_i − V/x̄_θ,i − (V/x̄_i)(log x̄_θ,i − log x̄_i) − (C − B·Σ_j log x̄_θ,j − A·log x̄_θ,x)/x̄_i]
    so ∂f/∂p_j = c·[B·A/(x̄_i·x̄_θ,j) + 1[j=i]·(V·A/x̄_θ,i² − V·A/(x̄_i·x̄_θ,i)) + 1[j=x]·A²/(x̄_i·x̄_θ,x)]
    and ∂f/∂ℓ = p ⊙ (∂f/∂p − ⟨p, ∂f/∂p⟩) (tests/test_uniform.py checks it against autograd in float64)."""

    @staticmethod
    def forward(ctx, logits, z, x0, alpha, dalpha):
        lse = logits.logsumexp(-1, keepdim=True)
        ctx.save_for_backward(logits, lse, z, x0, alpha, dalpha)
        return uniform_nelbo_integrand(logits - lse, z, x0, alpha, dalpha)

    @staticmethod
    def backward(ctx, grad):
        logits, lse, z, x0, alpha, dalpha = ctx.saved_tensors
        V = logits.shape[-1]
        A, B = (V * alpha)[:, None], (1 - alpha)[:, None]
        p = (logits - lse).exp_()
        xbar_theta = p * A + B
        xbar_i = ((1 - alpha) + V * alpha * (z == x0))[:, None]
        c = (dalpha / (V * alpha))[:, None]
        xt_i, xt_x = xbar_theta.gather(1, z[:, None]), xbar_theta.gather(1, x0[:, None])
        g = xbar_theta.reciprocal_().mul_(c * B * A / xbar_i)  # the term every j has (reuses x̄_θ's memory)
        g.scatter_add_(1, z[:, None], c * (V * A / xt_i.square() - V * A / (xbar_i * xt_i)))
        g.scatter_add_(1, x0[:, None], c * A.square() / (xbar_i * xt_x))
        g.sub_((p * g).sum(-1, keepdim=True)).mul_(p).mul_(grad[:, None])
        return g, None, None, None, None


def uniform_prior_kl(alpha: torch.Tensor, V: int) -> torch.Tensor:
    """KL(Cat(α·x + (1 − α)/V) ‖ Uniform(V)) per token: the prior term at the end of the time range."""
    a = alpha.double()
    return (torch.xlogy(a + (1 - a) / V, V * a + 1 - a) + (V - 1) * torch.xlogy((1 - a) / V, 1 - a)).to(alpha.dtype)


def uniform_posterior(x: torch.Tensor, z: torch.Tensor, alpha_s: torch.Tensor, alpha_t: torch.Tensor) -> torch.Tensor:
    """q(z_s | z_t = z, x) for s < t over the V states (Duo's `_compute_posterior`): x [..., V] a one-hot x0 or the
    network's x_θ (plugged into the formula, which is linear in x), alpha_s/alpha_t broadcastable to z.

        q(z_s = j | z_t = i, x) ∝ (α_{t|s}·1[i = j] + (1 − α_{t|s})/V) · (α_s·x_j + (1 − α_s)/V),  α_{t|s} = α_t/α_s
    """
    V = x.shape[-1]
    a_s, a_t = alpha_s[..., None].to(x.dtype), alpha_t[..., None].to(x.dtype)
    a_ts = a_t / a_s
    forward = (1 - a_ts) / V + a_ts * F.one_hot(z, V).to(x.dtype)  # q(z_t = i | z_s = j) for every j
    joint = forward * (a_s * x + (1 - a_s) / V)
    return joint / joint.sum(-1, keepdim=True)


@OBJECTIVES.register("uniform")
class Uniform(nn.Module):
    causal = False
    trains_self_conditioning = True  # contracts.TrainsSelfConditioning: `conditioned_hidden` in the loss

    def __init__(self, schedule: Schedule, special: SpecialTokens, loss: str = "nelbo", eps: float = 1e-3,
                 block_size: int | None = None):
        super().__init__()
        if loss not in LOSSES:
            raise DiffuseError(f"objective.loss={loss!r} must be one of {', '.join(LOSSES)}")
        check_range("objective.eps", eps, 0, 0.5, low_open=True, high_open=True)
        check_range("objective.block_size", block_size, 1, integer=True, null="the full-sequence model")
        self.schedule, self.special, self.loss_kind, self.eps, self.block_size = schedule, special, loss, eps, block_size
        self.global_step = 0
        self.vocab_size: int | None = None  # V, from the backbone (`bind`)

    @property
    def process(self) -> str:
        return UNIFORM if self.block_size is None else BLOCK_UNIFORM

    @property
    def default_sampler(self) -> str:
        return "uniform_ancestral"

    def check_backbone(self, backbone, model_name: str) -> None:
        if self.block_size is not None and not (isinstance(backbone, TakesBlockLayout) and backbone.supports_block_layout):
            raise DiffuseError(
                f"model={model_name} cannot train objective.block_size={self.block_size}: block diffusion needs "
                "block-causal attention over [z_t ; x_0]; use model=transformer or model=hf (or objective.block_size=null)")

    # -- the forward (noising) process --------------------------------------------------------------
    def noisable(self, batch) -> torch.Tensor:
        """Real tokens other than BOS and the prompt: the positions noised and predicted."""
        return noisable_positions(batch, (self.special.bos,))

    @property
    def t_max(self) -> float:
        return 1.0 - self.eps

    def sample_t(self, x0, generator=None, train: bool = True, t_range=None) -> torch.Tensor:
        """Antithetic t on [ε, 1 − ε], [B, 1] (a t per block, [B, L], with block_size); `t_range`: i.i.d. in it."""
        if t_range is not None:
            lo, hi = t_range
            return lo + (hi - lo) * torch.rand((x0.shape[0], 1), device=x0.device, generator=generator)
        u = (antithetic_uniform(x0.shape[0], x0.device, generator, (1,)) if self.block_size is None
             else per_block_uniform(x0, self.block_size, generator))
        return self.eps + (self.t_max - self.eps) * u

    def draw_noise(self, x0, generator=None) -> torch.Tensor:
        """[B, L, 2] uniforms: whether each token is replaced, and by which token (the same noise at two times
        gives coupled corruptions: nested replaced sets, the same replacement tokens)."""
        return batch_draw(torch.rand, (*x0.shape, 2), generator, device=x0.device)

    def bind(self, backbone) -> None:
        """The noise's V is the backbone's vocabulary, known once a backbone is seen (`loss` and `predict` call this;
        the builder knows only the special tokens)."""
        self.vocab_size = int(backbone.vocab_size)

    def corrupt(self, x0, t, noise, batch) -> torch.Tensor:
        if self.vocab_size is None:
            raise DiffuseError("objective=uniform draws its noise over the backbone's vocabulary: bind(backbone) first")
        replaced = (noise[..., 0] >= self.schedule.alpha(t)) & self.noisable(batch)
        random_token = (noise[..., 1] * self.vocab_size).long().clamp_max(self.vocab_size - 1)
        return torch.where(replaced, random_token, x0)

    def still_noisy(self, z) -> torch.Tensor:
        """Uniform noise is invisible in z: every position may still carry it."""
        return torch.ones_like(z, dtype=torch.bool)

    def noise_level(self, t) -> torch.Tensor:
        return 1.0 - self.schedule.alpha(t)

    def posterior(self, x: torch.Tensor, z: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """contracts.UniformState: q(z_s | z_t = z, x) [..., V] for s < t (x one-hot or x_θ; s, t shaped like z)."""
        return uniform_posterior(x, z, self.schedule.alpha(s), self.schedule.alpha(t))

    # -- the network's prediction -------------------------------------------------------------------
    def hidden(self, backbone, z, t, batch, prev_probs=None) -> torch.Tensor:
        extra = {} if prev_probs is None else {"prev_probs": prev_probs}
        if self.block_size is None:
            t_in = t.squeeze(-1) if t.dim() == 2 and t.shape[1] == 1 else t
            return backbone(ids=z, t=t_in, segment_ids=batch.get("segment_ids"), **extra)
        return noisy_and_clean_hidden(backbone, z, t, batch, self.block_size, prev_probs)

    def conditioned_hidden(self, backbone, z, t, batch, generator=None, train: bool = True) -> torch.Tensor:
        prev = self_condition_probs(backbone, lambda: self.hidden(backbone, z, t, batch), generator, train)
        return self.hidden(backbone, z, t, batch) if prev is None else self.hidden(backbone, z, t, batch, prev)

    def predict(self, backbone, z, t, batch) -> torch.Tensor:
        """log x_θ(z_t, t) [B, L, V]. One pass: a self-conditioned backbone reads `batch["prev_probs"]` (a sampler's
        previous step), else nothing."""
        self.bind(backbone)
        return backbone.logits(self.hidden(backbone, z, t, batch, batch.get("prev_probs"))).float().log_softmax(-1)

    def distance(self, pred, target, where) -> torch.Tensor:
        """KL(target ‖ pred) per position on the vocabulary distribution (zero where not `where`)."""
        return (target.exp() * (target - pred)).nan_to_num(0.0).sum(-1) * where

    # -- the loss -----------------------------------------------------------------------------------
    def loss(self, backbone, batch, generator=None, train: bool = True, t_range=None) -> LossOutput:
        self.bind(backbone)
        x0 = batch["input_ids"]
        t = self.sample_t(x0, generator, train, t_range)
        z = self.corrupt(x0, t, self.draw_noise(x0, generator), batch)
        where = self.noisable(batch)
        h = self.conditioned_hidden(backbone, z, t, batch, generator, train)
        logits = backbone.logits(h[where]).float()  # [N, V]
        t_tok = torch.broadcast_to(t, where.shape)[where].to(logits.dtype)
        alpha, dalpha = self.schedule.alpha(t_tok), self.schedule.alpha_prime(t_tok)
        prior = uniform_prior_kl(self.schedule.alpha(torch.tensor(self.t_max, dtype=torch.float64)), logits.shape[-1])
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.loss_kind == "nelbo"):
            integrand = nelbo_from_logits(logits, z[where], x0[where], alpha, dalpha)
        nll = (self.t_max - self.eps) * integrand + float(prior)
        n_tokens = where.sum()
        if self.loss_kind == "ce":
            ce = F.cross_entropy(logits, x0[where], reduction="none")
        with torch.no_grad():  # the token stats (and the metric CE) from one logsumexp, no [N, V] softmax
            lse, (top, pred) = logits.logsumexp(-1), logits.max(-1)
            conf, changed = (top - lse).exp(), z[where] != x0[where]
            if self.loss_kind == "nelbo":
                ce = lse - logits.gather(-1, x0[where][:, None]).squeeze(-1)
        loss = (nll if self.loss_kind == "nelbo" else ce).sum() / n_tokens.clamp_min(1)
        return LossOutput(
            loss=loss,
            nll_sum=nll.detach().sum(),
            n_tokens=n_tokens,
            metrics={"noised_ratio": changed.float().sum() / n_tokens.clamp_min(1),
                     "ce": ce.detach().sum() / n_tokens.clamp_min(1)},  # 0, not NaN, on a batch without targets
            token_correct=(pred == x0[where]).float(),
            token_confidence=conf,
            token_level=self.noise_level(t_tok).float(),
        )
