"""The few-step study's table and plot from the eval.json files of run.sh (argv: runs dir, results dir).

One row per (model, sampler setting): steps, forward passes per sample, gen-PPL under the AR judge beside
unigram entropy and distinct-2, tokens/s (64-byte samples in batches of 64, every thread, one model at a
time), held-out bits/byte; the judge's real-text line; each family's speedup against the teacher by
diffuse.compare's rule (diffuse.evaluation.sweep.speedup: bar = the teacher's gen-PPL at 64 steps × 1.05);
the study's target (a student at ≤ 8 steps within 5 % of the teacher's gen-PPL at 64 and 0.1 bit of its
entropy); and tokens/s against AR with its KV cache at AR's quality (gen-PPL ≤ AR's × 1.05).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from diffuse.evaluation.sweep import plot_curves, speedup

TOLERANCE = 0.05
FAMILIES = [  # (label, eval dirs, training beyond the teacher)
    ("teacher (plain, ancestral)", ["teacher"], "—"),
    *[(f"SDTT round {r} (student of {64 >> (r - 1)} → {64 >> r} steps)", [f"sdtt_round{r}"], f"{r} × distill steps")
      for r in (1, 2, 3, 4)],
    ("seed regularizer=cdlm_consistency (fine-tuned teacher)", ["seed_regularizer"], "distill steps"),
    ("control: teacher fine-tuned plainly", ["teacher_more"], "distill steps"),
    ("CDLM student (block 8, exact cache)", ["cdlm", "cdlm_threshold0.5", "cdlm_threshold0.7", "cdlm_threshold0.9"],
     "distill steps"),
    ("AR (KV cache)", ["ar"], "—"),
]


def load(root: Path, name: str) -> dict | None:
    path = root / "eval" / name / "eval.json"
    return json.loads(path.read_text()) if path.is_file() else None


def tokens_per_sec(point: dict, length: int) -> float:
    return length / point["seconds_per_sample"]


def main(root: Path, out: Path, length: int = 64) -> None:
    out.mkdir(parents=True, exist_ok=True)
    evals = {name: load(root, name) for _, names, _ in FAMILIES for name in names}
    missing = [n for n, e in evals.items() if e is None]
    teacher, ar = evals["teacher"], evals["ar"]
    ref = teacher["reference"]
    lines = ["| model | sampler | steps | NFE / sample | gen-PPL | entropy (bits) | distinct-2 | tokens/s | "
             "held-out bits/byte | extra training |", "|---|---|---|---|---|---|---|---|---|---|"]
    curves: dict[str, list[dict]] = {}
    for label, names, extra in FAMILIES:
        for name in names:
            e = evals[name]
            if e is None:
                continue
            bpt = (e.get("likelihood") or {}).get("val/bpt")
            for p in e["sweep"]:
                sampler = p["sampler"] + (f" τ={name.split('threshold')[1]}" if "threshold" in name else "")
                lines.append(f"| {label} | {sampler} | {p['steps']} | {p['nfe_per_sample']:.1f} | {p['gen_ppl']:.2f} | "
                             f"{p['entropy']:.3f} | {p['distinct_2']:.3f} | {tokens_per_sec(p, length):.0f} | "
                             f"{'' if bpt is None else f'{bpt:.3f}'} | {extra} |")
                # the plot's x axis: forward passes per sample (a CDLM pass runs one block of 8 on the cache)
                curves.setdefault(label, []).append({**p, "steps": max(1, round(p["nfe_per_sample"]))})
    lines.append(f"| real held-out text (judge's line) | | | | {ref['judge_ppl']:.2f} | {ref['entropy']:.3f} | "
                 f"{ref.get('distinct_2', float('nan')):.3f} | | | |")

    # speedups by diffuse.compare's rule, against the teacher's 64-step point
    found = ["", "## Speedup against the teacher (diffuse.compare's rule: bar = teacher gen-PPL at 64 steps × 1.05)", "",
             "| family | fewest steps clearing the bar | its gen-PPL | its entropy | step speedup | wall-clock speedup |",
             "|---|---|---|---|---|---|"]
    for label, names, _ in FAMILIES[1:-2]:
        e = evals[names[0]]
        if e is None:
            continue
        s = speedup(teacher["sweep"], e["sweep"], 64, TOLERANCE)
        if s["found"]:
            found.append(f"| {label} | {s['b_steps']} | {s['b_gen_ppl']:.2f} | {s['b_entropy']:.3f} | "
                         f"{s['step_speedup']:.2f}× | {s['wall_speedup']:.2f}× |")
        else:
            found.append(f"| {label} | never | | | — ({s['reason']}) | |")

    # the study's target: a student at ≤ 8 steps within 5 % gen-PPL and 0.1 bit entropy of the teacher at 64
    t64 = next(p for p in teacher["sweep"] if p["steps"] == 64)
    target = ["", f"## Target: ≤ 8 steps, gen-PPL ≤ {t64['gen_ppl'] * (1 + TOLERANCE):.2f} (teacher at 64: "
              f"{t64['gen_ppl']:.2f}), entropy within 0.1 bit of {t64['entropy']:.3f}", ""]
    met = []
    for label, names, _ in FAMILIES[1:-1]:
        for name in names:
            for p in (evals[name] or {}).get("sweep", []):
                if round(p["nfe_per_sample"]) <= 8 or p["steps"] <= 8 and "cdlm" not in name:
                    ok = p["gen_ppl"] <= t64["gen_ppl"] * (1 + TOLERANCE) and abs(p["entropy"] - t64["entropy"]) <= 0.1
                    if ok:
                        met.append(f"- met: {label}, {p['steps']} steps ({p['nfe_per_sample']:.1f} passes): gen-PPL "
                                   f"{p['gen_ppl']:.2f}, entropy {p['entropy']:.3f}")
    target += met or ["- **not met** by any student at ≤ 8 steps (table above)"]
    for p in teacher["sweep"]:  # the bar is only worth something if the teacher itself misses it at few steps
        if p["steps"] <= 8:
            ok = p["gen_ppl"] <= t64["gen_ppl"] * (1 + TOLERANCE) and abs(p["entropy"] - t64["entropy"]) <= 0.1
            target.append(f"- for scale, the teacher itself at {p['steps']} steps: gen-PPL {p['gen_ppl']:.2f}, entropy "
                          f"{p['entropy']:.3f} ({'meets' if ok else 'misses'} the bar)")

    # tokens/s against AR with its KV cache at AR's quality
    a = ar["sweep"][0]
    bar = a["gen_ppl"] * (1 + TOLERANCE)
    vs_ar = ["", f"## Against AR with its KV cache at AR's quality (gen-PPL ≤ {bar:.2f}; AR {a['gen_ppl']:.2f}, "
             f"{tokens_per_sec(a, length):.0f} tokens/s)", ""]
    for label, names, _ in FAMILIES[:-1]:
        pts = [p for n in names for p in (evals[n] or {}).get("sweep", []) if p["gen_ppl"] <= bar]
        if pts:
            best = max(pts, key=lambda p: tokens_per_sec(p, length))
            vs_ar.append(f"- {label}: {tokens_per_sec(best, length):.0f} tokens/s at {best['steps']} steps "
                         f"({tokens_per_sec(best, length) / tokens_per_sec(a, length):.2f}× AR)")
        else:
            best = min((p for n in names for p in (evals[n] or {}).get("sweep", [])), key=lambda p: p["gen_ppl"],
                       default=None)
            vs_ar.append(f"- {label}: never reaches AR's quality" +
                         (f" (best gen-PPL {best['gen_ppl']:.2f} at {best['steps']} steps)" if best else ""))

    notes = [f"", f"missing evaluations: {', '.join(missing)}"] if missing else []
    text = "\n".join(lines + found + target + vs_ar + notes) + "\n"
    (out / "table.md").write_text(text)
    print(text)
    plot_curves(curves, out / "steps_vs_quality.png", ref, title="few-step families: forward passes per sample vs quality",
                xlabel="forward passes per sample (mean)")
    summary = {k: {key: v.get(key) for key in ("likelihood", "sweep", "reference")} for k, v in evals.items() if v}
    (out / "table.json").write_text(json.dumps(summary, indent=1, default=str))
    with open(out / "samples.md", "w") as f:  # what the numbers read like: two samples per model
        for name, e in evals.items():
            if e:
                f.write(f"## {name} ({e['sweep'][-1]['sampler']}, {e['sweep'][-1]['steps']} steps)\n\n")
                f.write("".join(f"```\n{s['text']}\n```\n" for s in e["samples"][:2]) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
