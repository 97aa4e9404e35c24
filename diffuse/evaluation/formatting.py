"""What the evaluation CLIs print, and the JSON they write (the same numbers)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from diffuse.core.io import write_text_atomic


def write_json(path: str | Path, obj) -> None:
    """Atomic; NaN/inf become null so the file is strict JSON."""
    write_text_atomic(path, json.dumps(_finite(obj), indent=2) + "\n")


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def num(x, fmt: str = ".4g") -> str:
    return "—" if x is None else format(x, fmt)


def format_likelihood(lk: dict) -> list[str]:
    lines = [f"likelihood ({lk['val/batches']} batches, {lk['val/tokens']:.0f} tokens, {lk['t_samples']} t-sample(s)):"]
    err = f" ± {num(lk['val/nelbo_stderr'], '.3g')}" if lk.get("val/nelbo_stderr") is not None else ""
    t_err = f" (t-noise ± {num(lk['val/nelbo_t_stderr'], '.3g')})" if lk.get("val/nelbo_t_stderr") else ""
    bpt_err = f" ± {num(lk['val/bpt_stderr'], '.3g')}" if lk.get("val/bpt_stderr") is not None else ""
    lines.append(f"  val/nelbo {num(lk['val/nelbo'])}{err} nats/token{t_err}   val/bpt {num(lk['val/bpt'])}{bpt_err}"
                 f"   val/ppl {num(lk['val/ppl'])}")
    if "val/accuracy" in lk:
        buckets = " · ".join(f"{b} {num(lk[f'val/accuracy_{b}'], '.3f')}" for b in ("low", "mid", "high")
                             if f"val/accuracy_{b}" in lk)
        lines.append(f"  accuracy {num(lk['val/accuracy'], '.3f')}" + (f" (by corruption: {buckets})" if buckets else "")
                     + f", confidence {num(lk.get('val/confidence'), '.3f')}")
    return lines


def format_points(points: list[dict], ref: dict | None) -> list[str]:
    head = f"  {'steps':>6} {'NFE':>5} {'alone':>6} {'gen-PPL':>9} {'entropy':>8} {'dist-1':>7} {'dist-2':>7} {'dist-3':>7} {'s/sample':>9}"
    lines = [head]
    for p in points:
        flag = "  ← degenerate" if p.get("degenerate") else ""
        lines.append(f"  {p['steps']:>6} {p['nfe']:>5} {p.get('nfe_per_sample', p['nfe']):>6.1f} {num(p['gen_ppl']):>9} {p['entropy']:>8.3f} {p['distinct_1']:>7.3f} "
                     f"{p['distinct_2']:>7.3f} {p['distinct_3']:>7.3f} {p['seconds_per_sample']:>9.4f}{flag}")
    if ref:
        lines.append(f"  {'real':>6} {'':>5} {'':>6} {num(ref.get('judge_ppl')):>9} {ref['entropy']:>8.3f} {ref['distinct_1']:>7.3f} "
                     f"{ref['distinct_2']:>7.3f} {ref['distinct_3']:>7.3f}   (judge on {ref['snippets']} pieces of held-out text"
                     + (f", {num(ref.get('judge_bpt'))} bits/token)" if ref.get("judge_bpt") is not None else ")"))
    return lines


def format_result(r: dict) -> str:
    lines = [f"checkpoint {r['ckpt']} ({r['objective']}), seed {r['seed']}: {r.get('data_description', '')}"]
    if "likelihood" in r:
        lines += format_likelihood(r["likelihood"])
    if "sweep" in r:
        q = r["quality"]
        lines.append(f"samples ({len(r['samples'])} × {q['mean_length']:.1f} tokens on average, sampler {q['sampler']}, "
                     f"judge: {r['judge'] or 'none'}); entropy in bits per sample:")
        lines += format_points(r["sweep"], r.get("reference"))
        for i, s in enumerate(r["samples"][:2]):
            lines.append(f"  sample {i}: {s['text'][:200]!r}")
    lines += [f"note: {n}" for n in r.get("notes", [])]
    return "\n".join(lines)
