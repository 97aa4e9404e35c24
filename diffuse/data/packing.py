"""Turn tokenized documents into fixed-length rows.

Each row carries `input_ids` and `segment_ids` (1, 2, … per document inside the row, 0 for padding).
Backbones build their attention mask from `segment_ids`, so tokens attend only within their own
document and never to padding; losses ignore segment 0. Rows come back as int64 arrays [rows, seq_len].
"""

from __future__ import annotations

import numpy as np


def pack_documents(docs: list[list[int]], seq_len: int, pad_id: int,
                   extra: dict[str, list[list[int]]] | None = None) -> dict[str, np.ndarray]:
    """Concatenate documents into rows of `seq_len`; a document longer than the space left is split
    across rows. The last, partial row is padded rather than dropped (small validation sets count).
    `extra` columns (per-token, aligned with `docs`, e.g. a prompt_mask) travel with their tokens, 0 on padding."""
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    ids = np.fromiter((t for d in docs for t in d), dtype=np.int64, count=int(lengths.sum()))
    seg = np.repeat(np.arange(1, len(docs) + 1, dtype=np.int64), lengths)
    n_rows = -(-len(ids) // seq_len)
    pad = n_rows * seq_len - len(ids)

    def rows(flat, fill):
        return np.concatenate([flat, np.full(pad, fill, dtype=np.int64)]).reshape(n_rows, seq_len)

    # renumber segments within each row from 1 so ids stay small and rows are self-contained
    out = {"input_ids": rows(ids, pad_id), "segment_ids": _renumber(rows(seg, 0))}
    for name, cols in (extra or {}).items():
        out[name] = rows(np.fromiter((v for c in cols for v in c), dtype=np.int64, count=len(ids)), 0)
    return out


def pad_documents(docs: list[list[int]], seq_len: int, pad_id: int,
                  extra: dict[str, list[list[int]]] | None = None) -> dict[str, np.ndarray]:
    """One document per row, truncated to `seq_len` and right-padded (`extra` columns with 0)."""
    def fit(cols, fill):
        out = np.full((len(docs), seq_len), fill, dtype=np.int64)
        for row, c in zip(out, cols):
            row[: min(len(c), seq_len)] = c[:seq_len]
        return out

    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    segments = (np.arange(seq_len) < lengths[:, None]).astype(np.int64)
    out = {"input_ids": fit(docs, pad_id), "segment_ids": segments}
    for name, cols in (extra or {}).items():
        out[name] = fit(cols, 0)
    return out


def _renumber(seg: np.ndarray) -> np.ndarray:
    real = seg > 0
    starts = real.copy()
    starts[:, 1:] &= seg[:, 1:] != seg[:, :-1]
    return np.where(real, np.cumsum(starts, axis=1), 0)
