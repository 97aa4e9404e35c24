"""The training noise streams, in one place: every random draw of an objective or regularizer comes
from a generator seeded by (seed, stream), so a resumed run draws exactly what an uninterrupted one
would, and an evaluation can redraw what training's validation drew.

Streams: training micro-batch i of optimizer step s uses s·accumulate + i (≥ 0); validation batch b,
t-sample r uses −1 − b − r·STRIDE (< 0), so the two never meet.
"""

from __future__ import annotations

import torch

SEED_STRIDE = 1_000_003  # distinct seeds give disjoint stream ranges for any realistic run length
STREAM_STRIDE = 100_003  # t-sample r of validation batch b: stream −1 − b − r·STRIDE (distinct while b < STRIDE)


def noise_generator(seed: int, stream: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * SEED_STRIDE + stream)


def training_stream(global_step: int, batch_idx: int, accumulate: int = 1) -> int:
    return global_step * accumulate + batch_idx % accumulate


def validation_stream(batch_index: int, repeat: int = 0) -> int:
    return -1 - batch_index - repeat * STREAM_STRIDE
