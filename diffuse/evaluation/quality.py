"""Quality of generated samples: gen-PPL under a judge, diversity beside it, and the judge's score on
real held-out text of the same length as the reference line: gen-PPL alone rewards repetitive, low-entropy
text, so it is never shown without them."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from diffuse.evaluation.judges import perplexity
from diffuse.evaluation.text_stats import diversity


@dataclass
class Samples:
    texts: list[str]
    tokens: list[list[int]]  # generated ids, trimmed at EOS
    nfe: int  # forward passes per sample (batches run in parallel; the largest batch's count)
    seconds_per_sample: float
    nfe_per_sample: float  # mean passes a sample costs alone (adaptive samplers: below `nfe`)


def generate(module, sampler, tokenizer, num_samples: int, length: int, batch_size: int, seed: int) -> Samples:
    """Unconditional samples; wall time measured per batch and divided by its size."""
    texts, tokens, nfe, seconds, row_nfe = [], [], 0, 0.0, []
    sync = torch.cuda.synchronize if next(module.parameters()).is_cuda else (lambda: None)
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        sync()
        tic = time.perf_counter()
        out = module.generate([[] for _ in range(n)], length, seed=seed + start, sampler=sampler)
        sync()
        seconds += time.perf_counter() - tic
        nfe = max(nfe, out.nfe)
        row_nfe += out.nfe_per_row().tolist()
        for row, k in zip(out.tokens.tolist(), out.lengths.tolist()):
            tokens.append(row[:k])
            texts.append(tokenizer.decode(row[:k], skip_special_tokens=True))
    return Samples(texts, tokens, nfe, seconds / max(num_samples, 1), sum(row_nfe) / max(len(row_nfe), 1))


def quality(samples: Samples, judge=None) -> dict:
    """Gen-PPL (None without a judge), mean unigram entropy (bits), distinct-1/2/3, NFE, speed."""
    out = {"gen_ppl": None, "gen_bpt": None}
    if judge is not None:
        scored = perplexity(judge.score(samples.texts))
        out = {"gen_ppl": scored["ppl"], "gen_bpt": scored["bpt"]}
    out.update(diversity(samples.tokens))
    out["mean_length"] = sum(map(len, samples.tokens)) / max(len(samples.tokens), 1)
    out.update({"nfe": samples.nfe, "nfe_per_sample": samples.nfe_per_sample,
                "seconds_per_sample": samples.seconds_per_sample})
    return out


def real_snippets(texts: list[str], tokenizer, count: int, length: int) -> tuple[list[str], list[list[int]]]:
    """Consecutive `length`-token pieces of held-out text (documents joined by blank lines), so the
    reference has the samples' length: entropy and PPL both depend on it."""
    pieces, ids = [], []
    for text in texts:
        ids += tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"]
        while len(ids) >= length and len(pieces) < count:
            pieces.append(ids[:length])
            ids = ids[length:]
        if len(pieces) >= count:
            break
    return [tokenizer.decode(p, skip_special_tokens=True) for p in pieces], pieces


def reference(texts: list[str], tokens: list[list[int]], judge=None) -> dict:
    """The judge's own PPL and bits/token on real text, and that text's diversity."""
    out = {"snippets": len(texts)}
    if judge is not None:
        scored = perplexity(judge.score(texts))
        out.update({"judge_ppl": scored["ppl"], "judge_bpt": scored["bpt"]})
    out.update(diversity(tokens))
    return out


def degenerate(point: dict, ref: dict | None, margin: float = 0.0) -> bool | None:
    """Samples that score *better* than real text while being less diverse are degenerate, not good
    (confidence-ordered decoding does this). None when either number is missing."""
    if not ref or point.get("gen_ppl") is None or ref.get("judge_ppl") is None:
        return None
    return point["gen_ppl"] < ref["judge_ppl"] and point["entropy"] < ref["entropy"] * (1.0 - margin)
