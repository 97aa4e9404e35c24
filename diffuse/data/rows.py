"""Making the rows: text source + tokenizer → tokenized, packed (or padded) rows of each split.

With `prepared` (data.prepared, the default) the packed rows are written once to the prepared-data cache
and memory-mapped (diffuse/data/prepared.py); `prepared=false` tokenizes in memory on every run;
`streaming=true` reads the corpus as training consumes it and writes nothing (diffuse/data/streaming.py).
Serving them as batches is the DataModule's part (diffuse/data/datamodule.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from diffuse.contracts import DataSource, TokenizerBuilder, check_contract
from diffuse.data.packing import pack_documents, pad_documents
from diffuse.data.prepared import CHUNK, LAYOUT, cache_key, is_prepared, open_split
from diffuse.data.streaming import StreamingRows, materialise
from diffuse.data.tokenizers import tokenizer_state
from diffuse.errors import DiffuseError
from diffuse.registry import DATASETS, TOKENIZERS


def check_seq_len(seq_len) -> None:
    if seq_len is None or int(seq_len) <= 0:
        raise DiffuseError(f"data.seq_len={seq_len} must be a positive integer")


class RowMaker:
    """The source (`data.name` and its settings), the tokenizer (`tokenizer.*`) and the row settings
    (seq_len, pack, BOS/EOS, train_tokens, prepared / in memory / streamed)."""

    def __init__(
        self,
        source: dict,
        tokenizer: dict,
        seq_len: int = 128,
        pack: bool = True,
        add_bos: bool = True,
        add_eos: bool = True,
        train_tokens: int | None = None,
        seed: int = 0,
        cache_dir: str = ".cache/diffuse",
        prepared: bool = True,
        num_proc: int | None = None,
        streaming: bool = False,
        stream_val_docs: int = 2000,
    ):
        check_seq_len(seq_len)
        self.source_name = source.get("name")
        self.source = DATASETS.build(source)
        self.tokenizer_builder = TOKENIZERS.build(tokenizer)
        check_contract(self.source, DataSource, f"data={source.get('name')}")
        check_contract(self.tokenizer_builder, TokenizerBuilder, f"tokenizer={tokenizer.get('name')}")
        self.seq_len = int(seq_len)
        self.pack, self.add_bos, self.add_eos = pack, add_bos, add_eos
        self.seed, self.cache_dir = seed, cache_dir
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

    # -- rows -------------------------------------------------------------------------------------
    def make(self, split_names) -> Iterator[tuple[str, Any]]:
        """(split, rows) for each of `split_names`, in order: the streamed training rows and the first
        stream_val_docs documents' validation rows, the memory-mapped prepared rows, or in-memory rows."""
        self.load()
        if self.streaming:
            for split in split_names:
                yield split, (StreamingRows(self.raw[split], self.encode, self.seed) if split == "train"
                              else materialise(self.raw[split], self.encode, self.stream_val_docs))
            return
        if self.prepared:
            parts = self.cache_parts()
            root = Path(self.cache_dir) / "prepared" / cache_key(parts)
            meta = {"parts": parts, "seq_len": self.seq_len, "vocab_size": len(self.tokenizer)}
            if not all(is_prepared(root / split) for split in split_names):
                self._render()
            for split in split_names:
                yield split, open_split(root, split, lambda: self.raw[split], self.encode, meta,
                                        self._limit(split), num_proc=self.num_proc)
            return
        self._render()
        for split in split_names:
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
            yield split, rows.with_format("torch")

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
