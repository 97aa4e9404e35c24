"""Block diffusion decoding (BD3LM) with an exact KV cache, for objectives trained with `block_size` b.

The generated span is cut into blocks of b tokens decoded left to right; the prompt [BOS, prompt…] is
cut into blocks of b counted backwards from the first generated token (its first block may be short).
Attention is block-causal: a block sees the blocks before it and itself, exactly as a noisy block saw the
clean prefix in training (models/layers.py BlockLayout). So the K/V of a committed block never change:

    prefill      the prompt's blocks, one cached pass each (written to the cache once)
    block j      `steps` denoising steps, each one pass over the block's b positions only, reading the
                 cache; the step's own K/V are forgotten (KVCache.truncate), so no step sees another's
                 masks; commits as the absorbing samplers do (k most confident per step, LLaDA's even
                 split; or every token with confidence ≥ `threshold`, at least one: parallel decoding; or the
                 lowest-entropy tokens with Σ H − max H ≤ `gamma`, at least one: the EB-sampler)
    commit       one pass over the finished block writes its K/V to the cache (skipped after the last)

A sample's cost is therefore b·(steps + 1) positions per block and never a re-run of its prefix.
Blocks are counted from the first generated token, where training aligned them at BOS; packed training rows
start documents at every offset, so any alignment was seen (with `data.pack=false`, e.g. SFT, the answer's
first block was trained mid-grid: the partial block here is the same situation for the prompt side).
`use_cache` (null: the cache where the backbone has one — model=hf has none) `=false` decodes the same thing
without a cache — each step re-runs the whole canvas under the
block-causal mask — and gives the same tokens (tests/test_block_diffusion.py): the cache is exact.
A row stops at the end of the block holding its first EOS (lengths are per sample); generation may run
past the trained length (the cache grows with it; positions past `data.seq_len` were never trained).
Batch = singles: rows are left-padded (padding invisible, RoPE relative) and every draw comes from the
row's own generator, only while the row decodes (sampling/base.py).
"""

from __future__ import annotations

import torch

from diffuse.contracts import (
    BLOCK_ABSORBING,
    Absorbing,
    Blockwise,
    Cached,
    block_size_of,
    is_self_conditioned,
)
from diffuse.core.checks import check_range
from diffuse.errors import DiffuseError
from diffuse.models.layers import BlockLayout
from diffuse.registry import SAMPLERS
from diffuse.sampling.absorbing import (
    REMASKING,
    CommitTopK,
    EntropyBounded,
    even_share,
    one_per_step,
)
from diffuse.sampling.base import (
    RowCost,
    SampleOutput,
    check_temperature,
    left_padded,
    row_generators,
    sample_tokens,
    trim_at_eos,
)
from diffuse.sampling.trace import recorder
from diffuse.schedules import build_schedule


@SAMPLERS.register("block")
class BlockSampler:
    processes = (BLOCK_ABSORBING,)
    requires = (Absorbing, Blockwise)  # `log_probs` of the block's logits; `block_size`
    any_length = True  # block-causal: nothing ties the length to the trained canvas

    def __init__(self, steps: int = 8, threshold: float | None = None, remasking: str = "low_confidence",
                 temperature: float = 1.0, use_cache: bool | None = None, eps: float = 1e-3,
                 gamma: float | None = None):
        if int(steps) <= 0:
            raise DiffuseError(f"sampler.steps={steps} must be positive (denoising steps per block)")
        if threshold is not None and not 0.0 < threshold <= 1.0:
            raise DiffuseError(f"sampler.threshold={threshold} must lie in (0, 1] (or null: k per step)")
        if remasking not in REMASKING:
            raise DiffuseError(f"sampler.remasking={remasking!r} must be low_confidence or random")
        check_range("sampler.eps", eps, 0, 1, high_open=True)  # the end of each block's time grid 1 → eps
        self.steps, self.temperature, self.eps = int(steps), check_temperature(temperature), eps
        self.use_cache = use_cache  # None: the cache when the backbone has one (model=hf has none)
        if threshold is not None and gamma is not None:
            raise DiffuseError(f"sampler.threshold={threshold} and sampler.gamma={gamma} are two commit rules: set one")
        self.rule = (CommitTopK(one_per_step, "low_confidence", float(threshold)) if threshold is not None
                     else EntropyBounded(gamma) if gamma is not None else CommitTopK(even_share, remasking))
        self.schedule = build_schedule("linear")  # places the time grid handed to time-conditioned models

    @torch.no_grad()
    def generate(self, backbone, objective, prompts, length, seed=0) -> SampleOutput:
        size = block_size_of(objective)
        if not size:
            raise DiffuseError("sampler=block decodes models trained with objective.block_size; this objective "
                               "has none (use sampler=llada for a full-sequence model)")
        if length <= 0:
            raise DiffuseError(f"sampler length={length} must be positive")
        special, B = objective.special, len(prompts)
        walk = BlockWalk(backbone, prompts, special, size, length, special.mask, self.use_cache)
        x, run, cost, done = walk.x, walk.run, walk.cost, walk.done
        device = x.device
        gens = row_generators(seed, B, device)
        grid = self.schedule.grid(self.steps, self.eps, device)  # every block runs on the same time grid
        rec = recorder(self)  # OFF unless traced (sampling/trace.py)
        self_cond = is_self_conditioned(backbone)  # each step reads the block's previous probabilities
        for lo, hi in walk.blocks():
            prev = None
            for i in range(self.steps):
                masked = (x[:, lo:hi] == special.mask) & ~done[:, None]
                active = masked.any(1)
                if not active.any():
                    break
                logp = objective.log_probs(backbone.logits(run.block(x, lo, hi, grid[i], prev)), x[:, lo:hi])
                prev = logp.exp() if self_cond else None
                cost.forward(active)
                proposal = sample_tokens(logp, self.temperature, gens, active=active)
                last = i == self.steps - 1
                reveal = masked if last else self.rule.choose(masked, proposal, logp, grid[i], grid[i + 1], gens,
                                                              self.steps - i) & masked
                x[:, lo:hi] = torch.where(reveal, proposal, x[:, lo:hi])
                rec.step(x, nfe=run.nfe, committed=reveal, logp=logp, proposal=proposal, t=grid[i],
                         columns=slice(lo, hi))
        return walk.output(x.masked_fill(x == special.mask, special.pad))


def _time(n_rows: int, t, device) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float32, device=device).reshape(1).expand(n_rows)


class _Cached:
    """The exact cache: the prefix's K/V written once per block, a denoising step feeds its block only."""

    def __init__(self, backbone, head, head_seg, size, length):
        self.backbone, self.nfe, self.positions = backbone, 0, 0
        self.cache = backbone.new_cache(max_length=head.shape[1] + length)
        W = head.shape[1]
        for start in range(W - size * (-(-W // size)), W, size):  # prompt blocks, counted back from W
            a = max(0, start)
            self._run(head[:, a:start + size], head_seg[:, a:start + size], 0.0)

    def _run(self, ids, seg, t, prev=None):
        self.nfe += 1
        self.positions += ids.shape[1]
        extra = {} if prev is None else {"prev_probs": prev}
        return self.backbone(ids=ids, segment_ids=seg, t=_time(ids.shape[0], t, ids.device), cache=self.cache, **extra)

    def block(self, x, lo, hi, t, prev=None):
        """`prev`: self-conditioning's previous probabilities of the block [B, hi − lo, V] (None: nothing)."""
        kept = self.cache.length
        hidden = self._run(x[:, lo:hi], torch.ones_like(x[:, lo:hi]), t, prev)
        self.cache.truncate(kept)  # a denoising step is seen by nothing after it
        return hidden

    def commit(self, x, lo, hi) -> bool:
        """Write the finished block's K/V (one pass); True: a pass was run."""
        self._run(x[:, lo:hi], torch.ones_like(x[:, lo:hi]), 0.0)
        return True


class _Uncached:
    """The same decoding without a cache: the whole canvas under the block-causal mask at every step."""

    def __init__(self, backbone, head, head_seg, size):
        self.backbone, self.head, self.head_seg, self.size = backbone, head, head_seg, size
        self.nfe = self.positions = 0

    def block(self, x, lo, hi, t, prev=None):
        W, B = self.head.shape[1], self.head.shape[0]
        ids = torch.cat([self.head, x[:, :hi]], 1)
        seg = torch.cat([self.head_seg, torch.ones_like(x[:, :hi])], 1)
        columns = torch.arange(W + hi, device=ids.device)
        layout = BlockLayout.clean_blocks(torch.div(columns - W, self.size, rounding_mode="floor"))
        times = torch.zeros(B, W + hi, device=ids.device)
        times[:, W + lo:] = float(t)  # the block being denoised is at t; the prefix is clean
        self.nfe += 1
        self.positions += W + hi
        extra = {} if prev is None else {"prev_probs": torch.cat([prev.new_zeros(B, W + lo, prev.shape[-1]), prev], 1)}
        return self.backbone(ids=ids, segment_ids=seg, t=times, layout=layout, **extra)[:, W + lo:]

    def commit(self, x, lo, hi) -> bool:
        return False  # nothing to write: the next step re-runs the canvas


class BlockWalk:
    """What every block sampler (block, uniform_ancestral's and entropy_bound's block modes) does around its blocks:
    the runner — the exact KV cache where the backbone has one and `use_cache` allows, else the uncached
    block-causal canvas —, each row's cost (the cached prompt's prefill counted), the generated span `x` [B, length]
    starting as `fill`, and, after each block, the rows done (their EOS is in it) and the committing pass.
    `blocks()` yields (lo, hi) for the sampler to decode `x[:, lo:hi]`; `output(tokens)` is the SampleOutput."""

    def __init__(self, backbone, prompts, special, size: int, length: int, fill: int, use_cache: bool | None = None):
        cached = isinstance(backbone, Cached)
        use_cache = cached if use_cache is None else bool(use_cache)
        if use_cache and not cached:
            raise DiffuseError(f"sampler.use_cache=true, but {type(backbone).__name__} has no KV cache: use "
                               "sampler.use_cache=null (the cache where there is one) or false")
        device, B = next(backbone.parameters()).device, len(prompts)
        self.prompts, self.special, self.size, self.length = prompts, special, size, length
        head, head_seg = left_padded(prompts, special, device)
        self.run = _Cached(backbone, head, head_seg, size, length) if use_cache else _Uncached(backbone, head, head_seg, size)
        self.cost, self.done = RowCost(B, False, device), torch.zeros(B, dtype=torch.bool, device=device)
        if use_cache:  # the prompt's prefill: alone, a row runs its own prompt's blocks
            self.cost.per_row += -(-head_seg.sum(1) // size)
        self.x = torch.full((B, length), fill, dtype=torch.long, device=device)

    def blocks(self):
        for lo in range(0, self.length, self.size):
            hi = min(self.length, lo + self.size)
            yield lo, hi
            self.done |= (self.x[:, lo:hi] == self.special.eos).any(1)
            if self.done.all() or hi == self.length:
                return
            if self.run.commit(self.x, lo, hi):
                self.cost.forward(~self.done)

    def output(self, tokens: torch.Tensor) -> SampleOutput:
        tokens, lengths = trim_at_eos(tokens, self.special)
        return SampleOutput(tokens, lengths, self.run.nfe, [list(p) for p in self.prompts], self.cost.per_row,
                            self.run.positions)
