"""Building blocks shared by the backbones."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from diffuse.errors import DiffuseError


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class SelfCondition(nn.Module):
    """Self-conditioning's input term (DESIGN §7): SwiGLU(RMSNorm(p @ E)), p the softmax of the previous step's
    logits [.., V] and E the token embedding table. Neither part has a bias, so p = 0 (no previous logits) adds
    exactly nothing; the down projection starts at zero, so a fresh model is the model without it."""

    def __init__(self, d_model: int, mlp_ratio: float):
        super().__init__()
        self.norm = nn.RMSNorm(d_model)
        self.mlp = SwiGLU(d_model, swiglu_hidden(d_model, mlp_ratio))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.mlp.down.weight)

    def forward(self, probs: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(probs.to(table.dtype) @ table))


def swiglu_hidden(d_model: int, mlp_ratio: float, multiple: int = 64) -> int:
    """LLaMA's sizing: 2/3 of ratio·d, rounded up to a multiple (same parameters as a GELU MLP)."""
    hidden = int(2 * mlp_ratio * d_model / 3)
    return multiple * math.ceil(hidden / multiple)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, base: float = 10_000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor):
        """cos, sin of shape [L, head_dim/2] for integer positions [L]."""
        freqs = torch.outer(positions.float(), self.inv_freq)
        return freqs.cos(), freqs.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, L, Dh]; rotate pairs (first half, second half) as in GPT-NeoX / LLaMA."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


class TimestepEmbedding(nn.Module):
    """t ∈ [0, 1] → sinusoidal features → MLP → d_model (as in DiT / Diffusion-LM)."""

    def __init__(self, d_model: int, freq_dim: int = 256, max_period: float = 10_000.0):
        super().__init__()
        half = freq_dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(freq_dim, d_model), nn.SiLU(), nn.Linear(d_model, d_model))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t: [B] or [B, L] → [B, 1, D] or [B, L, D]."""
        if t.dim() == 1:
            t = t[:, None]
        args = 1000.0 * t.float()[..., None] * self.freqs
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1))


class TokenEnds(nn.Module):
    """What the token backbones (transformer, mamba2) share around their trunk: the token embedding `tok_emb`,
    the optional time embedding `time_emb` (added to the input: `model.time_conditioning=true`) and the output
    head `head`, which the subclass builds."""

    tok_emb: nn.Embedding
    time_emb: TimestepEmbedding | None
    head: nn.Linear

    @property
    def time_conditioned(self) -> bool:
        return self.time_emb is not None

    @property
    def self_conditioned(self) -> bool:
        """contracts.SelfConditioned: built with `self_cond` (model.self_condition=true)."""
        return getattr(self, "self_cond", None) is not None

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tok_emb(ids)

    def inputs(self, ids: torch.Tensor | None, embeds: torch.Tensor | None, t: torch.Tensor | None,
               prev_probs: torch.Tensor | None = None) -> torch.Tensor:
        """The trunk's input: the embeddings of `ids` (or `embeds`, continuous inputs), plus the embedding of t
        when the model is time-conditioned (t is ignored otherwise), plus the self-conditioning term of
        `prev_probs` [B, L, V] when the model has one (None: nothing added)."""
        x = self.embed(ids) if embeds is None else embeds
        if prev_probs is not None:
            if not self.self_conditioned:
                raise DiffuseError("prev_probs given to a model built without model.self_condition=true")
            x = x + self.self_cond(prev_probs, self.tok_emb.weight).to(x.dtype)
        if self.time_emb is None:
            return x
        if t is None:
            raise DiffuseError("this model has model.time_conditioning=true but the objective passes no t")
        return x + self.time_emb(t).to(x.dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)


def attention_mask(
    segment_ids: torch.Tensor | None,
    causal: bool,
    q_len: int,
    key_segment_ids: torch.Tensor | None = None,
    q_offset: int = 0,
) -> torch.Tensor | None:
    """Boolean SDPA mask [B, 1, Lq, Lk] (True = may attend), or None when nothing needs masking.

    Tokens attend only within their own segment (document) and never to padding (segment 0).
    A padding query attends to itself only, so no row is empty (an empty row makes SDPA return NaN).
    """
    if segment_ids is None and key_segment_ids is None:
        return None
    keys = key_segment_ids if key_segment_ids is not None else segment_ids
    queries = segment_ids if segment_ids is not None else keys[:, -q_len:]
    k_len = keys.shape[1]
    mask = (queries[:, :, None] == keys[:, None, :]) & (keys[:, None, :] > 0)
    q_pos = torch.arange(q_len, device=keys.device)[:, None] + q_offset
    k_pos = torch.arange(k_len, device=keys.device)[None, :]
    if causal:
        mask = mask & (k_pos <= q_pos)
    mask = mask | (k_pos == q_pos)
    return mask[:, None]


class BlockLayout:
    """Who sees whom in block diffusion (BD3LM). Each position has a block index, a stream (clean x0 or
    noisy x_t) and a RoPE position; a query sees a key of its own document when

        the key is clean and its block is earlier, or the same block with a clean query, or
        both are noisy and in the same block.

    Training feeds [x_t ; x_0] (2L positions, both streams at positions 0..L−1): a noisy block sees itself
    and the clean blocks before it, a clean block the clean blocks up to its own. One clean stream alone
    is block-causal attention (a block sees the blocks ≤ its own): uncached block decoding. Blocks of 1
    make the clean stream causal; one block makes the noisy stream the full-sequence model.

    `block` is an ordering key rather than a count: a clean key is seen by queries of larger key (and by clean
    queries of an equal one), a noisy key only by noisy queries of the same key. The hybrid (TiDAR,
    objectives/hybrid.py) uses that: its clean token j has key j (blocks of 1: token-causal) and its draft
    block k has key k·b, so the draft block sees the clean tokens before position k·b (`clean_and_draft`).
    """

    def __init__(self, block: torch.Tensor, clean: torch.Tensor, positions: torch.Tensor):
        self.block, self.clean, self.positions = block, clean, positions

    @classmethod
    def noisy_and_clean(cls, length: int, block_size: int, device=None) -> "BlockLayout":
        """The training layout [x_t ; x_0] of rows of `length`, blocks aligned at position 0."""
        pos = torch.arange(length, device=device)
        return cls((pos // block_size).repeat(2), torch.arange(2 * length, device=device) >= length, pos.repeat(2))

    @classmethod
    def clean_and_draft(cls, length: int, block_size: int, device=None) -> "BlockLayout":
        """The hybrid's training layout [x ; d] (clean row first, both at positions 0..L−1): clean position j
        sees clean positions ≤ j (token-causal, AR's attention), draft block k (positions k·b … k·b+b−1) sees
        itself bidirectionally and the clean positions < k·b; nothing sees the draft row but itself."""
        pos = torch.arange(length, device=device)
        key = torch.cat([pos, pos // block_size * block_size])
        return cls(key, torch.arange(2 * length, device=device) < length, pos.repeat(2))

    @classmethod
    def clean_blocks(cls, block: torch.Tensor) -> "BlockLayout":
        """One clean stream with the given block index per position: block-causal attention."""
        return cls(block, torch.ones_like(block, dtype=torch.bool), torch.arange(len(block), device=block.device))

    def visible(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Elementwise rule for query and key indices (broadcasting; FlexAttention's mask_mod calls it too)."""
        return self.rule(self.block[q], self.clean[q], self.block[k], self.clean[k])

    @staticmethod
    def rule(bq: torch.Tensor, cq: torch.Tensor, bk: torch.Tensor, ck: torch.Tensor) -> torch.Tensor:
        """May a query (block key bq, clean cq) see a key (bk, ck)? Elementwise, broadcasting."""
        return (ck & ((bk < bq) | (cq & (bk == bq)))) | (~cq & ~ck & (bk == bq))

    def cached_mask(self, offset: int, key_segment_ids: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
        """Boolean SDPA mask [B, 1, L, Lk] of a call against a KV cache (models/transformer.py): this layout
        describes the call's L new positions only, counted from the cache offset (block keys and positions as
        if the call began at 0; `block`, `clean` and `positions` may be [L] or per row [B, L]). The cached keys
        (positions < offset) are clean and keyed by their position, i.e. the clean (AR) stream, token-causal;
        the new queries, keyed offset + block, see [cached keys ; new keys] by `visible`'s rule. Documents and
        padding through the cache's key segment ids, as `attention_mask(..., key_segment_ids, q_offset)`."""
        B, Lk = key_segment_ids.shape
        L = self.block.shape[-1]
        if offset + L != Lk:
            raise DiffuseError(f"a block layout call against a KV cache appends at its end ({offset} cached + {L} "
                               f"new positions, but the cache holds {Lk})")
        kpos = torch.arange(Lk, device=key_segment_ids.device)
        bq = (self.block.to(kpos.device) + offset).expand(B, L)
        cq = self.clean.to(kpos.device).expand(B, L)
        bk = torch.cat([kpos[:offset].expand(B, offset), bq], 1)
        ck = torch.cat([torch.ones(B, offset, dtype=torch.bool, device=kpos.device), cq], 1)
        allowed = self.rule(bq[:, :, None], cq[:, :, None], bk[:, None, :], ck[:, None, :])[:, None]
        docs = attention_mask(segment_ids, False, L, key_segment_ids=key_segment_ids, q_offset=offset)
        diagonal = kpos[None, :] == (kpos[offset:, None])  # no empty row (padding)
        return (allowed & docs) | diagonal

    def mask(self, segment_ids: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Boolean SDPA mask [B, 1, L, L], documents and padding applied as in `attention_mask`."""
        n = len(self.block)
        idx = torch.arange(n, device=self.block.device)
        allowed = self.visible(idx[:, None], idx[None, :])
        if segment_ids is not None:  # attention_mask's own rule for documents and padding
            allowed = allowed & attention_mask(segment_ids, False, n)
        allowed = allowed | torch.eye(n, dtype=torch.bool, device=idx.device)  # no empty row (padding)
        return allowed.expand(batch, 1, n, n)


FLEX_BLOCK = 128  # FlexAttention's tile: on CPU, lengths that are not a multiple of it gave wrong outputs


def flex_block_mask(segment_ids: torch.Tensor | None, causal: bool, layout: BlockLayout | None, batch: int, length: int):
    """The same pattern as `attention_mask` / `BlockLayout.mask`, as a FlexAttention BlockMask over the
    length padded to a multiple of FLEX_BLOCK (the padded keys are invisible, padded queries see themselves;
    the attention pads q, k, v to the mask's length and crops its output)."""
    from torch.nn.attention.flex_attention import create_block_mask  # local: only with model.attention=flex

    padded = -(-length // FLEX_BLOCK) * FLEX_BLOCK
    extra = padded - length
    if segment_ids is not None:
        segment_ids = F.pad(segment_ids, (0, extra))  # padding: segment 0, invisible
    if layout is not None:  # positions past the end: a block of their own, noisy (seen by no real query)
        layout = BlockLayout(F.pad(layout.block, (0, extra), value=int(layout.block.max()) + 1),
                             F.pad(layout.clean, (0, extra), value=False), layout.positions)

    def mask_mod(b, h, q, k):
        ok = k < length
        if segment_ids is not None:
            ok = ok & (segment_ids[b, q] == segment_ids[b, k]) & (segment_ids[b, k] > 0)
        if causal:
            ok = ok & (k <= q)
        if layout is not None:
            ok = ok & layout.visible(q, k)
        return ok | (q == k)

    device = segment_ids.device if segment_ids is not None else (layout.block.device if layout is not None else "cpu")
    return create_block_mask(mask_mod, batch if segment_ids is not None else None, None, padded, padded,
                             device=device, _compile=False)
