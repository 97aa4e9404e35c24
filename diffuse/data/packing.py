"""Turn tokenized documents into fixed-length rows.

Each row carries `input_ids` and `segment_ids` (1, 2, … per document inside the row, 0 for padding).
Backbones build their attention mask from `segment_ids`, so tokens attend only within their own
document and never to padding; losses ignore segment 0.
"""

from __future__ import annotations

import numpy as np


def pack_documents(docs: list[list[int]], seq_len: int, pad_id: int,
                   extra: dict[str, list[list[int]]] | None = None) -> dict[str, list[list[int]]]:
    """Concatenate documents into rows of `seq_len`; a document longer than the space left is split
    across rows. The last, partial row is padded rather than dropped (small validation sets count).
    `extra` columns (per-token, aligned with `docs`, e.g. a prompt_mask) travel with their tokens, 0 on padding."""
    ids = np.fromiter((t for d in docs for t in d), dtype=np.int64)
    seg = np.concatenate([np.full(len(d), i + 1, dtype=np.int64) for i, d in enumerate(docs)]) if docs else ids
    n_rows = -(-len(ids) // seq_len)
    pad = n_rows * seq_len - len(ids)

    def rows(flat, fill):
        return np.concatenate([flat, np.full(pad, fill, dtype=np.int64)]).reshape(n_rows, seq_len)

    out = {"input_ids": rows(ids, pad_id).tolist()}
    # renumber segments within each row from 1 so ids stay small and rows are self-contained
    out["segment_ids"] = _renumber(rows(seg, 0)).tolist()
    for name, cols in (extra or {}).items():
        out[name] = rows(np.fromiter((v for c in cols for v in c), dtype=np.int64), 0).tolist()
    return out


def pad_documents(docs: list[list[int]], seq_len: int, pad_id: int,
                  extra: dict[str, list[list[int]]] | None = None) -> dict[str, list[list[int]]]:
    """One document per row, truncated to `seq_len` and right-padded (`extra` columns with 0)."""
    fit = lambda d, fill: d[:seq_len] + [fill] * (seq_len - len(d[:seq_len]))  # noqa: E731
    out = {"input_ids": [fit(d, pad_id) for d in docs], "segment_ids": [fit([1] * len(d), 0) for d in docs]}
    for name, cols in (extra or {}).items():
        out[name] = [fit(list(c), 0) for c in cols]
    return out


def _renumber(seg: np.ndarray) -> np.ndarray:
    out = np.zeros_like(seg)
    for r, row in enumerate(seg):
        real = row > 0
        if real.any():
            starts = np.r_[True, row[1:] != row[:-1]] & real
            out[r, real] = np.cumsum(starts)[real]
    return out
