"""Which corruption levels drive learning? Every N steps, the gradient norm of the objective's loss
restricted to each corruption bucket (low / mid / high noise, diffuse.core.metrics.BUCKETS).

For each bucket: one extra forward/backward on the current batch (the first micro-batch under gradient
accumulation), with t drawn inside the bucket's t range: the range is found by bisection on the objective's
`noise_level(t)` (the mask ratio for masked objectives; `t_for_level`), clamped to the objective's own
[eps, 1], and passed as `objective.loss(..., t_range=…)`, so the loss is the objective's own. The noise comes
from a generator of its own (`noise_generator(seed, step)`, `seed` defaulting to the run's); the torch RNG is
forked and the pass runs under the trainer's precision. The norm is over the backbone's trainable parameters,
through `torch.autograd.grad`: the optimizer's `.grad` are untouched, so a run with the analysis trains exactly
like one without. Skipped without a logger; objectives without a noise level (autoregressive) are skipped
with one warning.

Logged straight to the run's loggers (metrics.csv) as `grad/norm_{bucket}` and `grad/loss_{bucket}`, at
steps 0, N, 2N, … (computed before that step's optimizer update); drawn by `python -m diffuse.report --heatmap`.
"""
from __future__ import annotations

import logging

import lightning as L
import torch

from diffuse.contracts import component_name, has_noise_process
from diffuse.core.metrics import BUCKETS
from diffuse.core.noise import noise_generator
from diffuse.errors import DiffuseError

log = logging.getLogger("diffuse")


def supports(objective) -> bool:
    """A noise process with a level to bucket by (the autoregressive objective has none)."""
    return has_noise_process(objective)


def t_for_level(objective, level: float, iters: int = 40) -> float:
    """The t ∈ [0, 1] where the objective's noise level (increasing in t) reaches `level`, by bisection:
    works for every objective and schedule without knowing its formula."""
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if float(objective.noise_level(torch.tensor(mid, dtype=torch.float64))) < level:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def bucket_t_ranges(objective, buckets=BUCKETS) -> dict[str, tuple[float, float]]:
    """Each bucket's t range, kept inside the objective's own [eps, 1] (t → 0 has unbounded ELBO weight)."""
    eps = float(objective.eps)
    ranges = {}
    for name, lo, hi in buckets:
        t_lo, t_hi = t_for_level(objective, lo), t_for_level(objective, min(hi, 1.0))
        ranges[name] = (max(t_lo, eps), max(t_hi, eps))
    return ranges


def bucket_gradient_norms(objective, backbone, batch, generator: torch.Generator,
                          ranges: dict[str, tuple[float, float]]) -> dict[str, float]:
    params = [p for p in backbone.parameters() if p.requires_grad]
    out = {}
    for name, t_range in ranges.items():
        with torch.enable_grad():
            loss = objective.loss(backbone, batch, generator, train=True, t_range=t_range).loss
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        sq = sum(g.detach().float().pow(2).sum() for g in grads if g is not None)
        out[f"grad/norm_{name}"] = float(torch.as_tensor(sq).sqrt())
        out[f"grad/loss_{name}"] = float(loss.detach())
    return out


class CorruptionGradientNorms(L.Callback):
    def __init__(self, every_n_steps: int = 50, seed: int = 0):
        if int(every_n_steps) <= 0:
            raise DiffuseError(f"callbacks.gradient_analysis.every_n_steps={every_n_steps} must be positive")
        self.every_n_steps, self.seed = int(every_n_steps), int(seed)
        self._ranges = None
        self._warned = False
        self._last_step = -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # before the optimizer step: the weights the training gradient of this step sees, and the
        # step number Lightning logs this batch's train/* metrics under
        step = trainer.global_step
        if step % self.every_n_steps or step == self._last_step or not trainer.loggers:
            return
        self._last_step = step  # with gradient accumulation: the first micro-batch only
        objective = pl_module.objective
        if not supports(objective):
            if not self._warned:
                log.warning("gradient analysis skipped: objective %s has no noise level to bucket by",
                            component_name(objective))
                self._warned = True
            return
        if self._ranges is None:
            self._ranges = bucket_t_ranges(objective)
        device = pl_module.device
        gen = noise_generator(self.seed, step, device)
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), trainer.precision_plugin.train_step_context():
            values = bucket_gradient_norms(objective, pl_module.backbone, batch, gen, self._ranges)
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)
