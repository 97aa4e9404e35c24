"""Next-token prediction on the same backbone in causal mode. Its val/nelbo is the exact NLL, so AR
and diffusion models sit on one bits-per-token scale (both predict every token except BOS). The head
and the cross-entropy run on the predicted positions only, chunk by chunk (objectives/losses.py)."""

from __future__ import annotations

from torch import nn

from diffuse.contracts import AUTOREGRESSIVE
from diffuse.objectives.base import LossOutput, SpecialTokens
from diffuse.objectives.losses import selected_cross_entropy
from diffuse.registry import OBJECTIVES


@OBJECTIVES.register("autoregressive")
class Autoregressive(nn.Module):
    process = AUTOREGRESSIVE
    causal = True
    default_sampler = "ar"

    def __init__(self, special: SpecialTokens, schedule=None):
        super().__init__()
        self.special = special  # the schedule is unused: AR has no noise process
        self.global_step = 0

    def loss(self, backbone, batch, generator=None, train: bool = True) -> LossOutput:
        hidden = backbone(ids=batch["input_ids"], segment_ids=batch["segment_ids"], causal=True)
        return next_token_loss(backbone, hidden, batch, self.special)


def next_token_loss(backbone, hidden, batch, special: SpecialTokens) -> LossOutput:
    """The next-token CE of causal hidden states [B, L, D] of `batch` (the logit at position j predicts token
    j+1): the AR objective's loss, and the hybrid's clean stream (objectives/hybrid.py)."""
    ids, seg = batch["input_ids"], batch["segment_ids"]
    hidden = hidden[:, :-1]
    # predict a token only from earlier tokens of its own document; [MASK] is never a target, never
    # sampled: the NLL is over V
    where = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    ce = selected_cross_entropy(backbone, hidden, where, ids[:, 1:], exclude=special.mask)
    n_tokens = where.sum()
    return LossOutput(
        loss=ce.total / n_tokens.clamp_min(1),
        nll_sum=ce.total.detach(),
        n_tokens=n_tokens,
        token_correct=ce.correct,
        token_confidence=ce.confidence,
    )
