"""Steps-vs-quality: sample at several step counts, score each, plot the curves; and the speedup search.

The speedup is measured at a quality bar, not at a step count: A's gen-PPL at its reference steps,
loosened by a relative `tolerance` (default 5%: gen-PPL of 8–32 samples moves by a few percent between
seeds), is the bar. Each model's cost is the fewest steps at which it clears the bar, and the step
speedup is A's cost / B's cost. Measuring A at the same bar means a baseline given more reference
steps than it needs is not over-credited, and A compared with itself gives exactly 1. The naive
ratio `reference steps / B's steps` is reported beside it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from diffuse.contracts import is_autoregressive
from diffuse.errors import DiffuseError
from diffuse.evaluation.quality import Samples, generate, quality
from diffuse.run.build import build_sampler


def sweep(module, sampler_spec: dict, steps: list[int], tokenizer, judge, num_samples: int, length: int,
          batch_size: int, seed: int, track: Callable | None = None) -> tuple[list[dict], Samples]:
    """One quality point per step count (autoregressive models: one point, steps = NFE = length).
    Every point uses the same seeds, so the curves differ only by the step count."""
    objective = module.objective
    if is_autoregressive(objective):
        steps = [None]
    for s in steps:
        if s is not None and int(s) <= 0:
            raise DiffuseError(f"steps={steps} must be positive integers")
    # warm-up: the first call pays for allocation and kernel selection; keep it out of the timings
    warm_spec = dict(sampler_spec, steps=int(min(steps))) if steps[0] is not None else dict(sampler_spec)
    warm = build_sampler(warm_spec, objective)
    module.generate([[]], min(length, 8), seed=seed, sampler=warm)

    points, samples = [], None
    items = track(steps, total=len(steps), description="sampling") if track else steps
    for s in items:
        spec = dict(sampler_spec, **({"steps": int(s)} if s is not None else {}))
        sampler = build_sampler(spec, objective)
        samples = generate(module, sampler, tokenizer, num_samples, length, batch_size, seed)
        point = quality(samples, judge)
        point["steps"] = int(s) if s is not None else samples.nfe
        point["sampler"] = sampler.registry_name
        points.append(point)
    return points, samples


def speedup(a: list[dict], b: list[dict], reference_steps: int | None = None, tolerance: float = 0.05) -> dict:
    """The fewest steps at which B reaches A's reference gen-PPL (within `tolerance`), and the
    resulting speedups. `a`, `b`: sweep points (dicts with steps, nfe, gen_ppl, entropy, seconds_per_sample)."""
    if tolerance < 0:
        raise DiffuseError(f"tolerance={tolerance} must be ≥ 0")
    a, b = sorted(a, key=lambda p: p["steps"]), sorted(b, key=lambda p: p["steps"])
    if reference_steps is None:
        ref = a[-1]
    else:
        ref = next((p for p in a if p["steps"] == int(reference_steps)), None)
        if ref is None:
            raise DiffuseError(f"reference_steps={reference_steps} is not among A's steps {[p['steps'] for p in a]}")
    out = {"reference_steps": ref["steps"], "reference_gen_ppl": ref.get("gen_ppl"), "tolerance": tolerance}
    if ref.get("gen_ppl") is None or any(p.get("gen_ppl") is None for p in b):
        return {**out, "found": False, "reason": "no gen-PPL (no judge)"}
    bar = ref["gen_ppl"] * (1.0 + tolerance)
    cost_a = next(p for p in a if p["gen_ppl"] <= bar)  # exists: the reference itself clears the bar
    cost_b = next((p for p in b if p["gen_ppl"] <= bar), None)
    out.update({"bar_gen_ppl": bar, "a_steps": cost_a["steps"], "a_entropy": cost_a["entropy"]})
    if cost_b is None:
        best = min(b, key=lambda p: p["gen_ppl"])
        return {**out, "found": False, "reason": f"B never reaches gen-PPL {bar:.4g} (best {best['gen_ppl']:.4g} "
                f"at {best['steps']} steps)"}
    ratio = lambda x, y: x / y if y else None  # noqa: E731
    out.update({
        "found": True,
        "b_steps": cost_b["steps"],
        "b_gen_ppl": cost_b["gen_ppl"],
        "b_entropy": cost_b["entropy"],
        "step_speedup": ratio(cost_a["steps"], cost_b["steps"]),
        "step_speedup_vs_reference": ratio(ref["steps"], cost_b["steps"]),
        "nfe_speedup": ratio(cost_a["nfe"], cost_b["nfe"]),
        "wall_speedup": ratio(cost_a["seconds_per_sample"], cost_b["seconds_per_sample"]),
        # a "win" at lower entropy is repetition, not quality (gen-PPL rewards it): say so beside the number
        "b_less_diverse": cost_b["entropy"] < cost_a["entropy"] * (1.0 - tolerance),
    })
    return out


def plot_curves(curves: dict[str, list[dict]], path: str | Path, reference: dict | None = None,
                title: str = "steps vs quality", xlabel: str = "sampling steps (AR: NFE)") -> Path:
    """Gen-PPL, entropy and seconds per sample against steps, one line per label; real text dashed."""
    import matplotlib  # local: heavy, and the Agg backend must be chosen before pyplot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("gen_ppl", "gen-PPL (judge)", "judge_ppl"), ("entropy", "unigram entropy (bits)", "entropy"),
              ("seconds_per_sample", "seconds / sample", None))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, label, ref_key) in zip(axes, panels):
        for name, points in curves.items():
            pts = sorted((p["steps"], p[key]) for p in points if p.get(key) is not None)
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", label=name)
        if reference and ref_key and reference.get(ref_key) is not None:
            ax.axhline(reference[ref_key], ls="--", c="gray", label="real text")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        if not ax.lines:
            ax.text(0.5, 0.5, "no judge: gen-PPL skipped", ha="center", va="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
