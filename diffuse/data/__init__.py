"""Data: text sources, tokenizers and the LightningDataModule."""

from diffuse.data import sft, sources, tokenizers  # noqa: F401  (registers the built-ins)
from diffuse.data.datamodule import TextDataModule

__all__ = ["TextDataModule"]
