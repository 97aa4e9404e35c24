"""Learning curves of several runs on one plot, from their metrics.csv (no wandb needed):
`python -m diffuse.report --curves RUN_A RUN_B … [--metric val/bpt] [--x step|epochs] [--out DIR]`.

x=epochs uses the `train/epochs` the Throughput callback logs (passes over the training split, affine in
the step), so a data-constrained study reads held-out loss against repetitions of its data.
Writes curves_<metric>.png and curves_<metric>.csv (run, step, epochs, value) and returns the series.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from diffuse.analysis import metrics_csv
from diffuse.errors import DiffuseError


def read_curve(csv_path: Path, metric: str):
    """(steps, values, step → epochs or None) of `metric` in one run's metrics.csv."""
    steps, values, known = [], [], []
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if metric not in (reader.fieldnames or []):
            raise DiffuseError(f"curves: {csv_path} has no column '{metric}'")
        for row in reader:
            step = _float(row.get("step"))
            value, epochs = _float(row.get(metric)), _float(row.get("train/epochs"))
            if step is not None and value is not None:
                steps.append(int(step))
                values.append(value)
            if step is not None and epochs is not None:
                known.append((step, epochs))
    return steps, values, _affine(known)


def _affine(points: list[tuple[float, float]]):
    """Epochs are affine in the logged step (the logger's step index may lag the optimizer's by one)."""
    if not points:
        return None
    (s0, e0), (s1, e1) = points[0], points[-1]
    if s1 == s0:
        return (lambda s: s * e0 / s0) if s0 else None
    slope = (e1 - e0) / (s1 - s0)
    return lambda s: e0 + slope * (s - s0)


def draw_curves(run_dirs: list[str | Path], metric: str = "val/bpt", x: str = "step",
                out: str | Path | None = None, labels: list[str] | None = None) -> dict[str, list[tuple]]:
    if x not in ("step", "epochs"):
        raise DiffuseError(f"curves: --x {x} must be step or epochs")
    runs = [Path(r) for r in run_dirs]
    labels = labels or [_label(r) for r in runs]
    series: dict[str, list[tuple]] = {}
    for run, label in zip(runs, labels):
        csv_path = metrics_csv(run, "curves")
        steps, values, to_epochs = read_curve(csv_path, metric)
        if x == "epochs" and to_epochs is None:
            raise DiffuseError(f"curves: {csv_path} has no train/epochs column (logged by the Throughput callback)")
        series[label] = [(s, to_epochs(s) if to_epochs else None, v) for s, v in zip(steps, values)]

    out = Path(out) if out else Path(".")
    out.mkdir(parents=True, exist_ok=True)
    stem = "curves_" + metric.replace("/", "_")
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "step", "epochs", metric])
        for label, points in series.items():
            w.writerows([label, s, "" if e is None else f"{e:.4f}", f"{v:.6g}"] for s, e, v in points)

    import matplotlib  # local: heavy, and the Agg backend must be chosen before pyplot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, points in series.items():
        xs = [e if x == "epochs" else s for s, e, _ in points]
        ax.plot(xs, [v for *_, v in points], marker="o", markersize=3, label=label)
    ax.set_xlabel("epochs (passes over the training data)" if x == "epochs" else "training step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=120)
    plt.close(fig)
    print(f"wrote {out / (stem + '.png')} and {out / (stem + '.csv')}")
    return series


def _label(run: Path) -> str:
    run = run.parent if run.is_file() else run
    return run.name


def _float(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None
