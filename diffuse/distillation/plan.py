"""A distillation round as diffuse.distill runs it: what the student starts from, the `distill` spec its
loss is built from, the config changes it gets, and what to prepare in its run dir first."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Round:
    init_from: str  # the checkpoint the student starts from
    distill: dict  # the DISTILLERS spec: name, teacher, options
    changes: dict  # dotted train keys set for the student (its sampler steps, its block size)
    steps: int | None  # the student's sampling steps (per block for a block sampler)
    describe: str
    total: int | None = None  # rounds in the plan
    prepare: Callable[[Path], None] = field(default=lambda run_dir: None)  # e.g. record teacher trajectories


def previous_student(out_dir: Path, r: int) -> str:
    """Round r's student checkpoint (the next round's teacher)."""
    return str(out_dir / f"round{r}" / "checkpoints" / "last.ckpt")
