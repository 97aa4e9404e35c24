"""Training objectives, registered by name."""

from diffuse.objectives import autoregressive, continuous, llada, masked_discrete  # noqa: F401
from diffuse.objectives.base import LossOutput, SpecialTokens

__all__ = ["LossOutput", "SpecialTokens"]
