"""Exact speculative sampling (Leviathan et al. 2023; Chen et al. 2023): an autoregressive model's own output
distribution, with k tokens drafted at a time by a cheaper drafter and verified in one pass of the target.

The rule (Leviathan et al. 2023; Chen et al. 2023), `speculative_rule`: drafts d_1..d_k drawn from q_1..q_k (q_i may depend on d_<i);
the target's pass over [last committed token ; d_1..d_k] gives p_1..p_{k+1}. For i = 1..k accept d_i with
probability min(1, p_i(d_i)/q_i(d_i)); at the first rejection draw from norm(max(0, p_i − q_i)) and stop; if
every draft is accepted, draw a bonus token from p_{k+1}. Every emitted token is distributed exactly as AR
sampling from p. Temperature, top-k and top-p are applied to p and q alike before the rule (`Warp`, the AR
sampler's order: truncate the log-probabilities, then divide by T); temperature 0 makes both one-hot on their
argmax, and the same rule is then greedy decoding: accept while d_i = argmax p_i, then argmax p.

The target is the checkpoint's backbone decoded causally with its KV cache (a `Seekable` one: rejected
positions are forgotten with `truncate`); a backbone without one (or with a recurrent state, which cannot roll
back) re-runs its whole prefix each step. Rows advance independently — each accepts its own count — while the
cache keeps one column per position for every row (RoPE is relative; left padding invisible): after a step the
cache keeps the columns every decoding row has verified, and a row that got ahead feeds its extra committed
tokens again in front of its next drafts (right-padded, so no row has a hole). Every draw comes from the row's
own generator and only while the row decodes, so a batch gives what the same samples give one at a time.

Drafters (sampling/drafters.py): a checkpoint with the target's tokenizer given as `sampler.drafter=CKPT` (an
AR or absorbing-state model, loaded by the commands: diffuse/run/entry.py `sampler_spec`; this layer imports
nothing of diffuse.run), or, with no drafter, objective=hybrid's own draft block (`contracts.DraftsForItself`).
`sampler.draft_length=null` takes the drafter's own k (`Drafter.draft_length`: 4, the hybrid min(block_size, 4)); a
k past what the drafter drafts in one pass (`max_draft_length`: the hybrid's block) is refused in one line.

TiDAR's single pass (`sampler.predraft`, null: whenever possible): with objective=hybrid drafting for itself on the
cached target, one pass per step verifies the drafts the last pass pre-drafted and pre-drafts the next k for every
acceptance outcome (drafters.HybridDrafter.verify_and_predraft: (k+1) blocks of k+1 masks beside the k+1 clean
positions); the rule's outcome picks the block. The drafts are then drawn knowing the accepted drafts but not the
correction/bonus token (the block's first slot, dropped): still exact, as any q fixed before the test is.

Cost: NFE = the target's verification passes + the drafter's passes (fused: the passes); `positions` counts both
networks' widths.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from diffuse.contracts import (
    AUTOREGRESSIVE,
    DraftsForItself,
    Seekable,
    new_cache,
)
from diffuse.core.checks import check_range
from diffuse.errors import DiffuseError
from diffuse.registry import SAMPLERS
from diffuse.sampling.base import (
    SampleOutput,
    check_temperature,
    check_truncation,
    draw,
    left_padded,
    rand_rows,
    row_generators,
    trim_at_eos,
    truncate,
)
from diffuse.sampling.drafters import Drafter, HybridDrafter, check_same_tokenizer
from diffuse.sampling.trace import recorder


# -- the rule -------------------------------------------------------------------------------------------------
def speculative_rule(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor,
                     u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One speculative step for a batch of independent rows.

    p [B, k+1, V]: the target's (warped) probabilities for each prefix; q [B, k, V]: the drafter's, from which
    `drafts` [B, k] were drawn; u [B, k+1]: uniforms (k acceptance tests, one draw). Returns (accepted [B] in
    0..k, the next token [B]): the row emits drafts[:accepted] then the next token — drawn from
    norm(max(0, p_i − q_i)) at the first rejection i, or from p_{k+1} when every draft was accepted.
    """
    B, k = drafts.shape
    pd = p[:, :k].gather(-1, drafts[..., None])[..., 0]
    qd = q.gather(-1, drafts[..., None])[..., 0]
    accept = u[:, :k] * qd < pd  # u < min(1, p/q), without dividing (q(d) > 0: d was drawn from q)
    n = accept.long().cumprod(1).sum(1)
    at = n[:, None, None].expand(B, 1, p.shape[-1])
    q_next = torch.cat([q, q.new_zeros(B, 1, q.shape[-1])], 1).gather(1, at)[:, 0]  # 0 at the bonus position
    p_next = p.gather(1, at)[:, 0]
    residual = (p_next - q_next).clamp_min(0)
    # a rejection leaves mass where p > q; only rounding (p = q) could leave none: then p itself
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_next)
    return n, draw(residual, u[:, k])


class Warp:
    """Temperature / top-k / top-p, as the AR sampler applies them: log-probabilities truncated, then divided by
    T; T = 0: one-hot on the argmax. Logits [..., V] → probabilities [..., V] (float32)."""

    def __init__(self, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None):
        self.temperature, self.top_k, self.top_p = check_temperature(temperature), *check_truncation(top_k, top_p)

    def __call__(self, logp: torch.Tensor) -> torch.Tensor:
        logp = logp.float().log_softmax(-1)
        if self.temperature <= 0:
            return torch.zeros_like(logp).scatter_(-1, logp.argmax(-1, keepdim=True), 1.0)
        return (truncate(logp, self.top_k, self.top_p) / self.temperature).softmax(-1)


def _padded(rows: list[list[int]], length: int, pad: int) -> torch.Tensor:
    return torch.tensor([r[:length] + [pad] * (length - len(r[:length])) for r in rows], dtype=torch.long)


# -- the sampler ----------------------------------------------------------------------------------------------
@SAMPLERS.register("speculative")
class SpeculativeSampler:
    """Exact speculative sampling of an autoregressive checkpoint; defaults as conf/sampler/speculative.yaml."""

    processes = (AUTOREGRESSIVE,)
    requires = ()  # `special` only; the drafter is checked at generate time
    any_length = False  # positions past data.seq_len were never trained (drafts may run k past it: never kept)
    rule = staticmethod(speculative_rule)  # (p, q, drafts, u) → (accepted, next token); tests swap in wrong ones

    def __init__(self, drafter: Any = None, draft_length: int | None = None, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, predraft: bool | None = None):
        if isinstance(drafter, (str, os.PathLike)):
            raise DiffuseError(f"sampler.drafter={drafter} is a checkpoint path, which only diffuse.sample, evaluate "
                               "and compare load; here (a training config?) use sampler=ar")
        if drafter is not None and not isinstance(drafter, Drafter):
            raise DiffuseError(f"sampler.drafter must be a checkpoint path or a Drafter, not {type(drafter).__name__}")
        check_range("sampler.draft_length", draft_length, 1, integer=True, null="the drafter's own")
        if predraft not in (None, True, False):
            raise DiffuseError(f"sampler.predraft={predraft!r} must be true, false or null")
        self.drafter, self.k, self.predraft = drafter, None if draft_length is None else int(draft_length), predraft
        self.warp = Warp(temperature, top_k, top_p)
        self.stats: dict[str, float] = {}

    def _drafter(self, backbone, objective) -> Drafter:
        drafter = self.drafter
        if drafter is None and isinstance(objective, DraftsForItself):
            drafter = HybridDrafter(backbone, objective)
        if drafter is None:
            raise DiffuseError("sampler=speculative needs a drafter: sampler.drafter=CKPT (an autoregressive or "
                               "masked diffusion checkpoint with the same tokenizer)")
        check_same_tokenizer(drafter, backbone, objective.special)
        return drafter.to(next(backbone.parameters()).device)

    def fused(self, drafter: Drafter, backbone, cache) -> bool:
        """Whether each step is TiDAR's single pass (HybridDrafter.verify_and_predraft): sampler.predraft, where
        null means whenever the drafter is the hybrid's own draft block on the target's cache and its block holds
        a draft and the dropped first slot (objective.block_size ≥ 2)."""
        possible = (isinstance(drafter, HybridDrafter) and drafter.shares_cache(backbone, cache)
                    and drafter.max_draft_length >= 2)
        if self.predraft and not possible:
            raise DiffuseError("sampler.predraft=true needs objective=hybrid drafting for itself (no sampler.drafter) "
                               "with objective.block_size ≥ 2 on a transformer with a KV cache; use sampler.predraft=null")
        return possible if self.predraft is None else self.predraft

    def draft_length(self, drafter: Drafter, fused: bool = False) -> int:
        """k: sampler.draft_length, or the drafter's own when null; at most what it drafts in one call (one less
        when pre-drafting: a pre-draft block's first slot is dropped)."""
        most = drafter.max_draft_length if not fused else drafter.max_draft_length - 1
        own = drafter.draft_length if most is None else min(drafter.draft_length, most)
        k = own if self.k is None else self.k
        if most is not None and k > most:
            what = f"{drafter.name} drafts at once" if not fused else f"{drafter.name} pre-drafts (its block less one)"
            raise DiffuseError(f"sampler.draft_length={k} is more than {what} ({most} tokens); "
                               f"use sampler.draft_length ≤ {most}, or null for {own}")
        return k

    @torch.no_grad()
    def generate(self, backbone, objective, prompts, length, seed=0) -> SampleOutput:
        if length <= 0:
            raise DiffuseError(f"sampler length={length} must be positive")
        special, B = objective.special, len(prompts)
        device = next(backbone.parameters()).device
        drafter = self._drafter(backbone, objective)
        drafter_positions = drafter.positions
        gens = row_generators(seed, B, device)
        head, head_seg = left_padded(prompts, special, device)
        W = head.shape[1]
        seqs = [[special.bos] + list(p) for p in prompts]  # each row's committed tokens, BOS included
        out: list[list[int]] = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool, device=device)
        row_verify = torch.zeros(B, dtype=torch.long, device=device)  # verification passes each row ran
        prefill = torch.zeros(B, dtype=torch.long, device=device)
        most = self.k or drafter.max_draft_length or drafter.draft_length  # ≥ k: room for the widest pass
        cache = new_cache(backbone, W + length + most + 1 + (most + 1) ** 2)
        if cache is not None and not isinstance(cache, Seekable):
            cache = None  # a recurrent state cannot forget rejected drafts: re-run the prefix instead
        fused = self.fused(drafter, backbone, cache)
        k = self.draft_length(drafter, fused)
        carried = None  # fused: the drafts [B, k] and their q [B, k, V] the last pass pre-drafted for each row
        nfe = positions = 0
        pending = [1] * B  # committed tokens at the end of each row that the cache does not hold yet
        if cache is not None and W > 1:  # the prompt's prefill, its last token left for the first verification
            backbone(ids=head[:, :-1], segment_ids=head_seg[:, :-1], causal=True, cache=cache)
            nfe, positions = nfe + 1, positions + W - 1
            prefill = (head_seg.sum(1) > 1).long()  # alone, a row with an empty prompt has nothing to prefill
        accepted_total = drafted_total = 0
        rec = recorder(self)  # OFF unless traced (sampling/trace.py): one step per verification pass
        while not done.all():
            rows = (~done).nonzero().squeeze(1).tolist()
            row_gens = [gens[r] for r in rows]
            if fused:  # one pass: verify the carried drafts (none on the first), pre-draft the next
                V = backbone.vocab_size
                drafts, q = ((carried[0][rows], carried[1][rows]) if carried is not None else
                             (head.new_zeros(len(rows), 0), torch.zeros(len(rows), 0, V, device=device)))
                h_clean, h_blocks, width = drafter.verify_and_predraft(
                    cache, [seqs[r][-pending[r]:] for r in rows], drafts, rows, B, k)
                p = self._p(backbone, h_clean, special)
                positions += width - (drafts.shape[1] + 1) * (k + 1)  # the blocks count as the drafter's
            else:
                if isinstance(drafter, HybridDrafter) and drafter.shares_cache(backbone, cache):
                    drafts, q = drafter.draft_with_cache(cache, [seqs[r][-pending[r]:] for r in rows], rows, B, k,
                                                         row_gens, self.warp)
                else:
                    drafts, q = drafter.draft([seqs[r][1:] for r in rows], k, row_gens, self.warp)
                nfe += drafter.passes(k)
                p, width = self._verify(backbone, cache, seqs, pending, rows, drafts, special, B, device)
                positions += width
            nfe += 1
            row_verify[rows] += 1
            n, nxt = self.rule(p, q, drafts, rand_rows(row_gens, (drafts.shape[1] + 1,), device))
            if fused:  # the block of each row's outcome holds its next drafts
                picked = torch.arange(len(rows), device=device)
                next_drafts, next_q = drafter.propose(h_blocks[picked, n], row_gens, self.warp)
                if carried is None:
                    carried = (head.new_zeros(B, k), torch.zeros(B, k, next_q.shape[-1], device=device))
                carried[0][rows], carried[1][rows] = next_drafts, next_q
            accepted_total += int(n.sum())
            drafted_total += drafts.shape[1] * len(rows)
            verified = self._commit(rows, drafts, n, nxt, out, seqs, pending, done, length, special)
            rec.step(lambda: _padded(out, length, special.pad), nfe=nfe, blank=special.pad)
            if cache is not None and not done.all():  # keep the columns every decoding row verified
                live = [r for r in rows if not done[r]]
                keep = min(verified[r] for r in live)
                cache.truncate(cache.length - width + keep)
                for r in live:
                    pending[r] = verified[r] + 1 - keep
        tokens = torch.full((B, length), special.pad, dtype=torch.long, device=device)
        for r, o in enumerate(out):
            tokens[r, : len(o)] = torch.tensor(o, dtype=torch.long, device=device)
        tokens, lengths = trim_at_eos(tokens, special)
        draft_positions = drafter.positions - drafter_positions
        positions += draft_positions
        # what the last call measured: drafts accepted, tokens emitted per verification pass (per row), and the
        # positions the drafter ran (of `positions`)
        self.stats = {"draft_length": k, "predraft": fused, "acceptance_rate": accepted_total / max(drafted_total, 1),
                      "tokens_per_verification": sum(map(len, out)) / max(int(row_verify.sum()), 1),
                      "draft_positions": draft_positions}
        row_nfe = prefill + row_verify * (1 if fused else 1 + drafter.passes(k))
        return SampleOutput(tokens, lengths, nfe, [list(p) for p in prompts], row_nfe, positions)

    def _verify(self, backbone, cache, seqs, pending, rows, drafts, special, B, device):
        """One causal pass of the target over each decoding row's uncached committed tokens and its drafts (or the
        whole row without a cache): the warped p_1..p_{k+1} [n, k+1, V] and the pass's width."""
        if cache is not None:
            ids, seg, at = self._cached_input(seqs, pending, rows, drafts, special, B, device)
            hidden = backbone(ids=ids, segment_ids=seg, causal=True, cache=cache)
        else:
            ids, seg, at = self._full_input(seqs, rows, drafts, special, B, device)
            hidden = backbone(ids=ids, segment_ids=seg, causal=True)
        h = hidden[rows][torch.arange(len(rows), device=device)[:, None], at]  # [n, k+1, D]
        return self._p(backbone, h, special), ids.shape[1]

    def _p(self, backbone, hidden, special) -> torch.Tensor:
        """The target's warped next-token probabilities from hidden states of its clean (causal) stream."""
        logits = backbone.logits(hidden).float()
        logits[..., special.mask] = float("-inf")
        return self.warp(logits)

    @staticmethod
    def _commit(rows, drafts, n, nxt, out, seqs, pending, done, length, special) -> dict[int, int]:
        """Each row's accepted drafts and its residual/bonus token, cut at `length` and after EOS; marks the rows
        done; returns {row: columns of this pass whose K/V are the row's committed tokens}."""
        verified = {}
        for j, r in enumerate(rows):
            new = drafts[j, : n[j]].tolist() + [int(nxt[j])]
            new = new[: length - len(out[r])]
            if special.eos in new:
                new = new[: new.index(special.eos) + 1]
            out[r] += new
            seqs[r] += new
            verified[r] = pending[r] + int(n[j])
            if new[-1] == special.eos or len(out[r]) >= length:
                done[r] = True
        return verified

    @staticmethod
    def _cached_input(seqs, pending, rows, drafts, special, B, device):
        """Each decoding row's uncached committed tokens then its drafts, right-padded (padding is invisible and
        comes after the row's tokens, so no row has a hole); finished rows are all padding. Also returns, per
        decoding row, the columns whose outputs predict the k+1 tokens after the committed ones."""
        k = drafts.shape[1]
        width = max(pending[r] for r in rows) + k
        ids = torch.full((B, width), special.pad, dtype=torch.long, device=device)
        seg = torch.zeros_like(ids)
        at = []
        for j, r in enumerate(rows):
            e = pending[r]
            ids[r, :e] = torch.tensor(seqs[r][-e:], device=device)
            ids[r, e : e + k] = drafts[j]
            seg[r, : e + k] = 1
            at.append(torch.arange(e - 1, e + k, device=device))
        return ids, seg, torch.stack(at)

    @staticmethod
    def _full_input(seqs, rows, drafts, special, B, device):
        """No cache: every row's whole sequence and its drafts, left-padded (finished rows: their sequence)."""
        k = drafts.shape[1]
        full = [list(s[1:]) for s in seqs]
        for j, r in enumerate(rows):
            full[r] = full[r] + drafts[j].tolist()
        ids, seg = left_padded(full, special, device)
        width = ids.shape[1]
        at = torch.arange(width - k - 1, width, device=device).expand(len(rows), k + 1)
        return ids, seg, at
