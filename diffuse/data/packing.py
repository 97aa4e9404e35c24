"""Turn tokenized documents into fixed-length rows.

Each row carries `input_ids` and `segment_ids` (1, 2, … per document inside the row, 0 for padding).
Backbones build their attention mask from `segment_ids`, so tokens attend only within their own
document and never to padding; losses ignore segment 0.
"""

from __future__ import annotations

import numpy as np


def pack_documents(docs: list[list[int]], seq_len: int, pad_id: int) -> dict[str, list[list[int]]]:
    """Concatenate documents into rows of `seq_len`; a document longer than the space left is split
    across rows. The last, partial row is padded rather than dropped (small validation sets count)."""
    ids = np.fromiter((t for d in docs for t in d), dtype=np.int64)
    seg = np.concatenate([np.full(len(d), i + 1, dtype=np.int64) for i, d in enumerate(docs)]) if docs else ids
    n_rows = -(-len(ids) // seq_len)
    pad = n_rows * seq_len - len(ids)
    ids = np.concatenate([ids, np.full(pad, pad_id, dtype=np.int64)]).reshape(n_rows, seq_len)
    seg = np.concatenate([seg, np.zeros(pad, dtype=np.int64)]).reshape(n_rows, seq_len)
    # renumber segments within each row from 1 so ids stay small and rows are self-contained
    seg = _renumber(seg)
    return {"input_ids": ids.tolist(), "segment_ids": seg.tolist()}


def pad_documents(docs: list[list[int]], seq_len: int, pad_id: int) -> dict[str, list[list[int]]]:
    """One document per row, truncated to `seq_len` and right-padded."""
    ids, seg = [], []
    for d in docs:
        d = d[:seq_len]
        ids.append(d + [pad_id] * (seq_len - len(d)))
        seg.append([1] * len(d) + [0] * (seq_len - len(d)))
    return {"input_ids": ids, "segment_ids": seg}


def _renumber(seg: np.ndarray) -> np.ndarray:
    out = np.zeros_like(seg)
    for r, row in enumerate(seg):
        real = row > 0
        if real.any():
            starts = np.r_[True, row[1:] != row[:-1]] & real
            out[r, real] = np.cumsum(starts)[real]
    return out
