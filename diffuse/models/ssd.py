"""Mamba-2's state-space-duality (SSD) scan in plain PyTorch, segment-aware.

The recurrence, per head (scalar decay a_t = dt_t·A ≤ 0, state h ∈ R^{P×N}):

    h_t = exp(a_t)·h_{t-1} + dt_t · x_t ⊗ B_t        y_t = h_t · C_t

computed in chunks of Q positions: inside a chunk as a masked quadratic form (attention-like,
C_i·B_j·exp(a_{j+1} + … + a_i)), across chunks by passing one state per chunk. Packed rows and
padding are handled with *run ids*: a run is a maximal stretch of equal segment ids, and state never
crosses from one run to the next. Every decay factor is multiplied by "same run" (equivalently the
state is reset at the first position of each run), so no -inf decays and no NaN gradients appear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def segment_runs(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] segment ids → [B, L] run ids, 0, 1, 2, … increasing by one at every change of segment.
    Two positions share a run exactly when no segment boundary lies between them."""
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    return torch.cat([torch.zeros_like(segment_ids[:, :1]), change.long()], dim=1).cumsum(1)


def reverse_within_runs(runs: torch.Tensor) -> torch.Tensor:
    """Gather index [B, L] that reverses every run in place: position t of a run [s, e] reads e + s − t.
    Right padding stays at the back (it is a run of its own), packed documents each flip alone.
    The index is its own inverse."""
    L = runs.shape[1]
    pos = torch.arange(L, device=runs.device).expand_as(runs)
    first = torch.ones_like(runs[:, :1], dtype=torch.bool)
    is_start = torch.cat([first, runs[:, 1:] != runs[:, :-1]], dim=1)
    is_end = torch.cat([runs[:, 1:] != runs[:, :-1], first], dim=1)
    start = torch.where(is_start, pos, 0).cummax(1).values
    end = torch.where(is_end, pos, L).flip(1).cummin(1).values.flip(1)
    return start + end - pos


def _decay_matrix(cumulative: torch.Tensor, runs: torch.Tensor) -> torch.Tensor:
    """[..., T, T] with exp(cum_i − cum_j) where j ≤ i and i, j share a run, else 0."""
    T = cumulative.shape[-1]
    diff = cumulative[..., :, None] - cumulative[..., None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=cumulative.device).tril()
    keep = causal & (runs[..., :, None] == runs[..., None, :])
    return torch.exp(diff.masked_fill(~keep, float("-inf")))  # mask before exp: no inf·0 in backward


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    runs: torch.Tensor | None = None,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    initial_run: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan (no D skip). Shapes: x [b, l, h, p], dt [b, l, h] (> 0), A [h] (< 0),
    B, C [b, l, g, n] with h divisible by g (head k uses group k // (h/g)), runs [b, l] or None.
    `initial_state` [b, h, p, n] is the state before position 0; it belongs to run `initial_run` [b]
    (default: the run of position 0, i.e. it carries on). Returns y [b, l, h, p] and the final
    state [b, h, p, n]. Computed in float32 at least (float64 stays float64)."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    out_dtype = x.dtype
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, dt, B, C = x.to(dtype), dt.to(dtype), B.to(dtype), C.to(dtype)
    if runs is None:
        runs = torch.zeros(b, l, dtype=torch.long, device=x.device)
    if initial_run is None:
        initial_run = runs[:, 0]

    Q = min(chunk_size, l)  # a short sequence is one chunk: no padded work
    pad = (-l) % Q
    if pad:  # dt = 0 and x = 0 on the tail: decay 1, no input, so the final state is the state at l − 1
        x, dt = F.pad(x, (0, 0, 0, 0, 0, pad)), F.pad(dt, (0, 0, 0, pad))
        B, C = F.pad(B, (0, 0, 0, 0, 0, pad)), F.pad(C, (0, 0, 0, 0, 0, pad))
        runs = torch.cat([runs, runs[:, -1:].expand(b, pad)], dim=1)
    c = (l + pad) // Q
    x = x.reshape(b, c, Q, g, r, p)
    dt = dt.reshape(b, c, Q, g, r)
    B, C = B.reshape(b, c, Q, g, n), C.reshape(b, c, Q, g, n)
    runs = runs.reshape(b, c, Q)

    a_cum = torch.cumsum(dt * A.to(dtype).view(g, r), dim=2)  # [b, c, Q, g, r]
    x_dt = x * dt[..., None]

    # 1. within each chunk: y_i = Σ_{j ≤ i, same run} (C_i·B_j) exp(a_cum_i − a_cum_j) dt_j x_j
    decay = _decay_matrix(a_cum.permute(0, 1, 3, 4, 2), runs[:, :, None, None, :])  # [b, c, g, r, Q, Q]
    scores = torch.einsum("bcign,bcjgn->bcgij", C, B)[:, :, :, None] * decay
    y = torch.einsum("bcgrij,bcjgrp->bcigrp", scores, x_dt)

    # 2. each chunk's own contribution to the state at its last position
    to_end = torch.exp(a_cum[:, :, -1:] - a_cum) * (runs[:, :, :, None, None] == runs[:, :, -1:, None, None])
    chunk_states = torch.einsum("bcjgn,bcjgrp->bcgrpn", B, x_dt * to_end[..., None])

    # 3. pass states across chunks (a decay matrix over chunk ends, index 0 = the initial state)
    if initial_state is None:
        initial_state = x.new_zeros(b, h, p, n)
    states = torch.cat([initial_state.to(dtype).reshape(b, 1, g, r, p, n), chunk_states], dim=1)
    chunk_cum = F.pad(torch.cumsum(a_cum[:, :, -1], dim=1), (0, 0, 0, 0, 1, 0))  # [b, c+1, g, r]
    end_runs = torch.cat([initial_run[:, None], runs[:, :, -1]], dim=1)  # [b, c+1]
    passing = _decay_matrix(chunk_cum.permute(0, 2, 3, 1), end_runs[:, None, None, :])  # [b, g, r, c+1, c+1]
    states = torch.einsum("bgrij,bjgrpn->bigrpn", passing, states)  # state after chunk i − 1

    # 4. the state entering each chunk, read out through C and decayed to each position
    from_start = torch.exp(a_cum) * (runs[:, :, :, None, None] == end_runs[:, :-1, None, None, None])
    y = y + torch.einsum("bcign,bcgrpn->bcigrp", C, states[:, :-1]) * from_start[..., None]

    y = y.reshape(b, c * Q, h, p)[:, :l]
    return y.to(out_dtype), states[:, -1].reshape(b, h, p, n)
