"""Data: text sources, tokenizers and the LightningDataModule. Every module here is found by
diffuse/core/discovery.py, so a new source or tokenizer is one module plus one yaml."""

from diffuse.data.datamodule import TextDataModule

__all__ = ["TextDataModule"]
