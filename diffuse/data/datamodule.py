"""One LightningDataModule for every text source: it serves as batches the rows that diffuse/data/rows.py
makes (load → tokenize → pack; prepared, in memory or streamed).

Training batches come from a seeded, endless sampler that can start at any step, so a resumed run
sees exactly the batches an uninterrupted one would have seen.
"""

from __future__ import annotations

import inspect
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from diffuse.data.rows import RowMaker, check_seq_len
from diffuse.data.streaming import StreamingRows
from diffuse.errors import DiffuseError


class ResumableRandomSampler(Sampler[int]):
    """Endless stream of indices: epoch e is a permutation seeded by (seed, e). `start` skips the
    first `start` indices of the stream (per rank) without loading any data.

    With W ranks the ranks interleave over the one stream: rank r yields positions start·W + r + W·i. With
    batches of b rows, row i of rank r's step-s batch is stream position s·W·b + r + W·i, i.e. row i·W + r of
    the batch one process with batches of W·b rows reads at step s: the same rows in the same order, which
    the sharded training noise (diffuse/core/noise.py) relies on."""

    def __init__(self, n: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.start = n, seed, start
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        position = self.start * self.world_size + self.rank  # ranks interleave over one stream
        epoch, offset = divmod(position, self.n)
        while True:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            perm = torch.randperm(self.n, generator=g).numpy()  # 8 bytes a row: a Python list costs ~5x that
            while offset < self.n:
                yield int(perm[offset])
                offset += self.world_size
            epoch, offset = epoch + 1, offset - self.n


class ValidationShard(Sampler[list[int]]):
    """Rank r's validation batches with W ranks: the batches one process reads (batch k = rows
    [k·E, (k+1)·E)), k = r, r + W, …, so the ranks' metric sums add up to one process's. An integer
    `limit` (trainer.limit_val_batches) counts the global batches, as in one process; Lightning's own limit then
    never bites (each rank has fewer batches)."""

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, limit=None):
        total = -(-n // batch_size)
        if isinstance(limit, float) and limit not in (0.0, 1.0):
            raise DiffuseError(f"trainer.limit_val_batches={limit}: with {world_size} processes give a number of "
                               "batches (a fraction would apply to each process's share)")
        if isinstance(limit, int):
            total = min(total, limit)
        if 0 < total < world_size:
            raise DiffuseError(f"validation has {total} batch(es) of data.eval_batch_size={batch_size} for {world_size} "
                               "processes: every process needs one (lower data.eval_batch_size or raise "
                               "trainer.limit_val_batches)")
        self.batches = [list(range(k * batch_size, min(n, (k + 1) * batch_size)))
                        for k in range(rank, total, world_size)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


class TextDataModule(L.LightningDataModule):
    """Serves the rows a RowMaker (diffuse/data/rows.py) makes as batches: training batches from the
    resumable sampler (or the stream), validation batches sharded over the ranks. Its keywords are the
    `data.*` keys of conf/data/_datamodule.yaml (config_keys()); `source` and `tokenizer` are the rest."""

    def __init__(
        self,
        source: dict,
        tokenizer: dict,
        seq_len: int = 128,
        batch_size: int = 16,
        eval_batch_size: int | None = 32,
        pack: bool = True,
        add_bos: bool = True,
        add_eos: bool = True,
        num_workers: int = 0,
        train_tokens: int | None = None,
        seed: int = 0,
        cache_dir: str = ".cache/diffuse",
        prepared: bool = True,
        num_proc: int | None = None,
        streaming: bool = False,
        stream_val_docs: int = 2000,
    ):
        super().__init__()
        check_seq_len(seq_len)  # before batch_size, as the config lists them
        if int(batch_size) <= 0:
            raise DiffuseError(f"data.batch_size={batch_size} must be a positive integer")
        self.maker = RowMaker(source, tokenizer, seq_len=seq_len, pack=pack, add_bos=add_bos, add_eos=add_eos,
                              train_tokens=train_tokens, seed=seed, cache_dir=cache_dir, prepared=prepared,
                              num_proc=num_proc, streaming=streaming, stream_val_docs=stream_val_docs)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers, self.seed = num_workers, seed
        self.split_names = ("train", "validation")  # evaluation asks for validation only
        self.splits: dict[str, Any] = {}
        self.accumulate = 1  # set by the training entry point so resumption skips the right count

    @classmethod
    def config_keys(cls) -> tuple[str, ...]:
        """The `data.*` keys that are the DataModule's (the rest name and configure the source): its keywords,
        less those the entry points pass themselves."""
        return tuple(k for k in inspect.signature(cls).parameters if k not in ("source", "tokenizer", "seed", "cache_dir"))

    # -- the rows: made by the RowMaker -----------------------------------------------------------
    @property
    def tokenizer(self):
        return self.maker.tokenizer

    @property
    def raw(self):
        """The raw text splits (RowMaker.raw)."""
        return self.maker.raw

    @raw.setter
    def raw(self, value):
        self.maker.raw = value

    @property
    def seq_len(self) -> int:
        return self.maker.seq_len

    @property
    def prepared(self) -> bool:
        return self.maker.prepared

    @property
    def streaming(self) -> bool:
        return self.maker.streaming

    def load(self, tokenizer=None):
        """Find the source and build (or take) the tokenizer (RowMaker.load); called before the model exists."""
        return self.maker.load(tokenizer)

    def documents(self, split: str, limit: int | None = None):
        """The first `limit` (all: None) documents' text of a split, one at a time, streamed or not."""
        return self.maker.documents(split, limit)

    def cache_parts(self) -> dict:
        return self.maker.cache_parts()

    def setup(self, stage: str | None = None):
        if self.splits:
            return
        for split, rows in self.maker.make(self.split_names):
            self.splits[split] = rows

    # -- loaders ----------------------------------------------------------------------------------
    def train_dataloader(self):
        ds = self.splits["train"]
        # Lightning restores global_step before asking for the loader: start where the last run stopped.
        trainer = self.trainer
        step = trainer.global_step if trainer is not None else 0
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        start = step * self.accumulate * self.batch_size
        if world > 1 and "validation" in self.splits:  # a validation that cannot be sharded fails now, not at its turn
            ValidationShard(len(self.splits["validation"]), self.eval_batch_size, rank, world, trainer.limit_val_batches)
        if isinstance(ds, StreamingRows):
            # one reader per rank: the stream's position is counted in this process (workers would each restart it)
            return DataLoader(ds.at(start, rank, world), batch_size=self.batch_size, drop_last=True)
        sampler = ResumableRandomSampler(len(ds), self.seed, start=start, rank=rank, world_size=world)
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          drop_last=True, persistent_workers=self.num_workers > 0)

    def val_dataloader(self):
        ds = self.splits["validation"]
        trainer = self.trainer
        world = trainer.world_size if trainer is not None else 1
        if world == 1:
            return DataLoader(ds, batch_size=self.eval_batch_size, num_workers=self.num_workers)
        sampler = ValidationShard(len(ds), self.eval_batch_size, trainer.global_rank, world, trainer.limit_val_batches)
        return DataLoader(ds, batch_sampler=sampler, num_workers=self.num_workers)

    def describe(self) -> str:
        n = {k: "streamed" if isinstance(v, StreamingRows) else len(v) for k, v in self.splits.items()}
        return f"{n.get('train', 0)} train / {n.get('validation', 0)} val rows of {self.seq_len} tokens, vocab {len(self.tokenizer)}"


