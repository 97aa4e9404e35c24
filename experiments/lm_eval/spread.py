"""The spread of the Monte-Carlo loglikelihood against mc_samples, on one diffusion checkpoint and the local cloze task.

For each of the first DOCS documents (4 choices each) and each n in N: the estimate under SEEDS seeds. Reported per
n: the standard deviation across seeds (nats, mean over requests), the estimator's own standard error (from its
antithetic pairs), how often the chosen answer differs from the one at the largest n under seed 0, and the seconds per
request (this machine, one thread).
    python experiments/lm_eval/spread.py CKPT TASK_DIR [--docs 3] [--seeds 4] [--n 16 64 256]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from diffuse.evaluation.continuations import MonteCarloScorer
from diffuse.evaluation.lm_eval_model import DiffuseLM

parser = argparse.ArgumentParser()
parser.add_argument("ckpt")
parser.add_argument("task_dir")
parser.add_argument("--docs", type=int, default=3)
parser.add_argument("--seeds", type=int, default=4)
parser.add_argument("--n", type=int, nargs="+", default=[16, 64, 256])
parser.add_argument("--batch-size", type=int, default=64)
args = parser.parse_args()
torch.set_num_threads(1)

lm = DiffuseLM(ckpt=args.ckpt, device="cpu")
docs = [json.loads(line) for line in (Path(args.task_dir) / "diffuse_cloze.jsonl").read_text().splitlines()][: args.docs]
requests = [lm._fit(*lm._encode_pair(d["context"], c)) for d in docs for c in d["choices"]]


def choices(scores):
    return [max(range(4), key=lambda c: scores[4 * d + c]) for d in range(len(docs))]


runs = {}
for n in sorted(args.n):
    for seed in range(args.seeds):
        scorer = MonteCarloScorer(lm.module.backbone, lm.module.objective, args.batch_size, n, seed)
        tic = time.perf_counter()
        scored = scorer.score(requests)
        runs[n, seed] = ([s.logprob for s in scored], [s.stderr for s in scored], time.perf_counter() - tic)
reference = choices(runs[max(args.n), 0][0])
print(f"{lm.checkpoint.objective}, {len(docs)} documents × 4 choices, {args.seeds} seeds\n")
print("| mc_samples | std across seeds (nats) | mean reported stderr | answers differing from n=%d | s / request |" % max(args.n))
print("|---|---|---|---|---|")
for n in sorted(args.n):
    per_request = [statistics.stdev(runs[n, s][0][r] for s in range(args.seeds)) for r in range(len(requests))]
    stderr = statistics.mean(x for s in range(args.seeds) for x in runs[n, s][1])
    flips = sum(a != b for s in range(args.seeds) for a, b in zip(choices(runs[n, s][0]), reference))
    seconds = statistics.mean(runs[n, s][2] for s in range(args.seeds)) / len(requests)
    print(f"| {n} | {statistics.mean(per_request):.3f} | {stderr:.3f} | {flips}/{args.seeds * len(docs)} | {seconds:.2f} |")
gaps = []
for d in range(len(docs)):
    best = sorted(runs[max(args.n), 0][0][4 * d : 4 * d + 4], reverse=True)
    gaps.append(best[0] - best[1])
print(f"\ngap between the best two choices at n={max(args.n)} (nats): " + ", ".join(f"{g:.2f}" for g in gaps))
