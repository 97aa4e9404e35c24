"""diffuse: train, sample and compare diffusion language models."""

__version__ = "0.1.0"
