"""uniform.sh's table, plot and samples from its eval.json files (argv: runs dir, results dir).

One table: masked vs uniform-state teachers (nelbo, ce, self-conditioned), the commit rules on each
(masked: ancestral, threshold τ, eb γ; uniform: uniform_ancestral, entropy_bound γ), SDTT rounds on the masked
teacher and DCD rounds on the uniform one; gen-PPL under the AR judge beside entropy, distinct-2, passes per
sample and tokens/s. Then each distillation's speedup by diffuse.compare's rule and the issue's target: a
uniform-state student at ≤ 8 steps within 5 % gen-PPL and 0.1 bit entropy of its teacher at 64 steps.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from diffuse.evaluation.sweep import speedup

TOLERANCE, ENTROPY_GAP, LENGTH = 0.05, 0.1, 64
ROUNDS = (1, 2, 3)
ROWS = [  # (eval dir, model, extra training beyond its 800 steps)
    ("masked", "masked teacher", "—"),
    *[(f"masked_threshold{tau}", "masked teacher", "—") for tau in ("0.3", "0.5", "0.9")],
    *[(f"masked_eb{g}", "masked teacher", "—") for g in ("0.01", "0.1", "1.0", "4.0", "16.0")],
    *[(f"sdtt_round{r}", f"SDTT round {r} (→ {64 >> r} steps)", f"{r} × distill") for r in ROUNDS],
    ("uniform", "uniform (nelbo)", "—"),
    *[(f"uniform_eb{g}", "uniform (nelbo)", "—") for g in ("0.1", "1.0", "4.0")],
    ("uniform_ce", "uniform (ce)", "—"),
    ("uniform_sc", "uniform (nelbo) + self-cond.", "—"),
    ("uniform_sc_eb0.1", "uniform (nelbo) + self-cond.", "—"),
    *[(f"dcd_round{r}", f"DCD round {r} (→ {64 >> r} steps)", f"{r} × distill") for r in ROUNDS],
    # both teachers continued LONG_STEPS more steps (uniform.sh), and DCD on the longer uniform teacher
    ("masked_long", "masked teacher, continued", "+1600 steps"),
    ("uniform_long", "uniform (nelbo), continued", "+1600 steps"),
    ("uniform_long_eb1.0", "uniform (nelbo), continued", "+1600 steps"),
    *[(f"dcd_long_round{r}", f"DCD round {r} on the continued uniform (→ {64 >> r} steps)", f"+1600, {r} × distill")
      for r in ROUNDS],
]
KNOB = {"threshold": "τ", "eb": "γ"}  # eval dir suffix → the knob it sets


def load(root: Path, name: str) -> dict | None:
    path = root / "eval" / name / "eval.json"
    return json.loads(path.read_text()) if path.is_file() else None


def sampler_label(name: str, point: dict) -> str:
    for suffix, knob in KNOB.items():
        if suffix in name:
            return f"{point['sampler']} {knob}={name.split(suffix)[1]}"
    return point["sampler"]


def meets(p: dict, ref: dict) -> bool:
    return p["gen_ppl"] <= ref["gen_ppl"] * (1 + TOLERANCE) and abs(p["entropy"] - ref["entropy"]) <= ENTROPY_GAP


def at(e: dict | None, steps: int) -> dict | None:
    return next((p for p in (e or {}).get("sweep", []) if p["steps"] == steps), None)


def plot(curves: dict[str, list[dict]], ref: dict, path: Path) -> None:
    """gen-PPL (log) and entropy against passes per sample: sweeps as lines, single commit-rule runs as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    for ax, key, ylabel in ((axes[0], "gen_ppl", "gen-PPL under the AR judge (log)"),
                            (axes[1], "entropy", "unigram entropy (bits)")):
        for i, (label, points) in enumerate(curves.items()):
            xs, ys = zip(*sorted((p["steps"], p[key]) for p in points))
            style = {"marker": "o"} if len(xs) > 1 else {"marker": "*", "markersize": 11, "ls": ""}
            ax.plot(xs, ys, label=label, color=plt.cm.tab20(i % 20), **style)
        ax.axhline(ref["judge_ppl" if key == "gen_ppl" else "entropy"], ls="--", c="gray", label="real text")
        ax.set(xscale="log", xlabel="forward passes per sample (mean)", ylabel=ylabel)
        if key == "gen_ppl":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("masked vs uniform-state diffusion, 0.89 M params: passes per sample vs quality (32 × 64 bytes a point)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(root: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    evals = {name: load(root, name) for name, _, _ in ROWS}
    ref = next(e["reference"] for e in evals.values() if e)
    lines = [("| model | sampler | steps (cap) | passes / sample | gen-PPL | entropy (bits) | distinct-2 | tokens/s | "
             "held-out bits/byte | extra training |"), "|---|---|---|---|---|---|---|---|---|---|"]
    curves: dict[str, list[dict]] = {}
    for name, model, extra in ROWS:
        e = evals[name]
        if e is None:
            continue
        bpt = (e.get("likelihood") or {}).get("val/bpt")
        for p in e["sweep"]:
            label = sampler_label(name, p)
            lines.append(f"| {model} | {label} | {p['steps']} | {p['nfe_per_sample']:.1f} | {p['gen_ppl']:.2f} | "
                         f"{p['entropy']:.3f} | {p['distinct_2']:.3f} | {LENGTH / p['seconds_per_sample']:.0f} | "
                         f"{'' if bpt is None else f'{bpt:.3f}'} | {extra} |")
            # the plot's x axis: forward passes per sample (adaptive samplers stop early)
            curves.setdefault(f"{model}, {label.split(' ')[0] if '=' not in label else label}", []).append(
                {**p, "steps": max(1, round(p["nfe_per_sample"]))})
    lines.append(f"| real held-out text (judge's line) | | | | {ref['judge_ppl']:.2f} | {ref['entropy']:.3f} | "
                 f"{ref.get('distinct_2', float('nan')):.3f} | | | |")

    # each distillation against its own teacher, by diffuse.compare's rule and by the target
    found = ["", "## Students against their own teacher at 64 steps", "",
             ("| student | teacher at 64: gen-PPL / entropy | compare's rule: fewest steps ≤ bar | "
             "≤ 8 steps within 5 % gen-PPL and 0.1 bit? |"), "|---|---|---|---|"]
    for teacher, family in (("masked", "sdtt"), ("uniform", "dcd"), ("uniform_long", "dcd_long")):
        t64 = at(evals[teacher], 64)
        if t64 is None:
            continue
        # the bar means something only if the teacher itself misses it at few steps
        own = "; ".join(f"{p['steps']} steps: {p['gen_ppl']:.2f} / {p['entropy']:.3f} "
                        f"{'**met**' if meets(p, t64) else 'missed'}" for p in evals[teacher]["sweep"] if p["steps"] <= 8)
        found.append(f"| the teacher itself ({teacher}) | {t64['gen_ppl']:.2f} / {t64['entropy']:.3f} | | {own} |")
        for r in ROUNDS:
            e = evals[f"{family}_round{r}"]
            if e is None:
                continue
            s = speedup(evals[teacher]["sweep"], e["sweep"], 64, TOLERANCE)
            rule = f"{s['b_steps']} steps ({s['step_speedup']:.2f}×)" if s["found"] else f"never ({s['reason']})"
            few = [p for p in e["sweep"] if p["steps"] <= 8]
            verdict = "; ".join(f"{p['steps']} steps: {p['gen_ppl']:.2f} / {p['entropy']:.3f} "
                                f"{'**met**' if meets(p, t64) else 'missed'}" for p in few)
            found.append(f"| {family.upper().replace('_LONG', ' (continued teacher)')} round {r} | {t64['gen_ppl']:.2f} / {t64['entropy']:.3f} | {rule} | "
                         f"{verdict} |")

    # the same sweeps pivoted: gen-PPL (entropy) per step count, one line per model
    grid = (4, 8, 16, 32, 64)
    pivot = ["", "## gen-PPL (entropy, bits) by sampling steps", "",
             "| model | " + " | ".join(str(n) for n in grid) + " | held-out bits/byte |", "|---|" + "---|" * (len(grid) + 1)]
    for name, model, _ in ROWS:
        e = evals[name]
        if e is None or len(e["sweep"]) < len(grid):
            continue
        cells = [f"{p['gen_ppl']:.1f} ({p['entropy']:.2f})" if (p := at(e, n)) else "" for n in grid]
        pivot.append(f"| {model} ({e['sweep'][0]['sampler']}) | " + " | ".join(cells) +
                     f" | {e['likelihood']['val/bpt']:.3f} |")

    missing = [n for n, e in evals.items() if e is None]
    notes = ["", f"missing evaluations: {', '.join(missing)}"] if missing else []
    text = "\n".join(lines + pivot + found + notes) + "\n"
    (out / "table.md").write_text(text)
    print(text)
    plot(curves, ref, out / "steps_vs_quality.png")
    summary = {k: {key: v.get(key) for key in ("likelihood", "sweep", "reference")} for k, v in evals.items() if v}
    (out / "table.json").write_text(json.dumps(summary, indent=1, default=str))
    with open(out / "samples.md", "w") as f:  # what the numbers read like: two samples per evaluation
        for name, e in evals.items():
            if e:
                last = e["sweep"][-1]
                f.write(f"## {name} ({sampler_label(name, last)}, {last['steps']} steps)\n\n")
                f.write("".join(f"```\n{s['text']}\n```\n" for s in e["samples"][:2]) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
