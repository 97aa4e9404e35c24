"""Which process this is, read from the environment as Lightning, torchrun and SLURM set it, so it works
before (and without) torch.distributed: only global rank 0 writes a run directory, only local rank 0 of each
node prepares data."""

from __future__ import annotations

import os


def _all_zero(keys: tuple[str, ...]) -> bool:
    return all(int(os.environ.get(k, 0) or 0) == 0 for k in keys)


def is_global_rank_zero() -> bool:
    return _all_zero(("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def is_local_rank_zero() -> bool:
    return _all_zero(("LOCAL_RANK", "SLURM_LOCALID"))
