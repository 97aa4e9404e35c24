"""A recorded trajectory as an animated GIF (Pillow, its bundled font: nothing to download): the cells of
replay.py, one frame per step, the last frame held longer."""

from __future__ import annotations

import colorsys
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw, ImageFont

from diffuse.analysis.replay import cells
from diffuse.sampling.trace import Step

WIDTH, PAD, LINE, SIZE = 640, 12, 24, 15


def _rgb(step: int, n_steps: int) -> tuple[int, int, int]:
    """replay.colour's hsl(230 → 0, 75%, 82%) in RGB."""
    frac = step / max(n_steps - 1, 1)
    r, g, b = colorsys.hls_to_rgb((230 - 230 * frac) / 360, 0.82, 0.75)
    return int(r * 255), int(g * 255), int(b * 255)


def _frame(steps, row, token, special, prompt, i, font, height) -> Image.Image:
    img = Image.new("RGB", (WIDTH, height), "white")
    d = ImageDraw.Draw(img)
    d.text((PAD, 6), f"step {i + 1}/{len(steps)}   NFE {steps[i].nfe}", fill=(90, 90, 90), font=font)
    x, y = PAD, 6 + LINE

    def put(text, fill=None, ink=(20, 20, 20), box=False):
        nonlocal x, y
        for piece in text.split("\n"):
            w = d.textlength(piece or " ", font=font) if piece else 0
            if x + w > WIDTH - PAD:
                x, y = PAD, y + LINE
            if fill is not None:
                d.rectangle([x, y + 1, x + max(w, 6), y + LINE - 3], fill=fill, outline=(0, 0, 0) if box else None)
            d.text((x, y + 2), piece, fill=ink, font=font)
            x += w
            if piece is not text.split("\n")[-1]:
                x, y = PAD, y + LINE

    if prompt:
        put(prompt, ink=(130, 130, 130))
    for c in cells(steps, row, token, special, i):
        if c.kind == "blank":
            continue
        if c.kind == "mask":  # a grey box with a gap, so that a run of masks still counts its positions
            put("  ", fill=(200, 200, 200))
            x += 3
        elif c.kind == "noise":
            put(c.text, fill=(235, 235, 235), ink=(120, 120, 120))
        elif c.kind == "eos":
            put("⏎", ink=(150, 150, 150))
        else:
            put(c.text, fill=_rgb(c.step, len(steps)) if c.step >= 0 else None, box=c.new)
    return img


def write_gif(path: str | Path, steps: Sequence[Step], row: int, token: Callable[[int], str], special,
              prompt: str = "", ms: int = 120) -> Path:
    """One frame per step, as tall as the last frame's text needs."""
    font = ImageFont.load_default(size=SIZE)
    frames = [_frame(steps, row, token, special, prompt, i, font, 1200) for i in range(len(steps))]
    box = ImageChops.invert(frames[-1]).getbbox()
    height = min(1200, (box[3] if box else LINE) + PAD)
    frames = [f.crop((0, 0, WIDTH, height)) for f in frames]
    durations = [ms] * (len(frames) - 1) + [2000]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0, optimize=True)
    return Path(path)
