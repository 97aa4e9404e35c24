"""Building blocks shared by the backbones."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


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
