"""How the absorbing decode loop (absorbing.py) runs the network over its canvas: the whole canvas at every
step (`cache=null`, exact), or under Fast-dLLM's approximate caches for full-sequence bidirectional models
(`cache=prefix` or `dual`, arXiv 2505.22618).

Decoding goes block by block over a canvas of width W = [prompt | committed blocks | block | suffix].
With a cache, the first step of each block runs the whole canvas once (a full pass: its logits are the
no-cache step's) and writes the K/V of every position into the cache; the block's other steps feed

    prefix:  the block and the suffix (the columns from the block's start to W); their queries attend to
             the cached K/V of the prompt and the committed blocks and to the fresh K/V of what they feed
             (the output head runs on the block only: the suffix's logits are never used);
    dual:    the block alone; its queries attend to the cached K/V of the prefix and of the suffix.

Exactness is lost on purpose: from the second layer on, a cached position's K/V depend (through the
bidirectional attention below them) on the block as it was at the block's first step, not on the tokens
committed since (and a time-conditioned model's, its t); under dual the suffix's K/V also saw that older
block. A one-layer model without time conditioning is exact under both: its K/V depend only on each
position's own token, and inside a block only the block's tokens change.
Positions fed per row for a block of b tokens decoded in n passes, the block starting at column c:
no cache n·W, prefix W + (n − 1)·(W − c), dual W + (n − 1)·b. A cached pass is still one forward pass (NFE).

`span_length: null` makes the span one block: prefix then caches the prompt (BOS included) and dual
equals prefix (the suffix is empty).

The cached canvas is left-padded, [PAD…, BOS, prompt…, MASK × length] (base.left_padded), so the span,
and with it every block, sits in the same columns of every row and one cache seek serves the batch;
padding is invisible (segment 0) and RoPE relative, so a row's outputs do not depend on its padding (up
to float rounding). The no-cache canvas is right-padded (base.masked_canvas), as it always was.
Guidance (cfg_scale > 0) runs its unconditional canvas (the prompt masked) through a second cache under
the same rules: two passes per step, as without a cache.
"""

from __future__ import annotations

import torch

from diffuse.contracts import Seekable, component_name, is_self_conditioned, new_cache
from diffuse.errors import DiffuseError
from diffuse.sampling.base import left_padded, masked_canvas

CACHES = ("prefix", "dual")


def check_cache(cache: str | None) -> str | None:
    if cache is not None and cache not in CACHES:
        raise DiffuseError(f"sampler.cache={cache!r} must be null (no cache), prefix or dual (Fast-dLLM)")
    return cache


def take_span(values: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """values[b, span[b, j]] for every row b and generated slot j: [B, W, V] → [B, length, V]."""
    return values.gather(1, span[..., None].expand(-1, -1, values.shape[-1]))


class Canvas:
    """No cache: every pass runs the whole right-padded canvas [BOS, prompt…, span, PAD…]."""

    def __init__(self, backbone, objective, prompts: list[list[int]], length: int, cfg_scale: float):
        special = objective.special
        device = next(backbone.parameters()).device
        self.backbone, self.objective, self.cfg_scale, self.mask = backbone, objective, cfg_scale, special.mask
        self.ids, self.seg, starts = self.layout(prompts, length, special, device)
        self.width = self.ids.shape[1]
        self.span = starts[:, None] + torch.arange(length, device=device)  # canvas column of each generated slot
        cols = torch.arange(self.width, device=device)
        self.in_prompt = (cols < starts[:, None]) & (self.ids != special.bos) & (self.seg > 0)
        self.positions = 0  # positions fed to the network so far, per row (SampleOutput.positions)
        # self-conditioning: each stream's previous probabilities over the canvas (None: nothing, the first pass)
        self.prev: list[torch.Tensor | None] | None = [None, None] if is_self_conditioned(backbone) else None

    def layout(self, prompts, length, special, device):
        return masked_canvas(prompts, length, special, device)

    def predict(self, x: torch.Tensor, t: torch.Tensor, block: tuple[int, int], first: bool):
        """Log-probs [B, length, V] of the generated span x (only the current `block` = (lo, hi) of the span
        is sure to be fresh) and the forward passes they cost; `first`: the block's first pass."""
        z = self.ids.scatter(1, self.span, x)
        cond = self.run(0, z, t, block, first)
        if self.cfg_scale == 0:
            return cond, 1
        un = self.run(1, z.masked_fill(self.in_prompt, self.mask), t, block, first)
        guided = (un + (self.cfg_scale + 1.0) * (cond - un)).nan_to_num(nan=float("-inf"))
        return guided.log_softmax(-1), 2

    def run(self, stream: int, z, t, block, first):
        """One forward pass of canvas z (stream 0: conditional, 1: unconditional) → span log-probs."""
        self.positions += self.width
        batch = {"segment_ids": self.seg}
        if self.prev is not None:
            batch["prev_probs"] = self.prev[stream]
        logp = self.objective.predict(self.backbone, z, t, batch)
        if self.prev is not None:  # the next pass reads this one's prediction (the cached canvases pass nothing)
            self.prev[stream] = logp.exp()
        return take_span(logp, self.span)


class CachedBackbone:
    """The backbone as `objective.predict` sees it: every call runs through `cache`, and the `tail`
    (ids, segment ids) is fed after the call's own ids, its hidden states computed but not returned
    (prefix cache: the suffix runs through the network, only the block is read out)."""

    def __init__(self, backbone, cache, tail: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.backbone, self.cache, self.tail = backbone, cache, tail

    def __call__(self, ids, segment_ids, **kw):
        n = ids.shape[1]
        if self.tail is not None and self.tail[0].shape[1]:
            ids, segment_ids = torch.cat([ids, self.tail[0]], 1), torch.cat([segment_ids, self.tail[1]], 1)
        return self.backbone(ids=ids, segment_ids=segment_ids, cache=self.cache, **kw)[:, :n]

    def __getattr__(self, name):
        return getattr(self.backbone, name)


class CachedCanvas(Canvas):
    """Prefix or dual cache (module docstring) over the left-padded canvas."""

    def __init__(self, backbone, objective, prompts, length, cfg_scale, mode: str):
        super().__init__(backbone, objective, prompts, length, cfg_scale)
        self.mode = mode
        self.start = self.width - length  # the span's first column, the same in every row
        self.caches = [seekable_cache(backbone, self.width, mode) for _ in range(1 + (cfg_scale > 0))]
        self.last: list[torch.Tensor | None] = [None] * len(self.caches)  # span log-probs per stream

    def layout(self, prompts, length, special, device):
        head, seg = left_padded(prompts, special, device)
        B = len(prompts)
        ids = torch.cat([head, head.new_full((B, length), special.mask)], 1)
        seg = torch.cat([seg, seg.new_ones(B, length)], 1)
        return ids, seg, torch.full((B,), head.shape[1], dtype=torch.long, device=device)

    def run(self, stream, z, t, block, first):
        cache, (lo, hi) = self.caches[stream], block
        if first:  # refresh: the K/V of every position, from the canvas as it is at the block's start
            a = 0
            read = end = self.width
            cache.truncate(0)
        else:  # feed [a, end), read out the block [a, read)
            a, read = self.start + lo, self.start + hi
            end = self.width if self.mode == "prefix" else read
            cache.seek(a)
        view = CachedBackbone(self.backbone, cache, (z[:, read:end], self.seg[:, read:end]))
        logp = self.objective.predict(view, z[:, a:read], t, {"segment_ids": self.seg[:, a:read]})
        self.positions += end - a
        if first:
            self.last[stream] = logp[:, self.start:]
        else:  # the span outside the block keeps the values of an earlier pass (only the block's are used)
            self.last[stream][:, a - self.start : read - self.start] = logp
        return self.last[stream]


def seekable_cache(backbone, width: int, mode: str):
    """A KV cache of `width` positions that can overwrite a block (`seek`), or a one-line refusal."""
    name = component_name(backbone)
    cache = new_cache(backbone, width)
    if not isinstance(cache, Seekable):
        what = ("keeps a recurrent state, which cannot revisit a block" if cache is not None
                else "has no KV cache to run through")
        raise DiffuseError(f"sampler.cache={mode} needs a KV cache that can overwrite positions, and model={name} "
                           f"{what}; use sampler.cache=null with it (the caches serve model=transformer)")
    return cache


def make_canvas(cache: str | None, backbone, objective, prompts, length: int, cfg_scale: float) -> Canvas:
    if cache is None:
        return Canvas(backbone, objective, prompts, length, cfg_scale)
    return CachedCanvas(backbone, objective, prompts, length, cfg_scale, cache)
