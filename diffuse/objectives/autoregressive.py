"""Next-token prediction on the same backbone in causal mode. Its val/nelbo is the exact NLL, so AR
and diffusion models sit on one bits-per-token scale (both predict every token except BOS)."""

from __future__ import annotations

import torch.nn.functional as F

from diffuse.objectives.base import LossOutput, SpecialTokens, predicted_token_stats
from diffuse.registry import OBJECTIVES


@OBJECTIVES.register("autoregressive")
class Autoregressive:
    causal = True
    default_sampler = "ar"

    def __init__(self, special: SpecialTokens, schedule=None):
        self.special = special  # the schedule is unused: AR has no noise process

    def loss(self, backbone, batch, generator=None, train: bool = True) -> LossOutput:
        ids, seg = batch["input_ids"], batch["segment_ids"]
        logits = backbone.logits(backbone(ids=ids, segment_ids=seg, causal=True))[:, :-1].float()
        logits[..., self.special.mask] = float("-inf")  # never a target, never sampled: the NLL is over V
        targets = ids[:, 1:]
        # predict a token only from earlier tokens of its own document
        where = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
        nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        n_tokens = where.sum()
        nll_sum = nll[where].sum()
        correct, conf = predicted_token_stats(logits, targets, where)
        return LossOutput(
            loss=nll_sum / n_tokens.clamp_min(1),
            nll_sum=nll_sum.detach(),
            n_tokens=n_tokens,
            token_correct=correct,
            token_confidence=conf,
        )
