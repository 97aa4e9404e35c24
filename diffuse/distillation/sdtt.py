"""SDTT (Deschenaux & Gulcehre, arXiv 2410.21035, Algorithm 1): a student learns to do in one step of
its sampler what the teacher does in k.

The student samples with N steps on the grid t_0 = 1 > … > t_N = ε (uniform in t, the ancestral
sampler's); the teacher with kN steps on the grid that refines it, so the student's step t_i → t_{i+1}
is the teacher's k steps t_i = τ_0 > τ_1 > … > τ_k = t_{i+1}. A training step:

    i ~ U{0 … N−1},  z ~ q(z_t | x0)  at t = t_i (the objective's own corruption: a prompt is never masked)
    the teacher runs its k ancestral steps from z: on τ_j → τ_{j+1} a mask is revealed with probability
      (p(τ_j) − p(τ_{j+1})) / p(τ_j), its token drawn from the teacher's p(x0 | z_{τ_j}) (the last step of the
      grid reveals every mask); the target of a revealed position is the distribution it was drawn from,
      of a position still masked after k steps the teacher's last prediction
    loss = mean over the positions masked in z of D(target ‖ p_student(x0 | z, t))   (D: KL, MSE or TVD)

p(t) is the objective's mask probability, so masked_discrete (p = 1 − α) and llada (p = (1−ε)t + ε) both
work, and so does block diffusion (both networks read the clean blocks before each noisy one). After a
round the student becomes the teacher and N halves (diffuse/distill.py).
"""

from __future__ import annotations

import torch
from torch import nn

from diffuse.contracts import Absorbing
from diffuse.core.checks import check_range
from diffuse.core.noise import batch_draw
from diffuse.distillation.divergences import pick_divergence
from diffuse.distillation.plan import Round, previous_student
from diffuse.errors import DiffuseError
from diffuse.objectives.base import LossOutput
from diffuse.registry import DISTILLERS
from diffuse.run.frozen import Frozen
from diffuse.sampling.base import gumbel_max


@DISTILLERS.register("sdtt")
class SDTT(nn.Module):
    def __init__(self, objective, teacher: str | nn.Module, student_steps: int, k: int = 2,
                 divergence: str = "kl", teacher_temperature: float = 1.0):
        super().__init__()
        if not isinstance(objective, Absorbing):
            raise DiffuseError(f"method=sdtt distils absorbing (masked) objectives, not objective="
                               f"{objective.registry_name}")
        self.eps = float(objective.eps)  # the end of the time grid, as for the samplers
        if isinstance(student_steps, bool) or not isinstance(student_steps, int) or student_steps < 1:
            raise DiffuseError(f"method.student_steps={student_steps} must be a positive integer")
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise DiffuseError(f"method.k={k} must be an integer ≥ 2 (teacher steps per student step)")
        if not teacher_temperature > 0:
            raise DiffuseError(f"method.teacher_temperature={teacher_temperature} must be > 0")
        self.student_steps, self.k, self.teacher_temperature = student_steps, k, float(teacher_temperature)
        self.divergence = pick_divergence(divergence)
        frozen = teacher if isinstance(teacher, Frozen) else (
            Frozen(teacher, "<module>") if isinstance(teacher, nn.Module) else Frozen.from_checkpoint(teacher))
        # not a registered child: a student's checkpoint holds no trace of its teacher (the run config names it)
        object.__setattr__(self, "teacher", frozen)
        self.global_step = 0

    def _apply(self, fn, recurse: bool = True):
        self.teacher._apply(fn)  # the teacher moves with the student (.to, .cuda, .half)
        return super()._apply(fn, recurse)

    def grid(self, device) -> torch.Tensor:
        """The teacher's time grid (kN steps, 1 → ε); the student's is every k-th point of it."""
        return torch.linspace(1.0, self.eps, self.k * self.student_steps + 1, device=device, dtype=torch.float64)

    @torch.no_grad()
    def targets(self, objective, z: torch.Tensor, i: torch.Tensor, batch, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's k ancestral steps from z at t_i: log-prob targets [B, L, V] (see the module docstring),
        and the teacher's state at t_{i+1}."""
        grid = self.grid(z.device)
        last = len(grid) - 1
        target = None  # set on the first sub-step: every position masked in z is masked there
        for j in range(self.k):
            at = i * self.k + j  # [B] the teacher's grid index of this sub-step
            tau, nxt = grid[at], grid[at + 1]
            logp = objective.predict(self.teacher, z, tau.float()[:, None], batch)
            if self.teacher_temperature != 1.0:  # the distribution the teacher's tokens are drawn from
                logp = (logp / self.teacher_temperature).log_softmax(-1)
            masked = objective.still_noisy(z)
            p_t, p_s = objective.mask_prob(tau), objective.mask_prob(nxt)
            p_reveal = torch.where(at + 1 == last, 1.0, (p_t - p_s) / p_t.clamp_min(1e-12)).float()[:, None]
            reveal = masked & (batch_draw(torch.rand, z.shape, generator, device=z.device) < p_reveal)
            proposal = gumbel_max(logp, batch_draw(torch.rand, logp.shape, generator, device=z.device))
            # a revealed position keeps the distribution its token was drawn from; the still-masked ones
            # take each later prediction, so they end with the teacher's last one
            target = logp if target is None else torch.where(masked[..., None], logp, target)
            z = torch.where(reveal, proposal, z)
        return target, z

    def loss(self, objective, backbone, batch, generator=None) -> LossOutput:
        x0 = batch["input_ids"]
        i = batch_draw(lambda shape, **kw: torch.randint(0, self.student_steps, shape, **kw), (x0.shape[0],),
                       generator, device=x0.device)
        t = self.grid(x0.device)[i * self.k].float()[:, None]
        z = objective.corrupt(x0, t, objective.draw_noise(x0, generator), batch)
        masked = objective.still_noisy(z)
        target, _ = self.targets(objective, z, i, batch, generator)
        pred = objective.predict(backbone, z, t, batch)
        per_position = self.divergence(target[masked], pred[masked])
        n = masked.sum()
        loss = per_position.sum() / n.clamp_min(1)
        return LossOutput(loss=loss, nll_sum=loss.detach() * n, n_tokens=n,
                          metrics={"distill_loss": loss.detach(), "mask_ratio": n / x0.numel()})


    @classmethod
    def rounds(cls, cfg, method: dict, teacher_cfg: dict, out_dir) -> list[Round]:
        """R rounds from the teacher's `steps`: round r's student samples with steps / k^r, its teacher is
        the previous round's student."""
        R, steps, k = int(cfg.rounds), int(cfg.steps), int(method.get("k", 2))
        if R < 1:
            raise DiffuseError(f"rounds={cfg.rounds} must be ≥ 1")
        check_range("steps", steps, 1, integer=True)  # the teacher's sampling steps
        if k < 2:
            raise DiffuseError(f"method.k={k} must be an integer ≥ 2 (teacher steps per student step)")
        if steps % k**R:
            raise DiffuseError(f"steps={steps} must be divisible by method.k^rounds = {k}^{R}: each round divides "
                               "the student's steps by k")
        plans = []
        for r in range(1, R + 1):
            teacher = str(cfg.teacher) if r == 1 else previous_student(out_dir, r - 1)
            n = steps // k**r
            plans.append(Round(init_from=teacher, distill={**method, "teacher": teacher, "student_steps": n},
                               changes={"sampler.steps": n}, steps=n, total=R,
                               describe=f"SDTT round {r}: {n * k} → {n} steps"))
        return plans
