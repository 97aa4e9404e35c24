"""Backbones, registered by name. Each exposes `embed(ids)`, `forward(ids|embeds, t, segment_ids,
causal) -> hidden` and `logits(hidden)`; objectives use nothing else."""

from diffuse.models import hf, transformer  # noqa: F401
from diffuse.models import mamba2  # noqa: F401
