"""Data: text sources, tokenizers, the rows made of them (rows.py) and the LightningDataModule that serves
them as batches (datamodule.py). Every module here is found by diffuse/core/discovery.py, so a new source or
tokenizer is one module plus one yaml."""

from diffuse.data.datamodule import TextDataModule
from diffuse.data.rows import RowMaker

__all__ = ["RowMaker", "TextDataModule"]
