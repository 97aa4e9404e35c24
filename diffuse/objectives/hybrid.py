"""One network trained as an autoregressive model and a block diffusion drafter at once (TiDAR, arXiv
2511.08923; DiffusionGemma). The input is [x ; d], 2L positions, both rows at RoPE positions 0..L−1
(models/layers.py BlockLayout.clean_and_draft):

    clean row x   token-causal: clean position j sees the clean positions ≤ j of its document (AR attention);
    draft row d   cut into blocks of b from position 0: draft block k sees itself bidirectionally and the
                  clean positions < k·b of its document; nothing but the draft row sees the draft row.

Which position predicts what:
    clean position j   the logit predicts x_{j+1} (next-token CE: objectives/autoregressive.py next_token_loss);
    draft position i   holds [MASK] (or x_i, where the noise left it) and predicts x_i itself, given the clean
                       tokens before its block: draft block k proposes tokens k·b … k·b+b−1 from x_{<k·b}, as in
                       TiDAR and BD3LM. (The clean logit at k·b−1 predicts x_{k·b} too: the AR head is the
                       verifier of the draft's first token.)

Loss = L_AR + λ·L_diff (`diffusion_weight` λ), logged as train/ar_loss and train/diffusion_loss. `draft_noise`:
    full      every draft token masked (BOS, padding excepted), plain CE averaged over them: TiDAR's one-step
              drafter;
    sampled   a t per block and BD3LM's NELBO over the draft, with the absorbing objective's machinery
              (objectives/absorbing.py with block_size: antithetic t per block, the schedule's ELBO weight).
The draft loss is AbsorbingObjective.loss itself; only the network's input layout (`DraftRow.hidden`) and,
under `full`, the noise hooks change.

val/nelbo is the clean row's AR NLL (nats/token, exactly what objective=autoregressive reports on the same
weights and data), so the hybrid and the AR model sit on one scale. Because the clean row never sees the draft
row, its K/V are AR's KV cache: the process is `autoregressive`, and the hybrid decodes itself (`contracts.DraftsForItself`):
its default sampler=speculative drafts k ≤ block_size tokens in one pass of the draft row
(sampling/drafters.py HybridDrafter, a draft block of k masks right after the context) and
verifies them with the clean row and its KV cache — exactly AR's distribution; sampler=ar decodes the clean row
alone (the same tokens at temperature 0).
"""

from __future__ import annotations

import torch
from torch import nn

from diffuse.contracts import AUTOREGRESSIVE, TakesBlockLayout
from diffuse.core.checks import check_range
from diffuse.errors import DiffuseError
from diffuse.models.layers import BlockLayout
from diffuse.objectives.absorbing import AbsorbingObjective
from diffuse.objectives.autoregressive import next_token_loss
from diffuse.objectives.base import LossOutput, SpecialTokens
from diffuse.registry import OBJECTIVES
from diffuse.schedules import Schedule

DRAFT_NOISES = ("full", "sampled")


class DraftRow(AbsorbingObjective):
    """The draft row's loss: block diffusion (AbsorbingObjective with block_size) whose network input is the
    hybrid's [x ; d] rather than BD3LM's [x_t ; x_0]. One forward pass serves both losses: `hidden` keeps the
    clean row's hidden states for the AR loss (`take_clean`)."""

    def __init__(self, schedule: Schedule, special: SpecialTokens, block_size: int, full: bool, eps: float = 1e-3):
        super().__init__(schedule, special, eps=eps, block_size=block_size)
        self.full = full
        self._clean: torch.Tensor | None = None

    # -- `full`: every maskable draft token masked, each costing its plain CE -----------------------------
    def t_from_uniform(self, u: torch.Tensor, train: bool) -> torch.Tensor:
        return torch.ones_like(u) if self.full else super().t_from_uniform(u, train)

    def corrupt(self, x0, t, noise, batch) -> torch.Tensor:
        if not self.full:
            return super().corrupt(x0, t, noise, batch)
        return torch.where(self.maskable(batch), torch.full_like(x0, self.special.mask), x0)

    def elbo_weight(self, t: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(t) if self.full else super().elbo_weight(t)

    # -- the network's input: [x ; d] under the hybrid mask -----------------------------------------------
    def hidden(self, backbone, z, t, batch) -> torch.Tensor:
        B, L = z.shape
        seg = batch.get("segment_ids")
        t_tok = t.expand(B, L) if t.dim() == 2 else t.reshape(B, 1).expand(B, L)
        layout = BlockLayout.clean_and_draft(L, self.block_size, z.device)
        h = backbone(ids=torch.cat([batch["input_ids"], z], 1), t=torch.cat([torch.zeros_like(t_tok), t_tok], 1),
                     segment_ids=None if seg is None else seg.repeat(1, 2), layout=layout)
        self._clean = h[:, :L]
        return h[:, L:]

    def take_clean(self) -> torch.Tensor:
        """The clean row's hidden states of the last `hidden` call (handed over once)."""
        clean, self._clean = self._clean, None
        return clean


@OBJECTIVES.register("hybrid")
class Hybrid(nn.Module):
    process = AUTOREGRESSIVE  # the clean row is an AR model: exact NLL, sampler=ar with its KV cache
    causal = True
    default_sampler = "speculative"  # drafts by the draft row (HybridDrafter), verified by the clean row: exact AR

    def __init__(self, schedule: Schedule, special: SpecialTokens, block_size: int = 16, draft_noise: str = "full",
                 diffusion_weight: float = 1.0, eps: float = 1e-3):
        super().__init__()
        check_range("objective.block_size", block_size, 1, integer=True)
        if draft_noise not in DRAFT_NOISES:
            raise DiffuseError(f"objective.draft_noise={draft_noise!r} must be one of {', '.join(DRAFT_NOISES)}")
        self.diffusion_weight = check_range("objective.diffusion_weight", diffusion_weight, 0)
        self.block_size, self.draft_noise, self.special = block_size, draft_noise, special
        self.drafter = DraftRow(schedule, special, block_size, full=draft_noise == "full", eps=eps)
        self.global_step = 0

    def check_backbone(self, backbone, model_name: str) -> None:
        if not (isinstance(backbone, TakesBlockLayout) and backbone.supports_block_layout):
            raise DiffuseError(
                f"model={model_name} cannot train objective=hybrid: its draft row needs block-causal attention over "
                "[x ; d], which this backbone does not take (a bidirectional scan has no block-causal form here); "
                "use model=transformer or model=hf")
        if backbone.time_conditioned:
            raise DiffuseError("objective=hybrid decodes as an AR model, whose passes carry no t: set "
                               "model.time_conditioning=false")

    @property
    def draft_block_size(self) -> int:
        """contracts.DraftsForItself: sampler=speculative drafts with this network's draft row, k ≤ block_size."""
        return self.block_size

    def loss(self, backbone, batch, generator=None, train: bool = True) -> LossOutput:
        diffusion = self.drafter.loss(backbone, batch, generator, train)
        ar = next_token_loss(backbone, self.drafter.take_clean(), batch, self.special)
        return LossOutput(
            loss=ar.loss + self.diffusion_weight * diffusion.loss,
            nll_sum=ar.nll_sum,
            n_tokens=ar.n_tokens,
            metrics={"ar_loss": ar.loss.detach(), "diffusion_loss": diffusion.loss.detach(),
                     "draft_mask_ratio": diffusion.metrics["mask_ratio"]},
            token_correct=ar.token_correct,
            token_confidence=ar.token_confidence,
        )
