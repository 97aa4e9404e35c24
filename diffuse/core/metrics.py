"""torchmetrics for diffusion LMs: the likelihood bound and accuracy by corruption level."""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric

BUCKETS = (("low", 0.0, 0.3), ("mid", 0.3, 0.7), ("high", 0.7, 1.0001))


class NELBO(Metric):
    """Σ NLL (nats) / Σ tokens over an epoch → nelbo, bits per token, perplexity (an upper bound for
    diffusion models, the exact value for autoregressive ones)."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("nll", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, nll_sum: torch.Tensor, n_tokens: torch.Tensor):
        self.nll += nll_sum.double()
        self.tokens += n_tokens.double()

    def compute(self) -> dict[str, torch.Tensor]:
        nelbo = self.nll / self.tokens.clamp_min(1)
        return {"nelbo": nelbo, "bpt": nelbo / math.log(2), "ppl": nelbo.exp()}


class CorruptionAccuracy(Metric):
    """Accuracy of predicted tokens overall and in corruption buckets low/mid/high, plus the mean
    confidence (max probability) of the prediction."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        n = len(BUCKETS)
        for name in ("correct", "count"):
            self.add_state(name, torch.zeros(n + 1, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("confidence", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, correct: torch.Tensor, confidence: torch.Tensor, level: torch.Tensor | None = None):
        self.correct[0] += correct.sum().double()
        self.count[0] += correct.numel()
        self.confidence += confidence.sum().double()
        if level is not None:
            for i, (_, lo, hi) in enumerate(BUCKETS, start=1):
                inside = (level >= lo) & (level < hi)
                self.correct[i] += correct[inside].sum().double()
                self.count[i] += inside.sum().double()

    def compute(self) -> dict[str, torch.Tensor]:
        out = {"accuracy": self.correct[0] / self.count[0].clamp_min(1),
               "confidence": self.confidence / self.count[0].clamp_min(1)}
        for i, (name, _, _) in enumerate(BUCKETS, start=1):
            if self.count[i] > 0:
                out[f"accuracy_{name}"] = self.correct[i] / self.count[i]
        return out
