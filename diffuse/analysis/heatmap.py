"""Corruption level × training step heatmaps from a run's metrics.csv (no wandb needed): the gradient norms
by bucket (`grad/norm_{bucket}`, from callbacks=analysis) and, when the run logged them, validation accuracy
by bucket (`val/accuracy_{bucket}`). Drawn by `python -m diffuse.report --heatmap RUN_DIR [--out DIR]`;
writes RUN_DIR/heatmap.png by default.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from diffuse.analysis import metrics_csv
from diffuse.core.metrics import BUCKETS
from diffuse.errors import DiffuseError

PANELS = (("grad/norm", "gradient norm (log10)", True), ("grad/loss", "loss", False),
          ("val/accuracy", "validation accuracy", False))


def read_series(csv_path: Path, prefix: str) -> tuple[list[int], list[list[float]]]:
    """Steps at which `prefix_{bucket}` was logged, and a [bucket][step] matrix (NaN where missing)."""
    columns = [f"{prefix}_{name}" for name, _, _ in BUCKETS]
    by_step: dict[int, dict[str, float]] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            values = {c: float(row[c]) for c in columns if row.get(c) not in (None, "")}
            if values and row.get("step") not in (None, ""):
                by_step.setdefault(int(float(row["step"])), {}).update(values)
    steps = sorted(by_step)
    return steps, [[by_step[s].get(c, math.nan) for s in steps] for c in columns]


def draw_heatmap(run_dir: str | Path, out: str | Path | None = None) -> Path:
    csv_path = metrics_csv(run_dir, "heatmap")
    panels = [(title, log, *read_series(csv_path, prefix)) for prefix, title, log in PANELS]
    panels = [p for p in panels if p[2]]
    if not any(title.startswith("gradient") for title, *_ in panels):
        raise DiffuseError(f"heatmap: {csv_path} has no grad/norm_* columns; train with callbacks=analysis")

    import matplotlib  # local: heavy, and the Agg backend must be chosen before pyplot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.2 * len(panels) + 0.6), squeeze=False)
    for ax, (title, log, steps, matrix) in zip(axes[:, 0], panels):
        data = np.array(matrix, dtype=float)
        if log:
            data = np.log10(np.where(data > 0, data, np.nan))
        # one column per logged step, labelled with the step (steps need not be evenly spaced)
        image = ax.imshow(np.ma.masked_invalid(data), aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_yticks(range(len(BUCKETS)),
                      [f"{name} ({lo:.1f}–{min(hi, 1.0):.1f})" for name, lo, hi in BUCKETS])
        ticks = np.linspace(0, len(steps) - 1, min(len(steps), 10)).round().astype(int)
        ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
        ax.set_xlabel("training step")
        ax.set_ylabel("corruption level")
        ax.set_title(title)
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    out = Path(out) if out else (csv_path.parent / "heatmap.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

