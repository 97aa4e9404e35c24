"""One LightningDataModule for every text source: load → tokenize → pack → batches.

With `prepared` (data.prepared, the default) the packed rows are written once to the prepared-data cache
and memory-mapped (diffuse/data/prepared.py); `prepared=false` tokenizes in memory on every run;
`streaming=true` reads the corpus as training consumes it and writes nothing (diffuse/data/streaming.py).

Training batches come from a seeded, endless sampler that can start at any step, so a resumed run
sees exactly the batches an uninterrupted one would have seen.
"""

from __future__ import annotations

import hashlib
import json
from itertools import islice
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from diffuse.contracts import DataSource, TokenizerBuilder, check_contract
from diffuse.data.packing import pack_documents, pad_documents
from diffuse.data.prepared import CHUNK, LAYOUT, cache_key, is_prepared, open_split
from diffuse.data.streaming import StreamingRows, materialise
from diffuse.data.tokenizers import tokenizer_state
from diffuse.errors import DiffuseError
from diffuse.registry import DATASETS, TOKENIZERS


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
    def __init__(
        self,
        source: dict,
        tokenizer: dict,
        seq_len: int = 128,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
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
        if seq_len is None or int(seq_len) <= 0:
            raise DiffuseError(f"data.seq_len={seq_len} must be a positive integer")
        if int(batch_size) <= 0:
            raise DiffuseError(f"data.batch_size={batch_size} must be a positive integer")
        self.source_name = source.get("name")
        self.source = DATASETS.build(source)
        self.tokenizer_builder = TOKENIZERS.build(tokenizer)
        check_contract(self.source, DataSource, f"data={source.get('name')}")
        check_contract(self.tokenizer_builder, TokenizerBuilder, f"tokenizer={tokenizer.get('name')}")
        self.seq_len, self.batch_size = int(seq_len), int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.pack, self.add_bos, self.add_eos = pack, add_bos, add_eos
        self.num_workers, self.seed, self.cache_dir = num_workers, seed, cache_dir
        self.prepared = bool(prepared)  # rows written once to <cache_dir>/prepared/ and memory-mapped
        if num_proc is not None and int(num_proc) <= 0:
            raise DiffuseError(f"data.num_proc={num_proc} must be a positive number of processes or null (all cores)")
        self.num_proc = None if num_proc is None else int(num_proc)
        if train_tokens is not None and int(train_tokens) < self.seq_len:
            raise DiffuseError(f"data.train_tokens={train_tokens} must be at least data.seq_len={self.seq_len}")
        self.train_tokens = None if train_tokens is None else int(train_tokens)
        self.streaming = bool(streaming)  # read as training consumes it: nothing prepared, nothing held in memory
        if self.streaming and not callable(getattr(self.source, "stream", None)):
            raise DiffuseError(f"data.streaming=true: data={self.source_name} cannot be streamed; for a large corpus "
                               "use data.prepared=true (memory-mapped rows)")
        if self.streaming and self.train_tokens is not None:
            raise DiffuseError(f"data.train_tokens={self.train_tokens} needs the whole split to take its first rows; "
                               "with data.streaming=true drop it (or prepare the data: data.streaming=false)")
        if int(stream_val_docs) <= 0:
            raise DiffuseError(f"data.stream_val_docs={stream_val_docs} must be a positive number of documents")
        self.stream_val_docs = int(stream_val_docs)
        self.tokenizer = None
        self.fingerprint = None
        self._raw = None
        self.split_names = ("train", "validation")  # evaluation asks for validation only
        self.splits: dict[str, Any] = {}
        self.accumulate = 1  # set by the training entry point so resumption skips the right count

    # -- tokenizer first: the model's vocab_size comes from it -----------------------------------
    @property
    def raw(self):
        """The raw text splits, loaded on first use: a run whose prepared rows exist never reads the text.
        Streamed, they are `datasets` iterable datasets that read the files (or the hub) as they are consumed."""
        if self._raw is None:
            if self.streaming:
                self._raw = self.source.stream(self.cache_dir)
            else:
                self._raw, _ = self.source.load(seed=self.seed, cache_dir=self.cache_dir)
        return self._raw

    @raw.setter
    def raw(self, value):
        self._raw = value

    def load(self, tokenizer=None):
        """Find the source and build (or take) the tokenizer. Idempotent; called before the model exists.
        A BPE tokenizer already cached for this source reads no text."""
        if self.fingerprint is None:
            self.fingerprint = self.source.fingerprint(self.cache_dir)
        if self.tokenizer is None:
            # the tokenizer cache is keyed by what decides the training split: the files, the source's settings, the seed
            key = cache_key({"source": self.source_parts(), "fingerprint": self.fingerprint, "seed": self.seed})
            self.tokenizer = tokenizer or self.tokenizer_builder(self._train_texts(), cache_dir=self.cache_dir,
                                                                 fingerprint=key)
        return self.tokenizer

    def documents(self, split: str, limit: int | None = None):
        """The first `limit` (all: None) documents' text of a split, one at a time, streamed or not."""
        yield from (row["text"] for row in islice(self.raw[split], limit))

    def _train_texts(self):
        yield from self.documents("train")  # BPE stops at tokenizer.train_chars

    def setup(self, stage: str | None = None):
        if self.splits:
            return
        self.load()
        if self.streaming:
            for split in self.split_names:
                self.splits[split] = (StreamingRows(self.raw[split], self.encode, self.seed) if split == "train"
                                      else materialise(self.raw[split], self.encode, self.stream_val_docs))
            return
        if self.prepared:
            parts = self.cache_parts()
            root = Path(self.cache_dir) / "prepared" / cache_key(parts)
            meta = {"parts": parts, "seq_len": self.seq_len, "vocab_size": len(self.tokenizer)}
            if not all(is_prepared(root / split) for split in self.split_names):
                self._render()
            for split in self.split_names:
                self.splits[split] = open_split(root, split, lambda: self.raw[split], self.encode, meta,
                                                self._limit(split), num_proc=self.num_proc)
            return
        self._render()
        for split in self.split_names:
            ds = self.raw[split]
            rows = ds.map(
                self.encode, batched=True, batch_size=CHUNK, remove_columns=ds.column_names,
                desc=f"tokenize {split}", load_from_cache_file=False, keep_in_memory=True,
            )
            if len(rows) == 0:
                raise DiffuseError(f"data split '{split}' is empty after tokenization")
            limit = self._limit(split)
            if limit is not None:
                rows = rows.select(range(min(len(rows), limit)))
            self.splits[split] = rows.with_format("torch")

    def _render(self) -> None:
        render = getattr(self.source, "render", None)  # sources that need the tokenizer (chat templates)
        if render is not None:
            self.raw = render(self.raw, self.tokenizer)

    def _limit(self, split: str) -> int | None:
        # data-constrained studies: the first rows of the (shuffled) training split; held-out text is unchanged
        return self.train_tokens // self.seq_len if split == "train" and self.train_tokens is not None else None

    def encode(self, batch: dict[str, list]) -> dict[str, np.ndarray]:
        """A batch of documents → packed (or padded) rows."""
        tok = self.tokenizer
        bos = [tok.bos_token_id] if self.add_bos else []
        eos = [tok.eos_token_id] if self.add_eos else []
        arrange = pack_documents if self.pack else pad_documents
        if "prompt" not in batch:
            # raw text that spells "[MASK]" or "[EOS]" stays text: only the DataModule adds special ids
            docs = tok(batch["text"], add_special_tokens=False, split_special_tokens=True)["input_ids"]
            return arrange([bos + d + eos for d in docs], self.seq_len, tok.pad_token_id)
        # prompt/answer pairs (SFT): `text` starts with `prompt`; a per-token prompt_mask marks BOS + prompt
        heads = tok(batch["prompt"], add_special_tokens=False)["input_ids"]
        answers = [t[len(p):] for t, p in zip(batch["text"], batch["prompt"])]
        tails = tok(answers, add_special_tokens=False)["input_ids"]
        docs = [bos + h + a + eos for h, a in zip(heads, tails)]
        prompt_mask = [[1] * (len(bos) + len(h)) + [0] * (len(a) + len(eos)) for h, a in zip(heads, tails)]
        return arrange(docs, self.seq_len, tok.pad_token_id, extra={"prompt_mask": prompt_mask})

    def cache_parts(self) -> dict:
        """Everything that shapes the rows, hashed into the prepared-data key (diffuse/data/prepared.py): the
        source's settings (defaults included, however the config spelled them) and its files' fingerprint, the
        split seed, the tokenizer, the row settings."""
        tok = self.tokenizer
        state = json.dumps({**tokenizer_state(tok), "ids": [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id,
                                                            tok.mask_token_id]}, sort_keys=True)
        return {"layout": LAYOUT, "source": self.source_parts(),
                "fingerprint": self.fingerprint, "seed": self.seed, "tokenizer": hashlib.sha1(state.encode()).hexdigest(),
                "seq_len": self.seq_len, "pack": bool(self.pack), "add_bos": bool(self.add_bos),
                "add_eos": bool(self.add_eos)}

    def source_parts(self) -> dict:
        return {"name": self.source_name, **{k: v for k, v in vars(self.source).items() if not k.startswith("_")}}

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

    def test_dataloader(self):
        return self.val_dataloader()

    def describe(self) -> str:
        n = {k: "streamed" if isinstance(v, StreamingRows) else len(v) for k, v in self.splits.items()}
        return f"{n.get('train', 0)} train / {n.get('validation', 0)} val rows of {self.seq_len} tokens, vocab {len(self.tokenizer)}"


