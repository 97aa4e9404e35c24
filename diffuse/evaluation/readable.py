"""Does a handful of samples read as text? Three word-level numbers and an honesty check, cheap enough to
print after every training run (diffuse/train.py) and to assert in a test (tests/test_first_run.py).

- `in_corpus`: the share of the samples' whitespace-separated words that occur, exactly, as a whitespace-
  separated word of the training text (punctuation included: "object," must occur as "object,");
- `distinct_2`: distinct word bigrams / all word bigrams over the samples (text_stats.distinct_n);
- `max_repeat`: the longest run of one word repeated back to back ("the the the" is 3);
- `entropy` beside `real_entropy`: the samples' mean unigram entropy in bits over their tokens, and that of
  real held-out text cut to the same lengths. A sampler that reads well only because its entropy is
  below the real text's (low temperature, confidence-ordered decoding) is degenerate: repetition, not
  quality (the same honesty check as gen-PPL's, diffuse/evaluation/quality.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

from diffuse.evaluation.text_stats import distinct_n, unigram_entropy

# what the printed samples of the default run are held to (README: the default preset); tests use the same numbers
TARGETS = {"in_corpus": 0.85, "distinct_2": 0.5, "max_repeat": 3}


def corpus_words(texts: Iterable[str]) -> set[str]:
    return {w for text in texts for w in text.split()}


def longest_run(words: Sequence[str]) -> int:
    return max((sum(1 for _ in group) for _, group in itertools.groupby(words)), default=0)


def word_metrics(samples: Sequence[str], vocabulary: set[str]) -> dict:
    words = [s.split() for s in samples]
    flat = [w for ws in words for w in ws]
    return {
        "words": len(flat),
        "in_corpus": sum(w in vocabulary for w in flat) / len(flat) if flat else 0.0,
        "distinct_2": distinct_n(words, 2),
        "max_repeat": max(map(longest_run, words), default=0),
    }


def matched_entropy(samples: Sequence[Sequence[int]], real: Sequence[int]) -> tuple[float, float]:
    """(samples' mean unigram entropy, real text's at the same lengths), in bits over token ids: sample i of
    n tokens is compared with n consecutive real tokens, taken one after another from `real` (wrapping)."""
    nonempty = [s for s in samples if len(s)]
    if not nonempty or not real:
        return 0.0, 0.0
    ours, ref, pos = [], [], 0
    for s in nonempty:
        n = min(len(s), len(real))
        if pos + n > len(real):
            pos = 0
        ours.append(unigram_entropy(list(s)))
        ref.append(unigram_entropy(list(real[pos : pos + n])))
        pos += n
    return sum(ours) / len(ours), sum(ref) / len(ref)


def meets_targets(m: dict, targets: dict = TARGETS) -> bool:
    return (m["in_corpus"] >= targets["in_corpus"] and m["distinct_2"] >= targets["distinct_2"]
            and m["max_repeat"] <= targets["max_repeat"] and m.get("entropy", 0.0) >= m.get("real_entropy", 0.0))


def describe(m: dict) -> str:
    return (f"{100 * m['in_corpus']:.0f}% of {m['words']} words occur in the training text, distinct-2 "
            f"{m['distinct_2']:.2f}, longest repeat {m['max_repeat']}; unigram entropy {m['entropy']:.2f} bits "
            f"(real text of the same lengths: {m['real_entropy']:.2f})")
