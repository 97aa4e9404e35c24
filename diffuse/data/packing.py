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
                  extra: dict[str, list[list[int]]] | None = None, split: bool = False) -> dict[str, np.ndarray]:
    """One document per row, right-padded (`extra` columns with 0). A document longer than `seq_len` is
    truncated to its first `seq_len` tokens, or with `split` cut into consecutive rows of `seq_len` (the last
    one padded): plain text keeps every token, each piece attending only to itself."""
    if split:
        docs, extra = _pieces(docs, seq_len), {name: _pieces(cols, seq_len) for name, cols in (extra or {}).items()}

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


def _pieces(docs: list[list[int]], seq_len: int) -> list[list[int]]:
    return [d[i:i + seq_len] for d in docs for i in range(0, max(len(d), 1), seq_len)]


def truncated(docs: list[list[int]], seq_len: int) -> np.ndarray:
    """Per document, the tokens past `seq_len` that pad_documents (without `split`) cuts off."""
    return np.maximum(np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs)) - seq_len, 0)


DROPPED = "dropped_tokens"  # a per-row count RowMaker.encode adds when rows truncate: a statistic, not a column


def truncation_counts(dropped: np.ndarray) -> dict[str, int]:
    """{documents, truncated, tokens} of one batch's DROPPED counts (add them up over batches)."""
    return {"documents": len(dropped), "truncated": int((dropped > 0).sum()), "tokens": int(dropped.sum())}


def truncation_note(counts: dict[str, int], seq_len: int, split: str) -> str | None:
    """The one log line saying what truncation cut off in a split (None when nothing was)."""
    if not counts.get("truncated"):
        return None
    return (f"data split '{split}': {counts['truncated']} of {counts['documents']} documents longer than "
            f"data.seq_len={seq_len} were truncated with data.pack=false ({counts['tokens']} tokens dropped; "
            "raise data.seq_len or set data.pack=true to keep them)")


def add_counts(total: dict[str, int], counts: dict[str, int]) -> dict[str, int]:
    return {k: total.get(k, 0) + v for k, v in counts.items()}


def _renumber(seg: np.ndarray) -> np.ndarray:
    real = seg > 0
    starts = real.copy()
    starts[:, 1:] &= seg[:, 1:] != seg[:, :-1]
    return np.where(real, np.cumsum(starts, axis=1), 0)
