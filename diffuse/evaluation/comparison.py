"""Two checkpoints side by side: training budget, likelihood, sample speed, steps-vs-quality and the
speedup of B over A, rendered as `comparison.md` (the numbers also go to `comparison.json`)."""

from __future__ import annotations

from diffuse.evaluation.formatting import num
from diffuse.run.checkpoint import read_checkpoint, stored_config


def training_budget(ckpt_path: str) -> dict:
    """Tokens seen in training: global_step × batch_size × seq_len × gradient accumulation (padding
    included; one device assumed — multiply by the world size for multi-GPU runs)."""
    ckpt = read_checkpoint(ckpt_path, "ckpt", mmap=True)  # weights_only, like every load; mmap: no tensor is read
    cfg = stored_config(ckpt)
    data, trainer = cfg.get("data", {}), cfg.get("trainer", {})
    step = int(ckpt.get("global_step", 0))
    batch, seq_len = int(data.get("batch_size", 0)), int(data.get("seq_len", 0))
    accumulate = int(trainer.get("accumulate_grad_batches", 1) or 1)
    return {"global_step": step, "batch_size": batch, "seq_len": seq_len, "accumulate_grad_batches": accumulate,
            "tokens": step * batch * seq_len * accumulate}


def point_at(points: list[dict], steps) -> dict | None:
    return next((p for p in points if p["steps"] == steps), None)


def render_markdown(c: dict) -> str:
    a, b, s = c["a"], c["b"], c["speedup"]
    la, lb = a.get("likelihood", {}), b.get("likelihood", {})
    qa = point_at(a.get("sweep", []), s.get("reference_steps")) or a.get("quality") or {}
    qb = point_at(b.get("sweep", []), s.get("b_steps")) or b.get("quality") or {}

    def bpt(lk):
        if not lk:
            return "—"
        se = lk.get("val/bpt_stderr")
        return f"{num(lk['val/bpt'])}" + (f" ± {num(se, '.2g')}" if se is not None else "")

    def budget(x):
        t = x["budget"]
        return f"{t['tokens']:,} ({t['global_step']} steps × {t['batch_size']} × {t['seq_len']}" + (
            f" × {t['accumulate_grad_batches']}" if t["accumulate_grad_batches"] > 1 else "") + ")"

    rows = [
        ("checkpoint", f"`{a['ckpt']}`", f"`{b['ckpt']}`"),
        ("objective", a["objective"], b["objective"]),
        ("training tokens", budget(a), budget(b)),
        ("val bits/token (± s.e.)", bpt(la), bpt(lb)),
        ("sampler", qa.get("sampler", "—"), qb.get("sampler", "—")),
        ("steps shown (NFE)", f"{qa.get('steps', '—')} ({qa.get('nfe', '—')})", f"{qb.get('steps', '—')} ({qb.get('nfe', '—')})"),
        ("gen-PPL", num(qa.get("gen_ppl")), num(qb.get("gen_ppl"))),
        ("entropy (bits)", num(qa.get("entropy"), ".3f"), num(qb.get("entropy"), ".3f")),
        ("seconds / sample", num(qa.get("seconds_per_sample"), ".4f"), num(qb.get("seconds_per_sample"), ".4f")),
    ]
    lines = [f"# Comparison: A = {a['objective']} vs B = {b['objective']}", "",
             f"Judge: {c['judge'] or 'none'}; {c['settings']['num_samples']} samples of {c['settings']['length']} "
             f"tokens per point, the same seeds for both; data: {a.get('data_description', '')}.", "",
             "| | A | B |", "|---|---|---|"]
    lines += [f"| {k} | {x} | {y} |" for k, x, y in rows]
    lines += ["", "## Speedup", "", speedup_sentence(s), "",
              f"The bar is A's gen-PPL at its reference step count × (1 + tolerance), tolerance = {s['tolerance']}. "
              "Each model's cost is the fewest steps at which it clears the bar, so A compared with itself gives 1; "
              "a \"win\" at lower entropy is repetition, not quality.", "",
              "## Steps vs quality", "", "NFE: passes of the batch; alone: the mean passes of a sample decoded by itself "
              "(below NFE for adaptive samplers, whose batch waits for its slowest row).", "",
              "| model | steps | NFE | alone | gen-PPL | entropy | distinct-2 | s / sample |",
              "|---|---|---|---|---|---|---|---|"]
    for name, r in (("A", a), ("B", b)):
        for p in r.get("sweep", []):
            lines.append(f"| {name} | {p['steps']} | {p['nfe']} | {p.get('nfe_per_sample', p['nfe']):.1f} | {num(p['gen_ppl'])} | {p['entropy']:.3f} | "
                         f"{p['distinct_2']:.3f} | {p['seconds_per_sample']:.4f} |")
    ref = a.get("reference")
    if ref:
        lines.append(f"| real text | | | | {num(ref.get('judge_ppl'))} | {ref['entropy']:.3f} | {ref['distinct_2']:.3f} | |")
    lines += ["", "![steps vs quality](comparison.png)"]
    lines += ["", *[f"- note: {n}" for n in c.get("notes", [])]] if c.get("notes") else []
    return "\n".join(lines) + "\n"


def speedup_sentence(s: dict) -> str:
    if not s.get("found"):
        return f"No speedup measured: {s.get('reason', 'B did not reach the bar')}."
    text = (f"B reaches A's gen-PPL {num(s['reference_gen_ppl'])} (at {s['reference_steps']} steps; bar "
            f"{num(s['bar_gen_ppl'])}) in **{s['b_steps']} steps** where A needs {s['a_steps']}: step speedup "
            f"**{num(s['step_speedup'], '.3g')}×** (vs A's reference steps: {num(s['step_speedup_vs_reference'], '.3g')}×; "
            f"NFE {num(s['nfe_speedup'], '.3g')}×; wall-clock {num(s['wall_speedup'], '.3g')}×). "
            f"Entropy there: A {s['a_entropy']:.3f}, B {s['b_entropy']:.3f} bits.")
    if s.get("b_less_diverse"):
        text += " **Caution: B's samples are less diverse than A's at that point.**"
    return text
