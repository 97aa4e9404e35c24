"""Samplers: strategies over an objective's reverse process, registered by name."""

from diffuse.sampling import ar, ddim, llada, masked  # noqa: F401
from diffuse.sampling.base import SampleOutput

__all__ = ["SampleOutput"]
