"""Issue 25's preset question: do the default preset's samples read better from objective=hybrid (decoded exactly,
i.e. as its AR row) than from the masked default? Ten draws of three samples per run (seeds 0..9, the default
`sample_length` and each run's own default sampler), scored by the end-of-run readability check
(diffuse/evaluation/readable.py) on all 30 at once and per draw.

    python experiments/hybrid/default_preset.py RUN_DIR [RUN_DIR …] [--draws 10] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from diffuse.evaluation import readable
from diffuse.evaluation.end_of_run import CORPUS_DOCS
from diffuse.run.build import build_datamodule
from diffuse.run.load import load_run


def score(run: Path, draws: int) -> dict:
    cfg, tokenizer, module = load_run(str(run / "checkpoints" / "last.ckpt"))
    dm = build_datamodule(cfg, int(cfg.seed), str(run / "data_cache"))
    dm.load(tokenizer)
    vocabulary = readable.corpus_words(dm.documents("train", CORPUS_DOCS))
    real = [t for text in dm.documents("validation", 2000)
            for t in tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"]]
    special = set(tokenizer.all_special_ids)
    texts, rows, passing, seconds = [], [], 0, 0.0
    for seed in range(draws):
        tic = time.perf_counter()
        out = module.generate([[] for _ in range(3)], int(cfg.sample_length), seed=seed)
        seconds += time.perf_counter() - tic
        draw_rows = [row[:n] for row, n in zip(out.tokens.tolist(), out.lengths.tolist())]
        draw_texts = [tokenizer.decode(r, skip_special_tokens=True) for r in draw_rows]
        m = readable.word_metrics(draw_texts, vocabulary)
        m["entropy"], m["real_entropy"] = readable.matched_entropy(
            [[t for t in r if t not in special] for r in draw_rows], real)
        passing += readable.meets_targets(m)
        texts += draw_texts
        rows += draw_rows
    m = readable.word_metrics(texts, vocabulary)
    m["entropy"], m["real_entropy"] = readable.matched_entropy([[t for t in r if t not in special] for r in rows], real)
    return {"run": run.name, "sampler": module.sampler.registry_name, "draws_meeting_every_bar": passing,
            "seconds_per_draw": seconds / draws, **m, "first": texts[0]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--draws", type=int, default=10)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(1)
    lines = ["| run | sampler | words in corpus | distinct-2 | longest repeat | entropy (real) | draws meeting every bar | s per draw |",
             "|---|---|---|---|---|---|---|---|"]
    firsts = []
    for run in args.runs:
        r = score(run, args.draws)
        lines.append(f"| {r['run']} | {r['sampler']} | {100 * r['in_corpus']:.0f}% of {r['words']} | {r['distinct_2']:.2f} | "
                     f"{r['max_repeat']} | {r['entropy']:.2f} ({r['real_entropy']:.2f}) | {r['draws_meeting_every_bar']}/{args.draws} | "
                     f"{r['seconds_per_draw']:.2f} |")
        firsts.append(f"**{r['run']}**, first sample:\n\n> {r['first'].strip()[:400]}\n")
    text = "\n".join(lines) + "\n\n" + "\n".join(firsts)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
