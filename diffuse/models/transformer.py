"""A small transformer you can read top to bottom: RoPE, SwiGLU, RMSNorm, PyTorch SDPA attention.

Bidirectional by default; causal when the objective says so. Optional timestep conditioning (added
to the token embeddings) for objectives whose network sees t. A KV cache makes AR decoding cost one
position per new token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from diffuse.errors import DiffuseError
from diffuse.models.layers import (
    RotaryEmbedding,
    SwiGLU,
    TimestepEmbedding,
    apply_rotary,
    attention_mask,
    swiglu_hidden,
)
from diffuse.registry import MODELS


@dataclass
class KVCache:
    """Keys/values per layer plus the segment ids of every cached position."""

    keys: list = field(default_factory=list)
    values: list = field(default_factory=list)
    segment_ids: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.segment_ids is None else self.segment_ids.shape[1]


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
            if layer < len(cache.keys):
                k = torch.cat([cache.keys[layer], k], dim=2)
                v = torch.cat([cache.values[layer], v], dim=2)
                cache.keys[layer], cache.values[layer] = k, v
            else:
                cache.keys.append(k)
                cache.values.append(v)
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
class Transformer(nn.Module):
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
    ):
        super().__init__()
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise DiffuseError(f"model.d_model={d_model} must split into model.n_heads={n_heads} even-sized heads")
        self.vocab_size, self.d_model = vocab_size, d_model
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.time_emb = TimestepEmbedding(d_model) if time_conditioning else None
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

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    @property
    def time_conditioned(self) -> bool:
        return self.time_emb is not None

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tok_emb(ids)

    def forward(self, ids=None, embeds=None, t=None, segment_ids=None, causal=False, cache: KVCache | None = None):
        """Hidden states [B, L, D] after the final norm. Give `ids` or `embeds` (continuous inputs)."""
        x = self.embed(ids) if embeds is None else embeds
        if self.time_emb is not None:
            if t is None:
                raise DiffuseError("this model has model.time_conditioning=true but the objective passes no t")
            x = x + self.time_emb(t).to(x.dtype)
        B, L, _ = x.shape
        offset = cache.length if cache is not None else 0
        keys = None
        if cache is not None:
            seg = segment_ids if segment_ids is not None else torch.ones(B, L, dtype=torch.long, device=x.device)
            keys = seg if cache.segment_ids is None else torch.cat([cache.segment_ids, seg], dim=1)
            cache.segment_ids = keys
            segment_ids = seg
        mask = attention_mask(segment_ids, causal, L, key_segment_ids=keys, q_offset=offset)
        rope = self.rope(torch.arange(offset, offset + L, device=x.device))
        for i, block in enumerate(self.blocks):
            x = block(x, rope, mask, causal, cache, i)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)

    def new_cache(self) -> KVCache:
        return KVCache()
