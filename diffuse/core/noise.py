"""The training noise streams, in one place: every random draw of an objective or regularizer comes
from a generator seeded by (seed, stream), so a resumed run draws exactly what an uninterrupted one
would, and an evaluation can redraw what training's validation drew.

Streams: training micro-batch i of optimizer step s uses s·accumulate + i (≥ 0); validation batch b,
t-sample r uses −1 − b − r·STRIDE (< 0), so the two never meet.

**Several processes (DDP).** W ranks × b rows draw exactly what 1 process × W·b rows draws for the
same rows. The rows first: the training sampler (data/datamodule.py) interleaves the ranks over one
stream of row indices, so row i of rank r's batch is row i·W + r of the one-process global batch of W·b
rows (same rows, same order). The noise then: every rank seeds the *same* generator (the stream does not
depend on the rank) and draws the *global* batch's noise, shaped [W·b, …], keeping its own rows r::W.
`noise_generator(…, rank=r, world_size=W)` returns such a generator (a `ShardedGenerator`, which knows
its rows); the draws that have a batch dimension go through `batch_draw` (mask uniforms, Gaussian noise,
δ of the consistency regularizer) and `batch_strata` (the i/N strata of antithetic t, N = W·b, with the one
shared offset drawn once by every rank). With W = 1 the generator is a plain `torch.Generator` and every
draw is the one it always was: one process is bit-identical to what it was before ranks existed.
The cost: each rank draws W times its own noise (uniforms of [W·b, L], or Gaussians of [W·b, L, D] for
the continuous objective) — small beside a forward pass for the ranks of one or a few nodes.
Validation shards whole batches instead (batch k on rank k mod W with its plain stream of k), so it needs
no sharded draws: see `TextDataModule.val_dataloader`.
"""

from __future__ import annotations

import torch

SEED_STRIDE = 1_000_003  # distinct seeds give disjoint stream ranges for any realistic run length
STREAM_STRIDE = 100_003  # t-sample r of validation batch b: stream −1 − b − r·STRIDE (distinct while b < STRIDE)


class ShardedGenerator(torch.Generator):
    """A generator seeded alike on every rank that knows which rows of the global batch are this rank's:
    rows r::W of a batch of W·b rows (b = the local batch size)."""

    rank: int = 0
    world_size: int = 1


def noise_generator(seed: int, stream: int, device, rank: int = 0, world_size: int = 1) -> torch.Generator:
    if world_size == 1:
        return torch.Generator(device=device).manual_seed(seed * SEED_STRIDE + stream)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size} processes")
    gen = ShardedGenerator(device=device)
    gen.rank, gen.world_size = rank, world_size
    return gen.manual_seed(seed * SEED_STRIDE + stream)


def shard_of(generator) -> tuple[int, int]:
    """(rank, world_size) of a generator's rows; (0, 1) for a plain generator or None."""
    return getattr(generator, "rank", 0), getattr(generator, "world_size", 1)


def batch_draw(draw, shape, generator=None, **kwargs) -> torch.Tensor:
    """`draw(shape, generator=generator, **kwargs)` for a tensor whose first dimension is the batch
    (`draw` is torch.rand, torch.randn, or functools.partial(torch.randint, lo, hi)). With a sharded
    generator: the global batch's draw [W·b, …], rows rank::W — what one process drawing for W·b rows
    gives these rows."""
    rank, world = shard_of(generator)
    shape = tuple(shape)
    if world == 1:
        return draw(shape, generator=generator, **kwargs)
    full = draw((shape[0] * world, *shape[1:]), generator=generator, **kwargs)
    return full[rank::world].contiguous()


def batch_strata(n: int, generator=None, **kwargs) -> torch.Tensor:
    """The strata i/N of n rows, N the global batch's rows: arange(n)/n in one process; with a sharded
    generator the rows rank::W of arange(W·n)/(W·n)."""
    rank, world = shard_of(generator)
    total = n * world
    strata = torch.arange(total, **kwargs) / total
    return strata if world == 1 else strata[rank::world]


def training_stream(global_step: int, batch_idx: int, accumulate: int = 1) -> int:
    return global_step * accumulate + batch_idx % accumulate


def validation_stream(batch_index: int, repeat: int = 0) -> int:
    return -1 - batch_index - repeat * STREAM_STRIDE
