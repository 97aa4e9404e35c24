"""A recorded trajectory (sampling/trace.py) drawn as HTML: one renderer for the demo's live canvas and the page
`diffuse.sample trace=out.html` writes (replay_gif.py draws the same cells as an animated picture).

Each generated position is a cell: its token coloured by the step it was committed at (blue early → red late),
[MASK] as a grey box, a renoised position hatched, a token written on this very step outlined, a position
committed more than once (a revision) underlined. Hovering a cell shows its step, confidence and entropy.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from diffuse.sampling.trace import Step

CSS = """
.dl-canvas{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:15px;line-height:1.9;white-space:pre-wrap;
  word-break:break-word;padding:10px;border:1px solid #ccc;border-radius:6px;background:#fff;color:#111}
.dl-canvas span{border-radius:3px;padding:1px 0}
.dl-prompt{color:#777}
.dl-mask{background:#d0d0d0;color:#d0d0d0}
.dl-noise{background:repeating-linear-gradient(45deg,#eee,#eee 3px,#bbb 3px,#bbb 6px)}
.dl-new{outline:2px solid #111}
.dl-revised{text-decoration:underline wavy #c00}
.dl-eos{color:#999;font-size:11px}
.dl-stats{font-family:sans-serif;font-size:13px;color:#444;margin:6px 0}
"""
MASK_GLYPH = "▒"


@dataclass
class Cell:
    text: str
    kind: str  # token | mask | noise | eos | blank
    step: int  # the step that last committed it (−1: never)
    new: bool  # written on this step
    revised: bool  # committed more than once so far
    confidence: float
    entropy: float


def colour(step: int, n_steps: int) -> str:
    """Blue for the first step → red for the last (hue 230 → 0)."""
    frac = step / max(n_steps - 1, 1)
    return f"hsl({230 - 230 * frac:.0f},75%,82%)"


def cells(steps: Sequence[Step], row: int, token: Callable[[int], str], special, upto: int | None = None) -> list[Cell]:
    """Row `row`'s canvas after step `upto` (default: the last), one Cell per generated position."""
    upto = len(steps) - 1 if upto is None else upto
    if upto < 0:
        return []
    seen = steps[: upto + 1]
    committed = torch.stack([s.committed[row] for s in seen])  # [n, L]
    index = torch.arange(len(seen))[:, None]
    last = torch.where(committed, index, -1).max(0).values
    unmasked = torch.where(torch.stack([s.remasked[row] for s in seen]), index, -1).max(0).values
    at = torch.where(unmasked >= last, -1, last)  # a position remasked after its commit is not committed
    times = committed.sum(0)

    def at_commit(field):  # the value the step that committed each position gave it
        vals = torch.stack([s.confidence[row] if field == "c" and s.confidence is not None else
                            s.entropy[row] if field == "e" and s.entropy is not None else
                            torch.full_like(s.canvas[row], math.nan, dtype=torch.float32) for s in seen])
        return vals.gather(0, at.clamp_min(0)[None])[0].masked_fill(at < 0, math.nan).tolist()

    conf, ent = at_commit("c"), at_commit("e")
    now = steps[upto]
    new, renoised, at, times = now.committed[row].tolist(), now.renoised[row].tolist(), at.tolist(), times.tolist()
    out = []
    for j, tok in enumerate(now.canvas[row].tolist()):
        kind = ("mask" if tok == special.mask else "blank" if tok in (special.pad, special.bos)
                else "eos" if tok == special.eos else "noise" if renoised[j] and at[j] < 0 else "token")
        text = MASK_GLYPH if kind == "mask" else "⏎" if kind == "eos" else "" if kind == "blank" else token(tok)
        out.append(Cell(text, kind, at[j], new[j], times[j] > 1, conf[j], ent[j]))
    return out


def canvas_html(steps: Sequence[Step], row: int, token: Callable[[int], str], special, prompt: str = "",
                upto: int | None = None, n_steps: int | None = None) -> str:
    """The canvas after step `upto` as one <div>; colours span `n_steps` (default: the steps given)."""
    n_steps = n_steps or len(steps)
    parts = [f'<span class="dl-prompt">{html.escape(prompt)}</span>'] if prompt else []
    for c in cells(steps, row, token, special, upto):
        if c.kind == "blank":
            continue
        classes = [f"dl-{c.kind}"] if c.kind in ("mask", "noise", "eos") else []
        classes += ["dl-new"] * c.new + ["dl-revised"] * c.revised
        style = f' style="background:{colour(c.step, n_steps)}"' if c.kind == "token" and c.step >= 0 else ""
        tip = f"step {c.step}" + (f", p={c.confidence:.2f}" if not math.isnan(c.confidence) else "") + (
            f", H={c.entropy:.2f} nats" if not math.isnan(c.entropy) else "")
        parts.append(f'<span class="{" ".join(classes)}"{style} title="{tip}">{html.escape(c.text)}</span>')
    return f'<div class="dl-canvas">{"".join(parts)}</div>'


def written(step: Step, special, rows: Sequence[int] | None = None) -> int:
    """Tokens on the canvas (neither [MASK] nor padding) after `step`, over `rows` (default: all)."""
    canvas = step.canvas if rows is None else step.canvas[list(rows)]
    return int(((canvas != special.mask) & (canvas != special.pad)).sum())


def stats_line(steps: Sequence[Step], upto: int, special, rows: Sequence[int] | None = None,
               seconds: float | None = None) -> str:
    """Step, NFE, tokens per forward pass (per row) so far; tokens/s when `seconds` (the whole run) is given."""
    s, n_rows = steps[upto], len(rows) if rows is not None else steps[upto].canvas.shape[0]
    tokens = written(s, special, rows)
    bits = [f"step {upto + 1}/{len(steps)}", f"NFE {s.nfe}", f"{tokens / n_rows / max(s.nfe, 1):.2f} tokens per forward"]
    if seconds:
        bits.append(f"{tokens / seconds:.1f} tokens/s")
    if s.t is not None:
        bits.append(f"t = {s.t:.3f}")
    return " · ".join(bits)


def page_html(steps: Sequence[Step], rows: Sequence[int], token: Callable[[int], str], special,
              prompts: Sequence[str] = (), title: str = "diffuse trajectory", seconds: float | None = None) -> str:
    """A self-contained page (no network assets): every frame of every row inlined, one slider and a play
    button replaying them together (the rows of a batch step together)."""
    prompts = list(prompts) or [""] * len(rows)
    frames = ["".join(canvas_html(steps, r, token, special, p, i) for r, p in zip(rows, prompts))
              for i in range(len(steps))]
    stats = [stats_line(steps, i, special, rows, seconds if i == len(steps) - 1 else None) for i in range(len(steps))]
    last = max(len(frames) - 1, 0)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:900px;margin:2em auto}}.dl-canvas{{margin:8px 0}}{CSS}</style></head>
<body><h2>{html.escape(title)}</h2>
<p class="dl-stats">colour = the step a token was committed at (blue early, red late); ▒ = still masked;
hatched = renoised; outlined = written on this step; wavy underline = revised</p>
<div><button id="play">▶ play</button> <input id="s" type="range" min="0" max="{last}" value="{last}"
 style="width:70%"></div>
<div id="stats" class="dl-stats"></div><div id="frame"></div>
<script>
const F={json.dumps(frames)}, S={json.dumps(stats)};
const s=document.getElementById('s'), fr=document.getElementById('frame'), st=document.getElementById('stats');
function show(i){{fr.innerHTML=F[i]||'';st.textContent=S[i]||'';}}
s.oninput=()=>show(+s.value); show({last});
document.getElementById('play').onclick=()=>{{let i=0;const id=setInterval(()=>{{s.value=i;show(i);
 if(++i>{last})clearInterval(id);}},Math.max(30,3000/F.length));}};
</script></body></html>"""
