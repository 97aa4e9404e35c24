"""Sampling speed beside sampling quality, in one run: AR with its static KV cache, the full-sequence masked
model at N steps (no cache, Fast-dLLM's prefix and dual caches), and block diffusion with the exact cache,
at batch 1 and batch 16, each tokens/s printed beside the gen-PPL (under an AR judge), entropy and
distinct-2 its samples reach — a speed counts only at the quality it reaches.

    python experiments/bench/sampling.py --runs experiments/runs/block_diffusion \
        --judge experiments/runs/block_diffusion/judge_ar/checkpoints/last.ckpt --out experiments/bench

`--runs` holds the checkpoints `ar`, `full`, `block4`, `block16` (experiments/block_diffusion/run.sh trains
them on one budget). Quality is measured on `--samples` unconditional samples decoded as one batch (a batch
gives the same samples as one at a time: tested); tokens/s at batch 1 over `--batch1-samples` of them.
tokens/s counts the text delivered: each sample's tokens before its EOS.
"passes/token" is network positions run per generated token (out.positions): the cost behind the NFE, and
what a cache saves. Writes <name>.json, <name>.md and <name>.png (tokens/s against gen-PPL).

`--suite hybrid` (experiments/hybrid/run.sh) benchmarks the TiDAR hybrid instead, from `--runs` holding `ar`,
`hybrid_w1` and `block8` (a block diffusion drafter): AR + cache, the hybrid decoded as AR (`sampler=ar`), the
hybrid + exact speculative sampling at draft lengths 2/4/8 (its own draft head when the objective drafts for
itself — `contracts.DraftsForItself` —, else `block8` as the drafter), and AR + the `block8` drafter. Speculative rows add
the acceptance rate and tokens per verification pass (the target's forwards, per row); `--plot-draft PNG` draws
tokens/s against draft length.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from diffuse.run.build import build_sampler
from diffuse.evaluation.judges import DiffuseJudge
from diffuse.evaluation.quality import Samples, quality, real_snippets, reference
from diffuse.evaluation.runner import heldout, load_checkpoint
from diffuse.run.entry import load_drafter
from diffuse.contracts import DraftsForItself

# (label, run, sampler spec); the full-sequence model decodes in blocks of 16 so the caches can refresh
LENGTH_STEPS = "{length}"
CONFIGS = [
    ("AR + static KV cache", "ar", {"name": "ar"}),
    ("full, llada 1 tok/step", "full", {"name": "llada", "steps": LENGTH_STEPS, "span_length": 16}),
    ("full, llada 1 tok/step + prefix cache", "full", {"name": "llada", "steps": LENGTH_STEPS, "span_length": 16, "cache": "prefix"}),
    ("full, llada 1 tok/step + dual cache", "full", {"name": "llada", "steps": LENGTH_STEPS, "span_length": 16, "cache": "dual"}),
    ("full, llada 4 tok/step", "full", {"name": "llada", "steps": "{length_4}", "span_length": 16}),
    ("full, llada 4 tok/step + dual cache", "full", {"name": "llada", "steps": "{length_4}", "span_length": 16, "cache": "dual"}),
    ("full, threshold 0.9", "full", {"name": "threshold", "threshold": 0.9, "steps": LENGTH_STEPS, "span_length": 16}),
    ("full, threshold 0.9 + dual cache", "full", {"name": "threshold", "threshold": 0.9, "steps": LENGTH_STEPS, "span_length": 16, "cache": "dual"}),
    ("block 16, 1 tok/step, exact cache", "block16", {"name": "block", "steps": 16}),
    ("block 16, 4 tok/step, exact cache", "block16", {"name": "block", "steps": 4}),
    ("block 16, threshold 0.9, exact cache", "block16", {"name": "block", "steps": 16, "threshold": 0.9}),
    ("block 16, 1 tok/step, no cache", "block16", {"name": "block", "steps": 16, "use_cache": False}),
    ("block 4, 1 tok/step, exact cache", "block4", {"name": "block", "steps": 4}),
    ("block 4, 2 tok/step, exact cache", "block4", {"name": "block", "steps": 2}),
    ("block 4, threshold 0.9, exact cache", "block4", {"name": "block", "steps": 4, "threshold": 0.9}),
]

DRAFTS = (2, 4, 8)
PREDRAFTS = (1, 3, 7)  # TiDAR's single pass: a pre-draft block of k + 1 ≤ 8 (the hybrid's block) drops its first slot
# the hybrid suite: "{self_or_block8}" is the hybrid's own draft head where it has one, else the block8 drafter
HYBRID_CONFIGS = (
    [("AR + static KV cache", "ar", {"name": "ar"}),
     ("hybrid (λ=1) as AR + KV cache", "hybrid_w1", {"name": "ar"})]
    + [(f"hybrid (λ=1) + speculative k={k}", "hybrid_w1",
        {"name": "speculative", "draft_length": k, "drafter": "{self_or_block8}", "predraft": False}) for k in DRAFTS]
    + [(f"hybrid (λ=1) + TiDAR one pass k={k}", "hybrid_w1",
        {"name": "speculative", "draft_length": k, "drafter": "{self_or_block8}", "predraft": True}) for k in PREDRAFTS]
    + [(f"AR + block-8 diffusion drafter k={k}", "ar",
        {"name": "speculative", "draft_length": k, "drafter": "{block8}"}) for k in DRAFTS]
    + [("hybrid (λ=0.1) + speculative k=4", "hybrid_w01",
        {"name": "speculative", "draft_length": 4, "drafter": "{self_or_block8}", "predraft": False}),
       ("hybrid (λ=0.1) + TiDAR one pass k=3", "hybrid_w01",
        {"name": "speculative", "draft_length": 3, "drafter": "{self_or_block8}", "predraft": True}),
       ("hybrid from AR (λ=1) + speculative k=4", "hybrid_from_ar_w1",
        {"name": "speculative", "draft_length": 4, "drafter": "{self_or_block8}", "predraft": False}),
       ("hybrid from AR (λ=1) + TiDAR one pass k=3", "hybrid_from_ar_w1",
        {"name": "speculative", "draft_length": 3, "drafter": "{self_or_block8}", "predraft": True})]
)
SUITES = {"default": CONFIGS, "hybrid": HYBRID_CONFIGS}


def resolve_drafter(spec: dict, objective, runs: Path, drafters: dict) -> tuple[dict, str | None]:
    """The drafter placeholder of a speculative spec as a loaded Drafter; also says which drafter it is."""
    name = spec.get("drafter")
    if not isinstance(name, str):
        return spec, None
    if name == "{self_or_block8}" and isinstance(objective, DraftsForItself):
        return {k: v for k, v in spec.items() if k != "drafter"}, "self (draft head)"
    run = "block8"
    if run not in drafters:
        drafters[run] = load_drafter(str(runs / run / "checkpoints" / "last.ckpt"))
    return {**spec, "drafter": drafters[run]}, run


def spec_for(spec: dict, length: int) -> dict:
    fill = {"{length}": length, "{length_4}": max(1, length // 4)}
    return {k: fill.get(v, v) if isinstance(v, str) else v for k, v in spec.items()}


def timed_generate(module, sampler, n: int, batch: int, length: int, seed: int):
    """(outputs, seconds) for n unconditional samples in batches of `batch`."""
    outs, seconds = [], 0.0
    for start in range(0, n, batch):
        tic = time.perf_counter()
        outs.append(module.generate([[] for _ in range(min(batch, n - start))], length, seed=seed + start,
                                    sampler=sampler))
        seconds += time.perf_counter() - tic
    return outs, seconds


def measure(label, run, ckpt, spec, judge, args, drafter_name=None) -> dict:
    sampler = build_sampler(spec, ckpt.module.objective)
    timed_generate(ckpt.module, sampler, 1, 1, 8, 0)  # warm-up (allocations, first-call costs)
    outs, sec16 = timed_generate(ckpt.module, sampler, args.samples, args.batch, args.length, args.seed)
    stats = dict(getattr(sampler, "stats", None) or {})  # speculative: the batch call's acceptance, tokens/verification
    for _ in range(args.repeats - 1):  # the same samples again (seeded): the fastest time, less noise from a shared CPU
        sec16 = min(sec16, timed_generate(ckpt.module, sampler, args.samples, args.batch, args.length, args.seed)[1])
    texts, tokens = [], []
    for out in outs:
        for row, k in zip(out.tokens.tolist(), out.lengths.tolist()):
            tokens.append(row[:k])
            texts.append(ckpt.tokenizer.decode(row[:k], skip_special_tokens=True))
    nfe_rows = torch.cat([o.nfe_per_row().float() for o in outs])
    q = quality(Samples(texts, tokens, max(o.nfe for o in outs), sec16 / args.samples, float(nfe_rows.mean())), judge)
    sec1 = min(timed_generate(ckpt.module, sampler, args.batch1_samples, 1, args.length, args.seed)[1]
               for _ in range(args.repeats))
    # tokens of text delivered: each sample's length before its EOS (a sampler that stops at EOS is not
    # credited with the positions it skipped, nor one that decodes past it with tokens nobody reads)
    text_tokens = [max(1, len(t)) for t in tokens]
    positions = sum(o.positions or 0 for o in outs) / len(outs)  # per row of a batch
    row = {"label": label, "run": run, "sampler": spec, **q,
           "tokens_per_s_batch1": sum(text_tokens[: args.batch1_samples]) / sec1,
           f"tokens_per_s_batch{args.batch}": sum(text_tokens) / sec16,
           "positions_per_token": positions / args.length if positions else None,
           "acceptance_rate": stats.get("acceptance_rate"),
           "tokens_per_verification": stats.get("tokens_per_verification", 1.0 if spec["name"] == "ar" else None),
           "drafter": drafter_name}
    print(f"{label:42s} gen-PPL {q['gen_ppl']:8.2f}  H {q['entropy']:.3f}  NFE {q['nfe']:4d}  "
          f"pos/tok {row['positions_per_token'] or float('nan'):6.2f}  tok/s b1 {row['tokens_per_s_batch1']:8.1f}  "
          f"b{args.batch} {row[f'tokens_per_s_batch{args.batch}']:8.1f}"
          + (f"  accept {row['acceptance_rate']:.3f}  tok/verify {row['tokens_per_verification']:.2f}"
             if row["acceptance_rate"] is not None else ""), flush=True)
    return row


def markdown(rows, ref, args, meta) -> str:
    b = args.batch
    lines = [f"# Sampling: speed at the quality it reaches ({meta['date']})", "",
             f"{args.samples} unconditional samples × {args.length} tokens per row of the table, seed {args.seed}; "
             f"{meta['machine']}, torch {meta['torch']}, {meta['threads']} thread(s). Judge: {meta['judge']} "
             f"(real text: gen-PPL {ref.get('judge_ppl', float('nan')):.2f}, entropy {ref['entropy']:.3f} bits, "
             f"distinct-2 {ref['distinct_2']:.3f}). Models: {meta['models']}.", "",
             f"| sampler | gen-PPL | entropy (bits) | distinct-2 | mean length | NFE / sample | positions / token | tokens/s batch 1 | "
             f"tokens/s batch {b} | × AR batch {b} |", "|---|---|---|---|---|---|---|---|---|---|"]
    spec_cols = any(r.get("acceptance_rate") is not None for r in rows)
    if spec_cols:  # the hybrid suite: × AR at batch 1, acceptance, tokens per verification (target) pass
        lines[-2] += " × AR batch 1 | acceptance | tokens / verification pass | forwards / token | drafter |"
        lines[-1] += "---|---|---|---|---|"
    ar = next((r for r in rows if r["run"] == "ar" and r["sampler"]["name"] == "ar"), None)
    for r in rows:
        ratio = r[f"tokens_per_s_batch{b}"] / ar[f"tokens_per_s_batch{b}"] if ar else float("nan")
        pos = r["positions_per_token"]
        line = (f"| {r['label']} | {r['gen_ppl']:.2f} | {r['entropy']:.3f} | {r['distinct_2']:.3f} | "
                f"{r['mean_length']:.1f} | {r['nfe_per_sample']:.1f} | {'' if pos is None else f'{pos:.2f}'} | "
                f"{r['tokens_per_s_batch1']:.1f} | {r[f'tokens_per_s_batch{b}']:.1f} | {ratio:.2f}× |")
        if spec_cols:
            r1 = r["tokens_per_s_batch1"] / ar["tokens_per_s_batch1"] if ar else float("nan")
            acc, tpv = r.get("acceptance_rate"), r.get("tokens_per_verification")
            fwd = r["nfe_per_sample"] / max(r["mean_length"], 1e-9)  # every pass, drafter's and target's, per token
            line += (f" {r1:.2f}× | {'' if acc is None else f'{acc:.3f}'} | {'' if tpv is None else f'{tpv:.2f}'} | "
                     f"{fwd:.2f} | {r.get('drafter') or ''} |")
        lines.append(line)
    if ar:
        bar = ar["gen_ppl"] * 1.1
        lines += ["", f"**At AR's quality** (gen-PPL ≤ AR's {ar['gen_ppl']:.2f} × 1.1 = {bar:.2f}, entropy beside it):"]
        for key, name in (("tokens_per_s_batch1", "batch 1"), (f"tokens_per_s_batch{b}", f"batch {b}")):
            fit = [r for r in rows if r is not ar and r["gen_ppl"] <= bar]
            if not fit:
                lines.append(f"- {name}: no other sampler reaches the bar.")
                continue
            best = max(fit, key=lambda r: r[key])
            lines.append(f"- {name}: fastest within the bar is {best['label']} at {best[key]:.1f} tokens/s = "
                         f"{best[key] / ar[key]:.2f}× AR's {ar[key]:.1f} (gen-PPL {best['gen_ppl']:.2f}, "
                         f"entropy {best['entropy']:.3f} vs AR's {ar['entropy']:.3f}).")
    return "\n".join(lines) + "\n"


def plot(rows, ref, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for r in rows:
        marker = "*" if r["run"] == "ar" else ("s" if r["sampler"]["name"] == "block" else "o")
        ax.scatter(r["gen_ppl"], r[f"tokens_per_s_batch{args.batch}"], marker=marker, s=70)
        ax.annotate(r["label"], (r["gen_ppl"], r[f"tokens_per_s_batch{args.batch}"]), fontsize=7,
                    xytext=(4, 2), textcoords="offset points")
    if ref.get("judge_ppl"):
        ax.axvline(ref["judge_ppl"], ls="--", c="grey", lw=1, label="real text (judge)")
        ax.legend(loc="best", fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("gen-PPL under the AR judge (lower is better)")
    ax.set_ylabel(f"tokens/s at batch {args.batch}")
    ax.set_title("Sampling speed against quality (one run, same prompts and judge)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_draft(rows, args, path):
    """tokens/s against draft length, batch 1 and batch B, one line per speculative family; AR and the hybrid
    decoded as AR as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, title in ((axes[0], "tokens_per_s_batch1", "batch 1"),
                           (axes[1], f"tokens_per_s_batch{args.batch}", f"batch {args.batch}")):
        families: dict[str, list] = {}
        for r in rows:
            if r["sampler"]["name"] == "speculative":
                families.setdefault(r["label"].rsplit(" k=", 1)[0], []).append((r["sampler"]["draft_length"], r[key]))
            else:
                ax.axhline(r[key], ls="--" if r["run"] == "ar" else ":", lw=1.2, c="k" if r["run"] == "ar" else "grey",
                           label=r["label"])
        for fam, pts in families.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=fam)
        ax.set_xscale("log", base=2)
        ticks = sorted(set(DRAFTS + PREDRAFTS))
        ax.set_xticks(ticks, [str(k) for k in ticks])
        ax.set_xlabel("draft length k")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{title}, 1 CPU thread")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", required=True, help="folder with ar/ full/ block4/ block16/ runs")
    p.add_argument("--judge", required=True, help="an autoregressive diffuse checkpoint")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batch1-samples", type=int, default=4)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", default=None, help="comma-separated labels' substrings to run")
    p.add_argument("--out", default="experiments/bench")
    p.add_argument("--name", default="sampling")
    p.add_argument("--repeats", type=int, default=1, help="time each row this many times, keep the fastest")
    p.add_argument("--suite", default="default", choices=sorted(SUITES))
    p.add_argument("--plot-draft", default=None, help="PNG: tokens/s against draft length (speculative rows)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    judge_ckpt = load_checkpoint(args.judge, device, key="judge")
    judge = DiffuseJudge(judge_ckpt.module.eval(), judge_ckpt.tokenizer, args.judge)
    dm = heldout(judge_ckpt, dict(judge_ckpt.cfg.data), args.seed, tempfile.mkdtemp(prefix="bench-sampling-"))
    ref = reference(*real_snippets(dm.raw["validation"]["text"], judge_ckpt.tokenizer, args.samples, args.length), judge)
    print(f"judge on real text: gen-PPL {ref['judge_ppl']:.2f}, entropy {ref['entropy']:.3f}", flush=True)
    ckpts, rows, drafters = {}, [], {}
    for label, run, spec in SUITES[args.suite]:
        if args.only and not any(s in label for s in args.only.split(",")):
            continue
        path = Path(args.runs) / run / "checkpoints" / "last.ckpt"
        try:
            if run not in ckpts:
                ckpts[run] = load_checkpoint(str(path), device)
                ckpts[run].module.eval()
            spec, drafter_name = resolve_drafter(spec_for(spec, args.length), ckpts[run].module.objective,
                                                 Path(args.runs), drafters)
            rows.append(measure(label, run, ckpts[run], spec, judge, args, drafter_name))
        except Exception as err:  # a sampler option this tree lacks: say so, keep the rest of the table
            print(f"{label}: skipped ({type(err).__name__}: {err})", flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} CPU", "torch": torch.__version__,
            "threads": args.threads, "judge": args.judge,
            "models": ", ".join(f"{k}: {sum(p.numel() for p in v.module.backbone.parameters()) / 1e6:.2f}M params"
                                for k, v in ckpts.items())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for r in rows:  # a loaded drafter in the spec: its name in the JSON
        if "drafter" in r["sampler"]:
            r["sampler"] = {**r["sampler"], "drafter": r["drafter"]}
    (out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "reference": ref, "rows": rows,
                                                       "args": vars(args)}, indent=2, default=str))
    (out / f"{args.name}.md").write_text(markdown(rows, ref, args, meta))
    plot(rows, ref, args, out / f"{args.name}.png")
    if args.plot_draft:
        plot_draft(rows, args, args.plot_draft)
    print((out / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
