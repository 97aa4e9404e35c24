"""Diversity of generated text: unigram entropy per sample and distinct-n over a set of samples.

Both read plain sequences (token ids, words or characters), so they need no tokenizer. Gen-PPL alone is
gameable by repetitive text (a sampler whose entropy falls scores a lower gen-PPL; Zheng et al. 2024,
arXiv 2409.02908); these are the numbers shown beside it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence


def unigram_entropy(tokens: Sequence[Hashable]) -> float:
    """Entropy in bits of the empirical unigram distribution of one sequence (0 for a constant or
    empty sequence; log2(n) when all n items differ)."""
    n = len(tokens)
    if n == 0:
        return 0.0
    return -sum(c / n * math.log2(c / n) for c in Counter(tokens).values()) + 0.0  # + 0.0: no -0.0


def distinct_n(sequences: Iterable[Sequence[Hashable]], n: int) -> float:
    """Distinct n-grams / all n-grams over the whole set (Li et al., 2016); n-grams never cross
    sequences. 0 when there is no n-gram at all."""
    if n <= 0:
        raise ValueError(f"distinct_n needs n ≥ 1, got {n}")
    seen, total = set(), 0
    for seq in sequences:
        grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else 0.0


def diversity(token_lists: Sequence[Sequence[Hashable]]) -> dict[str, float]:
    """Mean per-sample unigram entropy (bits) and distinct-1/2/3 of a set of samples."""
    nonempty = [t for t in token_lists if len(t)]
    out = {"entropy": sum(map(unigram_entropy, nonempty)) / len(nonempty) if nonempty else 0.0}
    out.update({f"distinct_{n}": distinct_n(token_lists, n) for n in (1, 2, 3)})
    return out
