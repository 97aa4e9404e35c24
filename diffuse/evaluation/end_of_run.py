"""What `python -m diffuse.train` prints when a run ends: a few samples, how they read (readable.py), val/bpt,
the run dir and what to try next."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from diffuse.evaluation import readable
from diffuse.run.entry import check_context

log = logging.getLogger("diffuse")

CORPUS_DOCS = 100_000  # training documents whose words the end-of-run readability check counts as known


def print_samples(cfg: DictConfig, module, tokenizer, dm, flat: dict, run_dir: Path) -> None:
    """The samples (`num_samples` of them; none: nothing printed), how they read, val/bpt, the run dir and
    what to try next."""
    if cfg.get("num_samples", 0) <= 0:
        return
    sampler = module.sampler
    check_context(cfg, [[]], int(cfg.sample_length), beyond=True, sampler=sampler)  # past data.seq_len: a warning
    log.info("[3/3] sample: %d × %d tokens, sampler=%s", cfg.num_samples, cfg.sample_length, sampler.registry_name)
    out = module.generate([[] for _ in range(cfg.num_samples)], cfg.sample_length, seed=cfg.seed)
    rows = [row[:n] for row, n in zip(out.tokens.tolist(), out.lengths.tolist())]
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in rows]
    for i, (row, text) in enumerate(zip(rows, texts)):
        print(f"--- sample {i} ({len(row)} tokens, {out.nfe} forward passes) ---\n{text}")
    special = set(tokenizer.all_special_ids)
    real = [t for text in dm.documents("validation", 2000)
            for t in tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"]]
    # the training text's words: at most CORPUS_DOCS documents (the embedded corpus has ~2.5k), so the end of a
    # run on a large corpus does not pull all of its text into memory
    vocabulary = readable.corpus_words(dm.documents("train", CORPUS_DOCS))
    metrics = readable.word_metrics(texts, vocabulary)
    metrics["entropy"], metrics["real_entropy"] = readable.matched_entropy(
        [[t for t in row if t not in special] for row in rows], real)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    bpt = flat.get("val/bpt")
    print(f"---\nsamples: {readable.describe(metrics)}\n"
          f"val/bpt: {'n/a' if bpt is None else f'{bpt:.3f}'} (bits per token on held-out text; lower is better)\n"
          f"run dir: {run_dir}\n"
          "next:\n"
          f'  python -m diffuse.sample ckpt={ckpt} prompt="The for statement" num_samples=2\n'
          f"  python -m diffuse.evaluate ckpt={ckpt}\n"
          "  python -m diffuse.train recipe=tdlm        # a 7M-parameter recipe (TDLM); README lists the others")
