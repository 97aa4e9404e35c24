"""A small transformer you can read top to bottom: RoPE, SwiGLU, RMSNorm, PyTorch SDPA attention.

Bidirectional by default; causal when the objective says so. Optional timestep conditioning (added
to the token embeddings) for objectives whose network sees t. A pre-allocated (static) KV cache makes
AR decoding cost one position per new token, with no reallocation as the sequence grows.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from diffuse.core.checks import check_range
from diffuse.errors import DiffuseError
from diffuse.models.layers import (
    BlockLayout,
    RotaryEmbedding,
    SelfCondition,
    SwiGLU,
    TimestepEmbedding,
    TokenEnds,
    apply_rotary,
    attention_mask,
    flex_block_mask,
    swiglu_hidden,
)
from diffuse.registry import MODELS


class KVCache:
    """Static KV cache: keys/values [B, H, capacity, head_dim] per layer and the key segment ids
    [B, capacity], allocated on the first call (batch, dtype and device of that call) and written in
    place; attention reads the filled prefix [:length] only.

    A forward call writes its positions at the cursor (by default the end of the filled prefix, as in
    left-to-right decoding) and its queries see every filled position of their segment, itself
    included: causal calls see only keys up to their own position. Two moves serve the samplers that
    revisit positions:
      `seek(pos)`      the next call writes (and its queries sit) at pos ≤ length: overwrite a block
                       inside a cached canvas (Fast-dLLM's prefix and dual caches);
      `truncate(n)`    forget every position ≥ n: a denoising step of the current block is seen by
                       nothing after it (block diffusion's exact cache keeps only committed blocks).
    A forward call first `extend`s the segment ids (once, for all layers), then each layer `update`s.
    """

    def __init__(self, capacity: int):
        if capacity <= 0:
            raise DiffuseError(f"a KV cache needs a positive capacity (max_length={capacity})")
        self.capacity = capacity
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.segment_ids: torch.Tensor | None = None  # [B, capacity]; positions >= length are stale
        self.length = 0  # positions filled
        self.cursor: int | None = None  # where the next call writes (None: at length)
        self._start = self._end = 0  # the current call's positions

    def seek(self, pos: int) -> None:
        if not 0 <= pos <= self.length:
            raise DiffuseError(f"KV cache seek to {pos}: only positions 0..{self.length} can be written next")
        self.cursor = pos

    def truncate(self, n: int) -> None:
        if not 0 <= n <= self.length:
            raise DiffuseError(f"KV cache truncate to {n}: it holds {self.length} positions")
        self.length, self.cursor = n, None

    @property
    def offset(self) -> int:
        """The position of the next call's first query."""
        return self.length if self.cursor is None else self.cursor

    def extend(self, seg: torch.Tensor) -> torch.Tensor:
        """Write the new positions' segment ids; returns the key segment ids of the filled prefix."""
        B, L = seg.shape
        start = self.offset
        end = start + L
        if end > self.capacity:
            raise DiffuseError(
                f"KV cache full: {start} {'cached' if start == self.length else 'kept (after a seek)'} + {L} new = "
                f"{end} positions > capacity {self.capacity} "
                f"(ask new_cache(max_length=...) for at least {end})"
            )
        if self.segment_ids is None:
            self.segment_ids = seg.new_zeros(B, self.capacity)
        elif B != self.segment_ids.shape[0]:
            raise DiffuseError(f"KV cache holds {self.segment_ids.shape[0]} rows; this call has {B}")
        self.segment_ids[:, start:end] = seg
        self._start, self._end = start, end
        self.length, self.cursor = max(self.length, end), None
        return self.segment_ids[:, : self.length]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this call's k, v [B, H, L, Dh] in place; returns the filled prefix [B, H, length, Dh]."""
        if layer == len(self.keys):
            B, H, _, Dh = k.shape
            self.keys.append(k.new_zeros(B, H, self.capacity, Dh))
            self.values.append(v.new_zeros(B, H, self.capacity, Dh))
        keys, values = self.keys[layer], self.values[layer]
        keys[:, :, self._start : self._end] = k
        values[:, :, self._start : self._end] = v
        return keys[:, :, : self.length], values[:, :, : self.length]


ATTENTION = ("sdpa", "flex")


@functools.cache
def compiled_flex_attention():
    """FlexAttention runs compiled (on CPU too: its eager path materialises every score)."""
    from torch.nn.attention.flex_attention import flex_attention  # local: only with model.attention=flex

    return torch.compile(flex_attention, dynamic=False)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.dropout = dropout

    def forward(self, x, rope, mask, causal, cache: KVCache | None, layer: int):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if mask is not None and not isinstance(mask, torch.Tensor):  # a FlexAttention BlockMask (padded length)
            pad = (0, 0, 0, mask.seq_lengths[0] - L)
            y = compiled_flex_attention()(F.pad(q, pad), F.pad(k, pad), F.pad(v, pad), block_mask=mask)[:, :, :L]
            return self.out(y.transpose(1, 2).reshape(B, L, D))
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and mask is None and cache is None,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out(y.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    def __init__(self, d_model, n_heads, mlp_ratio, dropout):
        super().__init__()
        self.norm1 = nn.RMSNorm(d_model)
        self.attn = Attention(d_model, n_heads, dropout)
        self.norm2 = nn.RMSNorm(d_model)
        self.mlp = SwiGLU(d_model, swiglu_hidden(d_model, mlp_ratio))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, rope, mask, causal, cache, layer):
        x = x + self.drop(self.attn(self.norm1(x), rope, mask, causal, cache, layer))
        return x + self.drop(self.mlp(self.norm2(x)))


@MODELS.register("transformer")
class Transformer(TokenEnds):
    supports_block_layout = True  # models without it refuse objective.block_size at build time
    supports_cached_layout = True  # forward(cache=..., layout=...): a layout over new positions after a cache

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        rope_base: float = 10_000.0,
        time_conditioning: bool = False,
        tie_weights: bool = True,
        attention: str = "sdpa",
        self_condition: bool = False,
    ):
        super().__init__()
        for key, value in (("d_model", d_model), ("n_layers", n_layers), ("n_heads", n_heads)):
            check_range(f"model.{key}", value, 1, integer=True)
        check_range("model.mlp_ratio", mlp_ratio, 0, low_open=True)
        check_range("model.dropout", dropout, 0, 1, high_open=True)
        check_range("model.rope_base", rope_base, 1, low_open=True)
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise DiffuseError(f"model.d_model={d_model} must split into model.n_heads={n_heads} even-sized heads")
        if attention not in ATTENTION:
            raise DiffuseError(f"model.attention={attention!r} must be one of {', '.join(ATTENTION)}")
        if attention == "flex" and dropout > 0:
            raise DiffuseError(f"model.attention=flex has no attention dropout: set model.dropout=0 (got {dropout})")
        self.attention = attention
        self.vocab_size, self.d_model = vocab_size, d_model
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.time_emb = TimestepEmbedding(d_model) if time_conditioning else None
        # created only when asked: a model without it keeps its state-dict keys (older checkpoints load unchanged)
        self.self_cond = SelfCondition(d_model, mlp_ratio) if self_condition else None
        self.rope = RotaryEmbedding(d_model // n_heads, rope_base)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, mlp_ratio, dropout) for _ in range(n_layers))
        self.norm = nn.RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_weights:
            self.head.weight = self.tok_emb.weight
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith(("attn.out.weight", "mlp.down.weight")):
                nn.init.normal_(p, std=0.02 / (2 * n_layers) ** 0.5)
        if self.self_cond is not None:
            self.self_cond.reset_parameters()

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def forward(self, ids=None, embeds=None, t=None, segment_ids=None, causal=False, cache: KVCache | None = None,
                layout: BlockLayout | None = None, prev_probs: torch.Tensor | None = None):
        """Hidden states [B, L, D] after the final norm. Give `ids` or `embeds` (continuous inputs).

        `layout`: block diffusion's attention pattern and positions (models/layers.py BlockLayout). With a
        `cache` too, the layout describes the new positions only, counted from the cache offset (its block keys
        and RoPE positions are shifted by it; [L] or per row [B, L]): the cached keys are the clean, token-
        causal stream keyed by their position, and the new queries see [cached ; new] keys by the layout's rule
        (BlockLayout.cached_mask). Such a call appends at the cache's end and writes its K/V there like any
        other (truncate afterwards what should not stay).

        `prev_probs` [B, L, V]: self-conditioning's previous prediction (model.self_condition=true; zero rows or
        None add nothing).
        """
        x = self.inputs(ids, embeds, t, prev_probs)
        B, L, _ = x.shape
        if layout is not None and causal:
            raise DiffuseError("a block layout brings its own attention pattern: no causal flag")
        if layout is not None and cache is not None and cache.offset + L < cache.length:
            raise DiffuseError(f"a block layout call against a KV cache appends at its end (it holds {cache.length} "
                               f"positions; this call would write {cache.offset}..{cache.offset + L - 1} after a seek)")
        offset = cache.offset if cache is not None else 0
        keys = None
        if cache is not None:
            seg = segment_ids if segment_ids is not None else torch.ones(B, L, dtype=torch.long, device=x.device)
            keys = cache.extend(seg)
            segment_ids = seg
        if self.attention == "flex" and cache is None and (segment_ids is not None or layout is not None):
            if x.device.type == "cpu" and torch.is_grad_enabled() and x.requires_grad:
                raise DiffuseError("model.attention=flex does not train on CPU (FlexAttention has no CPU backward in "
                                   "torch); train with model.attention=sdpa here, or on a GPU")
            mask = flex_block_mask(segment_ids, causal, layout, B, L)
        elif layout is not None and cache is not None:
            mask = layout.cached_mask(offset, keys, segment_ids)
        elif layout is not None:
            mask = layout.mask(segment_ids, B)
        else:
            mask = attention_mask(segment_ids, causal, L, key_segment_ids=keys, q_offset=offset)
        if layout is None:
            rope = self.rope(torch.arange(offset, offset + L, device=x.device))
        elif cache is None:
            rope = self.rope(layout.positions)
        else:  # absolute positions; per row ([B, L]) as [B, 1, L, Dh/2]
            positions = (layout.positions.to(x.device) + offset).expand(B, L)
            rope = tuple(r.view(B, 1, L, -1) for r in self.rope(positions.reshape(-1)))
        for i, block in enumerate(self.blocks):
            x = block(x, rope, mask, causal, cache, i)
        return self.norm(x)

    def new_cache(self, max_length: int) -> KVCache:
        """An empty static KV cache for up to `max_length` positions (prompt + generated tokens)."""
        return KVCache(max_length)
