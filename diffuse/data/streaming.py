"""Streaming (data.streaming=true): a corpus read through `datasets` streaming as training consumes it, for
corpora larger than the disk. Nothing is written: documents are tokenized and packed CHUNK at a time, exactly
as the prepared path does, so the rows of a stream read in order are the prepared rows.

Training order: epoch e of the stream is shuffled with seed (seed, e) through a buffer of `shuffle_buffer`
documents (and the shards' order), then cut into rows; row positions count over the endless stream. As in
ResumableRandomSampler, rank r of W takes positions start·W + r, start·W + r + W, … — so W ranks with batches
of b rows read what one process with batches of W·b reads, and a resumed run (start = the rows already
consumed) reads the same batches as an uninterrupted one. It skips by reading the stream again: resuming costs
tokenizing what was skipped, not storing anything.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import islice

import datasets
import torch
from torch.utils.data import IterableDataset

from diffuse.data.packing import DROPPED
from diffuse.data.prepared import CHUNK
from diffuse.errors import DiffuseError


def decoded(documents, on_decode_error: Callable[[], None] | None = None) -> Iterator:
    """`documents` as they come; text that is not UTF-8 (streaming reads files without checking them first)
    calls `on_decode_error`, which raises the one-line error naming the file (else the decoder's error stands)."""
    try:
        yield from documents
    except UnicodeDecodeError:
        if on_decode_error is not None:
            on_decode_error()
        raise


def packed_rows(documents, encode: Callable[[dict], dict],
                on_decode_error: Callable[[], None] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Rows, one at a time, from an iterable of {"text": …} documents, encoded CHUNK documents at a time."""
    it = decoded(documents, on_decode_error)
    while batch := list(islice(it, CHUNK)):
        columns = encode({key: [doc[key] for doc in batch] for key in batch[0]})
        columns.pop(DROPPED, None)  # truncation counts (SFT rows, which are never streamed)
        for i in range(len(columns["input_ids"])):
            yield {name: torch.from_numpy(rows[i]).long() for name, rows in columns.items()}


class StreamingRows(IterableDataset):
    """The endless, shuffled, resumable training rows of a stream (see the module's docstring)."""

    def __init__(self, stream: datasets.IterableDataset, encode: Callable[[dict], dict], seed: int,
                 on_decode_error: Callable[[], None] | None = None, shuffle_buffer: int = 10_000):
        self.stream, self.encode, self.seed, self.shuffle_buffer = stream, encode, seed, shuffle_buffer
        self.on_decode_error = on_decode_error
        self.start, self.rank, self.world_size = 0, 0, 1

    def at(self, start: int, rank: int = 0, world_size: int = 1) -> "StreamingRows":
        """Begin after `start` rows of this rank (a resumed run), as rank `rank` of `world_size`."""
        self.start, self.rank, self.world_size = start, rank, world_size
        return self

    def epoch(self, e: int) -> Iterator[dict[str, torch.Tensor]]:
        shuffled = self.stream.shuffle(seed=self.seed * 100_003 + e, buffer_size=self.shuffle_buffer)
        return packed_rows(shuffled, self.encode, self.on_decode_error)

    def __iter__(self):
        first = self.start * self.world_size + self.rank
        position, e = 0, 0
        while True:
            empty = True
            for row in self.epoch(e):
                empty = False
                if position >= first and (position - first) % self.world_size == 0:
                    yield row
                position += 1
            if empty:
                raise DiffuseError("data.streaming: the training stream holds no text")
            e += 1


def materialise(stream: datasets.IterableDataset, encode: Callable[[dict], dict], documents: int,
                on_decode_error: Callable[[], None] | None = None) -> datasets.Dataset:
    """The first `documents` documents of a stream as in-memory rows (the validation set of a streamed corpus)."""
    rows = list(packed_rows(islice(stream, documents), encode, on_decode_error))
    if not rows:
        raise DiffuseError("data.streaming: the validation stream holds no text")
    return datasets.Dataset.from_dict({k: [r[k].tolist() for r in rows] for k in rows[0]}).with_format("torch")
