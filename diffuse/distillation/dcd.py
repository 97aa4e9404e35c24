"""DCD, Duo's discrete consistency distillation (Sahoo et al., arXiv 2506.10892 §4; s-sahoo/duo `algo.py`,
class `Distillation`), for uniform-state checkpoints (objective=uniform).

The Diffusion Duality: the argmax of a Gaussian diffusion on one-hot tokens, z_t = argmax(r(t)·e_x + ε) with
ε ~ N(0, I_V), is marginally the uniform-state process q(z_t | x) = Cat(α_t·x + (1 − α_t)/V) for the α_t with

    α_t + (1 − α_t)/V = P(argmax = x) = ∫ φ(u) Φ(u + r)^{V−1} du        (`duality_ratio` inverts it numerically)

and one shared ε couples every t into a deterministic trajectory (a probability-flow path). A training step:

    t ~ U[ε + Δ, 1], s = t − Δ, ε shared:  z_t = argmax(r(t)·e_x + ε),  z_s = argmax(r(s)·e_x + ε)
    loss = mean over noisable positions of D(x_teacher(z_s, s), x_student(z_t, t))

D: `reverse_kl` = KL(student ‖ teacher), Duo's default `kl-bwd`, or `kl` = KL(teacher ‖ student), its `kl-fwd`.
Rounds (diffuse/distill.py): round r's teacher is round r − 1's student (round 1: the trained model), Δ is the
teacher's step 1/N on a grid of N = steps / 2^(r−1) and the student samples with N/2 steps: Duo doubles Δ = 2^n/T
each time it refreshes its teacher.

What is Duo's: the coupled argmax trajectory, the teacher's x0-distribution at the later time s as the target of
the student at t, the KL directions, Δ doubling with each teacher. What is not: the α(t) here is the objective's
schedule (Duo's Gaussian side is linear in log-SNR γ on [γ_min, γ_max], mapped by its cached integral); the
teacher is refreshed once per diffuse.distill round from the last student, not every `update_teacher_every` steps
from an EMA; t is drawn on [ε + Δ, 1] rather than clipped; Duo's curriculum (training the base model on tempered
softmaxes of the Gaussian latents) and its posterior loss term are not here.
"""

from __future__ import annotations

import torch
from torch import nn

from diffuse.contracts import UniformState
from diffuse.core.checks import check_range
from diffuse.core.noise import batch_draw
from diffuse.distillation.divergences import pick_divergence
from diffuse.distillation.plan import Round, previous_student
from diffuse.errors import DiffuseError
from diffuse.objectives.base import LossOutput
from diffuse.registry import DISTILLERS
from diffuse.run.frozen import Frozen

KL_DIRECTIONS = ("reverse_kl", "kl")


def argmax_match_probability(r: torch.Tensor, V: int, n: int = 4001) -> torch.Tensor:
    """P(argmax(r·e_x + ε) = x) = ∫ φ(u) Φ(u + r)^{V−1} du for ε ~ N(0, I_V) (float64, trapezoid on [−12, 12])."""
    u = torch.linspace(-12.0, 12.0, n, dtype=torch.float64)
    log_phi = -0.5 * u.square() - 0.5 * torch.log(torch.tensor(2 * torch.pi, dtype=torch.float64))
    integrand = torch.exp(log_phi + (V - 1) * torch.special.log_ndtr(u + r.double()[..., None]))
    return torch.trapezoid(integrand, u, dim=-1)


def duality_ratio(alpha: torch.Tensor, V: int, iters: int = 60) -> torch.Tensor:
    """r with argmax(r·e_x + ε) ~ Cat(α·x + (1 − α)/V): bisection on the increasing P(argmax = x) (float64)."""
    target = alpha.double().clamp(0.0, 1.0 - 1e-9) * (1 - 1 / V) + 1 / V
    lo, hi = torch.zeros_like(target), torch.full_like(target, 40.0)
    for _ in range(iters):
        mid = (lo + hi) / 2
        above = argmax_match_probability(mid, V) > target
        lo, hi = torch.where(above, lo, mid), torch.where(above, mid, hi)
    return (lo + hi) / 2


@DISTILLERS.register("dcd")
class DCD(nn.Module):
    def __init__(self, objective, teacher: str | nn.Module, student_steps: int, divergence: str = "reverse_kl"):
        super().__init__()
        if not isinstance(objective, UniformState):
            raise DiffuseError(f"method=dcd distils uniform-state objectives (objective=uniform), not objective="
                               f"{objective.registry_name}")
        self.student_steps = check_range("method.student_steps", student_steps, 1, integer=True)
        if divergence not in KL_DIRECTIONS:
            raise DiffuseError(f"method.divergence={divergence!r} must be one of {', '.join(KL_DIRECTIONS)}")
        self.divergence = pick_divergence(divergence)
        self.dt = 1.0 / (2 * self.student_steps)  # the teacher's step: it samples with twice the student's steps
        if objective.eps + self.dt >= 1.0:
            raise DiffuseError(f"method.student_steps={student_steps}: a teacher step of Δ = {self.dt} leaves no "
                               "room for t in [eps + Δ, 1]")
        frozen = teacher if isinstance(teacher, Frozen) else (
            Frozen(teacher, "<module>") if isinstance(teacher, nn.Module) else Frozen.from_checkpoint(teacher))
        object.__setattr__(self, "teacher", frozen)  # not a child: a student's checkpoint holds no trace of it
        self.global_step = 0

    def _apply(self, fn, recurse: bool = True):
        self.teacher._apply(fn)
        return super()._apply(fn, recurse)

    def coupled(self, objective, x0, t, s, batch, generator, V) -> tuple[torch.Tensor, torch.Tensor]:
        """z_t, z_s on one Gaussian trajectory (module docstring); positions that are never noised keep x0."""
        eps = batch_draw(torch.randn, (*x0.shape, V), generator, device=x0.device)
        onehot = torch.nn.functional.one_hot(x0, V).to(eps.dtype)
        noisable = objective.noisable(batch)
        alpha = objective.schedule.alpha(torch.cat([t, s], 1).double().cpu())
        r = duality_ratio(alpha, V).to(eps.device, eps.dtype)  # [B, 2]
        z_t = (r[:, :1, None] * onehot + eps).argmax(-1)
        z_s = (r[:, 1:, None] * onehot + eps).argmax(-1)
        return torch.where(noisable, z_t, x0), torch.where(noisable, z_s, x0)

    def loss(self, objective, backbone, batch, generator=None) -> LossOutput:
        x0 = batch["input_ids"]
        lo = objective.eps + self.dt
        u = batch_draw(torch.rand, (x0.shape[0], 1), generator, device=x0.device)
        t = lo + (1.0 - lo) * u
        s = t - self.dt
        z_t, z_s = self.coupled(objective, x0, t, s, batch, generator, int(backbone.vocab_size))
        with torch.no_grad():
            target = objective.predict(self.teacher, z_s, s, batch)
        pred = objective.predict(backbone, z_t, t, batch)
        where = objective.noisable(batch)
        n = where.sum()
        loss = self.divergence(target[where], pred[where]).sum() / n.clamp_min(1)
        return LossOutput(loss=loss, nll_sum=loss.detach() * n, n_tokens=n,
                          metrics={"distill_loss": loss.detach(), "dcd_dt": torch.tensor(self.dt)})

    @classmethod
    def rounds(cls, cfg, method: dict, teacher_cfg: dict, out_dir) -> list[Round]:
        """R rounds from the teacher's `steps` N: round r's teacher samples with N / 2^(r−1) steps (its step Δ is
        the student's target gap), the student with half as many."""
        R, steps = int(cfg.rounds), int(cfg.steps)
        check_range("rounds", R, 1, integer=True)
        check_range("steps", steps, 1, integer=True)
        if steps % 2**R:
            raise DiffuseError(f"steps={steps} must be divisible by 2^rounds = 2^{R}: each round halves the steps")
        plans = []
        for r in range(1, R + 1):
            teacher = str(cfg.teacher) if r == 1 else previous_student(out_dir, r - 1)
            n = steps // 2**r
            plans.append(Round(init_from=teacher, distill={**method, "teacher": teacher, "student_steps": n},
                               changes={"sampler.steps": n}, steps=n, total=R,
                               describe=f"DCD round {r}: {2 * n} → {n} steps (Δ = 1/{2 * n})"))
        return plans
