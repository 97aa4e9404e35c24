"""Drafters for sampler=speculative (sampling/speculative.py): a cheaper model proposes k tokens after each row's
context, with the distributions q it drew them from (the verification rule needs both).

  `ARDrafter`      an autoregressive checkpoint drafts k tokens left to right (k passes; classic speculative decoding);
  `MaskedDrafter`  an absorbing-state checkpoint (masked_discrete, llada; full-sequence or block diffusion) masks the
                   k positions after the context and drafts them in one pass, each from its own marginal q_i;
  `HybridDrafter`  objective=hybrid's own draft block on the target's network (`contracts.DraftsForItself`), against
                   the target's KV cache when it can (`draft_with_cache`: 1 + k positions), or verifying the last
                   drafts and pre-drafting the next in one pass (`verify_and_predraft`, TiDAR).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

from diffuse.contracts import (
    AUTOREGRESSIVE,
    Absorbing,
    Seekable,
    TakesCachedLayout,
    block_size_of,
    component_name,
    new_cache,
)
from diffuse.errors import DiffuseError
from diffuse.models.layers import BlockLayout
from diffuse.sampling.base import draw, left_padded, rand_rows


# -- drafters -------------------------------------------------------------------------------------------------
@runtime_checkable
class Drafter(Protocol):
    """Proposes k tokens after each context, with the distributions they were drawn from."""

    vocab_size: int
    special: Any  # SpecialTokens: must equal the target's
    positions: int  # positions run through its network so far
    draft_length: int  # k when sampler.draft_length is null
    max_draft_length: int | None  # the most tokens one `draft` call proposes (None: any)

    def passes(self, k: int) -> int:
        """Forward passes one `draft` call of k tokens costs."""
        ...

    def draft(self, contexts: list[list[int]], k: int, gens: list[torch.Generator],
              warp: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """contexts: each row's tokens so far (prompt and committed, no BOS); gens: each row's generator.
        Returns (tokens [B, k], q [B, k, V]): q[:, i] is the warped distribution tokens[:, i] was drawn from
        (given the context and tokens[:, :i])."""
        ...

    def to(self, device) -> Any: ...


DRAFT_LENGTH = 4  # k of a drafter that has no preference of its own (sampler.draft_length=null)


class _ModelDrafter:
    """A diffuse checkpoint's backbone and objective (eval mode) as a drafter."""

    draft_length: int = DRAFT_LENGTH
    max_draft_length: int | None = None

    def __init__(self, backbone, objective, name: str = "drafter"):
        self.backbone, self.objective, self.name = backbone.eval(), objective, name
        self.vocab_size, self.special, self.positions = backbone.vocab_size, objective.special, 0

    def to(self, device):
        self.backbone.to(device)
        return self

    @property
    def device(self):
        return next(self.backbone.parameters()).device

    def passes(self, k: int) -> int:
        """One pass drafts all k (the masked and hybrid drafters); the AR drafter overrides it."""
        return 1


class ARDrafter(_ModelDrafter):
    """An autoregressive model drafts k tokens left to right: a prefill of the context, then one position per
    token through its KV cache (k passes)."""

    def passes(self, k: int) -> int:
        return k

    @torch.no_grad()
    def draft(self, contexts, k, gens, warp):
        ids, seg = left_padded(contexts, self.special, self.device)
        cache = new_cache(self.backbone, ids.shape[1] + k)
        tokens, qs = [], []
        step_ids, step_seg = ids, seg
        for i in range(k):
            if cache is None:
                step_ids = torch.cat([ids] + [t[:, None] for t in tokens], 1)
                step_seg = torch.cat([seg, torch.ones_like(step_ids[:, ids.shape[1]:])], 1)
            hidden = self.backbone(ids=step_ids, segment_ids=step_seg, causal=True,
                                   **({"cache": cache} if cache is not None else {}))
            self.positions += step_ids.shape[1]
            logits = self.backbone.logits(hidden[:, -1]).float()
            logits[..., self.special.mask] = float("-inf")
            q = warp(logits)
            tok = draw(q, rand_rows(gens, (), q.device))
            tokens.append(tok)
            qs.append(q)
            step_ids, step_seg = tok[:, None], torch.ones_like(tok[:, None])
        return torch.stack(tokens, 1), torch.stack(qs, 1)


def context_then_masks(contexts, k: int, special, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[PAD…, BOS, context, MASK × k] per row (left-padded to the longest context) and its segment ids."""
    head, head_seg = left_padded(contexts, special, device)
    masks = torch.full((head.shape[0], k), special.mask, dtype=torch.long, device=device)
    return torch.cat([head, masks], 1), torch.cat([head_seg, torch.ones_like(masks)], 1)


class MaskedDrafter(_ModelDrafter):
    """An absorbing-state model drafts the k positions after the context in one pass: canvas [BOS, context,
    MASK × k], q_i its (SUBS) distribution at the i-th mask, each draft drawn independently from its q_i. A full-
    sequence model reads the canvas bidirectionally; a block diffusion model (objective.block_size) reads it
    block-causally, blocks counted from the first draft (as sampler=block aligns them), at t = 1 on the drafts."""

    @torch.no_grad()
    def draft(self, contexts, k, gens, warp):
        special, device = self.special, self.device
        z, seg = context_then_masks(contexts, k, special, device)
        B, W = z.shape[0], z.shape[1] - k
        size = block_size_of(self.objective)
        if size:
            columns = torch.arange(W + k, device=device)
            layout = BlockLayout.clean_blocks(torch.div(columns - W, size, rounding_mode="floor"))
            times = torch.zeros(B, W + k, device=device)
            times[:, W:] = 1.0
            hidden = self.backbone(ids=z, segment_ids=seg, t=times, layout=layout)
        else:  # the mask ratio of each row's canvas sets its t (time-conditioned models read it)
            ratio = [k / (k + 1 + len(c)) for c in contexts]
            t = torch.tensor([self.objective.t_for_mask_prob(r) for r in ratio], device=device)
            hidden = self.backbone(ids=z, segment_ids=seg, t=t)
        self.positions += W + k
        q = warp(self.objective.log_probs(self.backbone.logits(hidden[:, W:]), z[:, W:]))
        return draw(q, rand_rows(gens, (k,), device)), q


def context_then_block(columns: torch.Tensor, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(block keys, clean) of [a clean context of e tokens ; one draft block]: BlockLayout.clean_and_draft's rule,
    clean token c keyed c (token-causal), the draft block keyed e (it sees every context token)."""
    return torch.where(columns < e, columns, e), columns < e


class HybridDrafter(_ModelDrafter):
    """objective=hybrid's own draft block (objectives/hybrid.py, TiDAR), on the target's network: one pass over
    [PAD…, BOS, context ; MASK × k] in the hybrid's layout (models/layers.py BlockLayout.clean_and_draft): the
    context is the clean row (token-causal), the k masks one draft block right after it, keyed at the context's
    width W, so it sees itself bidirectionally and every clean context token; mask i sits at RoPE position W + i
    and predicts the token W + i, as draft block j predicts tokens j·b … j·b+b−1 from x_<j·b in training (RoPE is
    relative: the block's offset in the row does not matter). q_i = warp(its logits), the k drafts drawn
    independently. k ≤ objective.block_size: training never showed a block longer than that.

    `draft` runs the whole context (W + k positions). When the sampler's target is this very network with a KV
    cache whose cached forward takes a block layout (`supports_cached_layout`: the transformer), it calls
    `draft_with_cache` instead: one call against the target's cache of [the row's committed tokens the cache
    does not hold yet (usually the last one), clean and token-causal ; k MASK as one draft block keyed right
    after them] — e + k positions, e the most such tokens of a row — after which the cache is truncated back to
    where it was, so the verification's bookkeeping is untouched (it feeds those tokens again: their query
    gives p_1). The backbone's train/eval mode is the caller's: it is the model being trained or sampled."""

    def __init__(self, backbone, objective, name: str = "objective=hybrid's draft block"):
        self.backbone, self.objective, self.name = backbone, objective, name
        self.vocab_size, self.special, self.positions = backbone.vocab_size, objective.special, 0
        self.max_draft_length = int(objective.draft_block_size)
        self.draft_length = min(self.max_draft_length, DRAFT_LENGTH)

    @torch.no_grad()
    def draft(self, contexts, k, gens, warp):
        special, device = self.special, self.device
        z, seg = context_then_masks(contexts, k, special, device)
        W = z.shape[1] - k
        columns = torch.arange(W + k, device=device)
        layout = BlockLayout(*context_then_block(columns, W), columns)
        hidden = self.backbone(ids=z, segment_ids=seg, layout=layout)
        self.positions += W + k
        return self.propose(hidden[:, W:], gens, warp)

    def shares_cache(self, backbone, cache) -> bool:
        """Whether `draft_with_cache` may draft against `backbone`'s KV cache `cache`."""
        return (cache is not None and backbone is self.backbone and isinstance(cache, Seekable)
                and isinstance(backbone, TakesCachedLayout) and backbone.supports_cached_layout)

    @torch.no_grad()
    def draft_with_cache(self, cache, tails, rows, batch, k, gens, warp):
        """`draft` against the target's KV cache, which holds every row's committed tokens but the last
        `len(tails[j])` of row rows[j] (tails[j]: those tokens, at least one) at one column per position
        (sampler=speculative's bookkeeping). Feeds, right-padded over all `batch` rows of the cache (rows not
        drafting are padding): [tail (clean, causal) ; MASK × k (one draft block keyed after the tail)], then
        truncates the cache back. Returns what `draft` returns for the rows."""
        special, device = self.special, self.device
        start = cache.length
        width = max(len(t) for t in tails) + k
        ids = torch.full((batch, width), special.pad, dtype=torch.long, device=device)
        seg = torch.zeros_like(ids)
        columns = torch.arange(width, device=device)
        block = columns.repeat(batch, 1)
        clean = torch.ones_like(ids, dtype=torch.bool)
        ends = []
        for j, r in enumerate(rows):
            e = len(tails[j])
            ids[r, :e] = torch.tensor(tails[j], dtype=torch.long, device=device)
            ids[r, e : e + k] = special.mask
            seg[r, : e + k] = 1
            block[r], clean[r] = context_then_block(columns, e)
            ends.append(e)
        layout = BlockLayout(block, clean, columns)
        hidden = self.backbone(ids=ids, segment_ids=seg, cache=cache, layout=layout)
        cache.truncate(start)
        self.positions += width
        at = torch.tensor(ends, device=device)[:, None] + torch.arange(k, device=device)
        return self.propose(hidden[torch.tensor(rows, device=device)[:, None], at], gens, warp)  # [n, k, D]

    @torch.no_grad()
    def verify_and_predraft(self, cache, tails, drafts, rows, batch, k):
        """TiDAR's single pass (arXiv 2511.08923): verify the previous drafts and pre-draft the next ones for every
        acceptance outcome at once. Against the target's KV cache (which holds each row's committed tokens but its
        `tails`, as for `draft_with_cache`), each drafting row rows[j] feeds

            [tail (e tokens) ; d_1..d_n (its drafts)]  clean, token-causal: AR's verification pass
            [MASK × (k+1)] × (n+1)                     block a (a = 0..n) sees the tail and d_1..d_a, keyed
                                                       e + a, at RoPE positions e + a … e + a + k

        so block a is the draft block the hybrid would run after accepting a drafts. Its first slot sits where the
        rule's correction (or bonus) token goes, which the pass cannot know: it is dropped, and slots 1..k are the
        next k drafts (hence k + 1 ≤ the objective's block). The clean columns are padded to a common width E, the
        blocks follow. Returns (hidden of the clean columns e−1 … e−1+n [m, n+1, D]: they give p_1..p_{n+1};
        hidden of every block's slots 1..k [m, n+1, k, D]; the pass's width). Its K/V stay in the cache: the
        caller keeps the verified columns, as after a verification pass."""
        special, device = self.special, self.device
        n, size = drafts.shape[1], k + 1
        E = max(len(t) for t in tails) + n
        width = E + (n + 1) * size
        ids = torch.full((batch, width), special.pad, dtype=torch.long, device=device)
        seg = torch.zeros_like(ids)
        key, positions = torch.zeros_like(ids), torch.zeros_like(ids)
        clean = torch.zeros_like(ids, dtype=torch.bool)
        outcome = torch.arange(n + 1, device=device).repeat_interleave(size)  # block a of each block column
        slot = torch.arange(size, device=device).repeat(n + 1)
        columns = torch.arange(E, device=device)
        for j, r in enumerate(rows):
            e = len(tails[j])
            ids[r, :e] = torch.tensor(tails[j], dtype=torch.long, device=device)
            ids[r, e : e + n] = drafts[j]
            ids[r, E:] = special.mask
            seg[r, : e + n], seg[r, E:] = 1, 1
            key[r, :E], positions[r, :E], clean[r, :E] = columns, columns, True
            key[r, E:], positions[r, E:] = e + outcome, e + outcome + slot
        hidden = self.backbone(ids=ids, segment_ids=seg, cache=cache, layout=BlockLayout(key, clean, positions))
        self.positions += (n + 1) * size
        picked = torch.tensor(rows, device=device)
        ends = torch.tensor([len(t) for t in tails], device=device)
        h_clean = hidden[picked[:, None], ends[:, None] - 1 + torch.arange(n + 1, device=device)]
        h_blocks = hidden[picked, E:].view(len(rows), n + 1, size, -1)[:, :, 1:]
        return h_clean, h_blocks, width

    def propose(self, hidden: torch.Tensor, gens, warp):
        """(drafts [n, k], q [n, k, V]) from the draft block's hidden states: q = warp(logits), [MASK] excluded."""
        logits = self.backbone.logits(hidden).float()
        logits[..., self.special.mask] = float("-inf")
        q = warp(logits)
        return draw(q, rand_rows(gens, q.shape[1:2], q.device)), q


def drafter_from(backbone, objective, name: str = "sampler.drafter") -> Drafter:
    """The drafter a checkpoint's backbone and objective make: autoregressive → ARDrafter, absorbing-state
    (masked_discrete, llada, full-sequence or block) → MaskedDrafter; anything else one line."""
    if objective.process == AUTOREGRESSIVE:
        return ARDrafter(backbone, objective, name)
    if isinstance(objective, Absorbing):
        return MaskedDrafter(backbone, objective, name)
    raise DiffuseError(f"{name}: objective={component_name(objective)} ({objective.process} process) cannot draft "
                       "tokens; give an autoregressive or absorbing-state (masked_discrete, llada) checkpoint")


def check_same_tokenizer(drafter: Drafter, backbone, special, name: str = "sampler.drafter") -> None:
    if drafter.vocab_size != backbone.vocab_size or tuple(vars(drafter.special).values()) != tuple(vars(special).values()):
        raise DiffuseError(
            f"{name} has another tokenizer than the target (vocab {drafter.vocab_size}, specials {vars(drafter.special)} "
            f"vs vocab {backbone.vocab_size}, specials {vars(special)}); train the drafter with the same tokenizer")
