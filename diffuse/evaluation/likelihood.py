"""The likelihood bound of a checkpoint on held-out batches, with its standard error.

Each batch is scored `t_samples` times with independent noise streams through the objective's own
`loss(..., train=False)` (the maths lives there, not here). Stream 0 of batch b is the one training's
validation uses (diffuse/core/noise.py), so `t_samples=1` with the checkpoint's seed and data reproduces its val/nelbo.

Two standard errors of the per-token estimate R = Σ nll / Σ tokens:
- `val/nelbo_stderr` — across batches (each batch's nll averaged over its t-samples), the ratio
  estimator's delta-method error: data and noise variance together;
- `val/nelbo_t_stderr` — the Monte-Carlo part only (variance across t-samples within batches): what
  more `t_samples` would shrink. Zero for autoregressive models, whose NLL is exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from diffuse.contracts import has_noise_process
from diffuse.core.metrics import NELBO, CorruptionAccuracy
from diffuse.core.noise import noise_generator, validation_stream


@torch.no_grad()
def evaluate_likelihood(module, batches: Iterable[dict], t_samples: int = 1, seed: int = 0,
                        track: Callable | None = None, total: int | None = None) -> dict:
    objective, backbone = module.objective, module.backbone
    device = next(module.parameters()).device
    repeats = max(1, int(t_samples)) if has_noise_process(objective) else 1
    nelbo, accuracy = NELBO(), CorruptionAccuracy()
    batch_nll, batch_tokens, within_var = [], [], []
    items = enumerate(batches)
    if track is not None:
        items = track(items, total=total, description="likelihood")
    for b, batch in items:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        sums = []
        for r in range(repeats):
            out = objective.loss(backbone, batch, noise_generator(seed, validation_stream(b, r), device), train=False)
            nelbo.update(out.nll_sum.cpu(), out.n_tokens.cpu())
            if out.token_correct is not None:
                level = out.token_level.cpu() if out.token_level is not None else None
                accuracy.update(out.token_correct.cpu(), out.token_confidence.cpu(), level)
            sums.append(float(out.nll_sum))
        batch_nll.append(sum(sums) / repeats)
        batch_tokens.append(float(out.n_tokens))
        within_var.append(_sample_var(sums))

    values = {f"val/{k}": float(v) for k, v in nelbo.compute().items()}
    values.update({f"val/{k}": float(v) for k, v in accuracy.compute().items()})
    n_total = sum(batch_tokens)
    estimate = sum(batch_nll) / max(n_total, 1.0)
    m = len(batch_nll)
    if m >= 2 and n_total > 0:
        resid = sum((y - estimate * n) ** 2 for y, n in zip(batch_nll, batch_tokens))
        values["val/nelbo_stderr"] = math.sqrt(resid * m / (m - 1)) / n_total
        values["val/bpt_stderr"] = values["val/nelbo_stderr"] / math.log(2)
    else:
        values["val/nelbo_stderr"] = values["val/bpt_stderr"] = None
    if repeats >= 2 and n_total > 0:
        values["val/nelbo_t_stderr"] = math.sqrt(sum(within_var) / repeats) / n_total
    else:
        values["val/nelbo_t_stderr"] = 0.0 if not has_noise_process(objective) else None
    values.update({"val/tokens": n_total, "val/batches": m, "t_samples": repeats})
    return values


def _sample_var(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    mean = sum(xs) / len(xs)
    return sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
