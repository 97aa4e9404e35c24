"""Making the rows: text source + tokenizer → tokenized, packed (or padded) rows of each split.

With `prepared` (data.prepared, the default) the packed rows are written once to the prepared-data cache
and memory-mapped (diffuse/data/prepared.py); `prepared=false` tokenizes in memory on every run;
`streaming=true` reads the corpus as training consumes it and writes nothing (diffuse/data/streaming.py).
Serving them as batches is the DataModule's part (diffuse/data/datamodule.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from diffuse.contracts import DataSource, TokenizerBuilder, check_contract
from diffuse.data.packing import (
    DROPPED,
    pack_documents,
    pad_documents,
    truncated,
    truncation_counts,
    truncation_note,
)
from diffuse.data.prepared import (
    CHUNK,
    LAYOUT,
    cache_errors,
    cache_key,
    check_cache_dir,
    is_prepared,
    open_split,
)
from diffuse.data.sources import DOCUMENTS
from diffuse.data.streaming import StreamingRows, decoded, materialise
from diffuse.data.tokenizers import tokenizer_state
from diffuse.errors import DiffuseError
from diffuse.registry import DATASETS, TOKENIZERS

log = logging.getLogger("diffuse")


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
        check_cache_dir(cache_dir)  # a file or an uncreatable path fails now, in one line naming paths.cache_dir
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
            with cache_errors(self.cache_dir):
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
        with cache_errors(self.cache_dir):
            if self.fingerprint is None:
                self.fingerprint = self.source.fingerprint(self.cache_dir)
            if self.tokenizer is None:
                # the tokenizer cache is keyed by what decides the training split: the files, the source's settings,
                # the seed, the way text is cut into documents
                key = cache_key({"source": self.source_parts(), "fingerprint": self.fingerprint, "seed": self.seed,
                                 "documents": DOCUMENTS})
                self.tokenizer = tokenizer or self.tokenizer_builder(self._train_texts(), cache_dir=self.cache_dir,
                                                                     fingerprint=key)
        return self.tokenizer

    def documents(self, split: str, limit: int | None = None):
        """The first `limit` (all: None) documents' text of a split, one at a time, streamed or not."""
        yield from (row["text"] for row in decoded(islice(self.raw[split], limit), self._decode_error))

    def _decode_error(self) -> None:
        """A stream met text that is not UTF-8 (streaming reads files unchecked): the source names the file in the
        prepared path's one line, if it can."""
        check = getattr(self.source, "check_text", None)
        if check is not None:
            check()

    def _train_texts(self):
        yield from self.documents("train")  # BPE stops at tokenizer.train_chars

    # -- rows -------------------------------------------------------------------------------------
    def make(self, split_names) -> Iterator[tuple[str, Any]]:
        """(split, rows) for each of `split_names`, in order: the streamed training rows and the first
        stream_val_docs documents' validation rows, the memory-mapped prepared rows, or in-memory rows."""
        self.load()
        with cache_errors(self.cache_dir):
            yield from self._make(split_names)

    def _make(self, split_names) -> Iterator[tuple[str, Any]]:
        if self.streaming:
            for split in split_names:
                yield split, (StreamingRows(self.raw[split], self.encode, self.seed, self._decode_error)
                              if split == "train" else
                              materialise(self.raw[split], self.encode, self.stream_val_docs, self._decode_error))
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
            if DROPPED in rows.column_names:
                note = truncation_note(truncation_counts(np.asarray(rows[DROPPED])), self.seq_len, split)
                if note:
                    log.warning(note)
                rows = rows.remove_columns(DROPPED)
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
        if "prompt" not in batch:
            # raw text that spells "[MASK]" or "[EOS]" stays text: only the DataModule adds special ids
            docs = tok(batch["text"], add_special_tokens=False, split_special_tokens=True)["input_ids"]
            docs = [bos + d + eos for d in docs]
            if self.pack:
                return pack_documents(docs, self.seq_len, tok.pad_token_id)
            # one document per row: a longer one continues in the next rows (every token is trained on)
            return pad_documents(docs, self.seq_len, tok.pad_token_id, split=True)
        # prompt/answer pairs (SFT): `text` starts with `prompt`; a per-token prompt_mask marks BOS + prompt
        heads = tok(batch["prompt"], add_special_tokens=False)["input_ids"]
        answers = [t[len(p):] for t, p in zip(batch["text"], batch["prompt"])]
        tails = tok(answers, add_special_tokens=False)["input_ids"]
        docs = [bos + h + a + eos for h, a in zip(heads, tails)]
        prompt_mask = [[1] * (len(bos) + len(h)) + [0] * (len(a) + len(eos)) for h, a in zip(heads, tails)]
        if self.pack:
            return pack_documents(docs, self.seq_len, tok.pad_token_id, extra={"prompt_mask": prompt_mask})
        # one sample per row, truncated (an answer's tail cut from its prompt would teach nothing): what was cut
        # is counted (DROPPED) and said in one log line per split
        rows = pad_documents(docs, self.seq_len, tok.pad_token_id, extra={"prompt_mask": prompt_mask})
        return {**rows, DROPPED: truncated(docs, self.seq_len)}

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
