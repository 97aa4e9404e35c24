"""`python -m diffuse.report <multirun dir> [--metric val/nelbo] [--out DIR]` — one table for a sweep.

Reads every run under the directory (a run = a folder with `.hydra/overrides.yaml`), its overrides and its
final `metrics.json`; the swept parameters are the override keys whose values differ between runs. Prints
a table (one row per run: swept values + final metrics), writes `report.md` and `<metric>.png` (the metric
against each swept parameter, one line per setting of the others) into --out (default: the sweep dir).
A run that has no metrics.json (failed or still running) is listed with empty metrics. Runs are found at any
depth, so a folder holding a sweep and its baseline gives one table (runs named by their path in it);
`--no-plot` writes the table alone. A run evaluated with
`python -m diffuse.evaluate ckpt=<run>/checkpoints/last.ckpt steps=[…] hydra.run.dir=<run>/eval` also shows
eval/gen_ppl@<steps> and eval/entropy@<steps> (usable as --metric).
`python -m diffuse.report --heatmap RUN [--out DIR]`: corruption-level × step heatmaps of one run
trained with callbacks=analysis (diffuse/analysis/heatmap.py), written to heatmap.png.
`python -m diffuse.report --curves RUN … --metric val/bpt [--x epochs]`: learning curves of several runs on
one plot (diffuse/analysis/curves.py).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from diffuse.analysis.curves import draw_curves
from diffuse.analysis.heatmap import draw_heatmap
from diffuse.errors import DiffuseError, one_line_errors

# shown after the chosen metric when a run has them, in this order
DEFAULT_COLUMNS = ("val/nelbo", "val/bpt", "val/accuracy", "train/loss", "train/consistency_loss", "train/tokens_per_sec")


@dataclass
class Run:
    path: Path
    overrides: dict[str, str]
    metrics: dict[str, float | None] = field(default_factory=dict)
    name: str = ""  # the run's folder relative to the directory reported on: `3`, or `baseline/0`


def collect_runs(sweep_dir: Path) -> list[Run]:
    if not sweep_dir.is_dir():
        raise DiffuseError(f"report: {sweep_dir} is not a directory")
    found = {ov.parent.parent: ov for ov in sweep_dir.rglob(".hydra/overrides.yaml")}
    # `diffuse.evaluate … hydra.run.dir=<run>/eval` leaves a .hydra/ inside the run: part of it, not a run
    tops = [d for d in found if not any(p in found for p in d.parents)]
    runs = []
    names = {d: d.relative_to(sweep_dir).as_posix() for d in tops}
    for run_dir in sorted(tops, key=lambda d: [_natural_key(part) for part in names[d].split("/")]):
        ov = found[run_dir]
        overrides = {}
        for item in yaml.safe_load(ov.read_text()) or []:
            key, _, value = str(item).partition("=")
            overrides[key.lstrip("+~")] = value
        metrics_file = run_dir / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        metrics.update(eval_metrics(run_dir / "eval" / "eval.json"))
        runs.append(Run(run_dir, overrides, metrics, names[run_dir]))
    if not runs:
        raise DiffuseError(f"report: no runs (folders with .hydra/overrides.yaml) under {sweep_dir}")
    return runs


def eval_metrics(path: Path) -> dict[str, float | None]:
    """`diffuse.evaluate … hydra.run.dir=<run>/eval` results, flat: eval/gen_ppl@<steps>, eval/entropy@<steps>."""
    if not path.is_file():
        return {}
    result = json.loads(path.read_text())
    flat = {}
    for point in result.get("sweep") or []:
        for key in ("gen_ppl", "entropy"):
            flat[f"eval/{key}@{point['steps']}"] = point.get(key)
    return flat


def swept_keys(runs: list[Run]) -> list[str]:
    """Override keys whose value is not the same in every run (a key missing from a run counts as a value)."""
    keys = sorted({k for r in runs for k in r.overrides})
    return [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]


def metric_columns(runs: list[Run], metric: str) -> list[str]:
    present = {k for r in runs for k in r.metrics}
    if runs and present and metric not in present:
        raise DiffuseError(f"report: --metric {metric} is in no run's metrics.json; available: {', '.join(sorted(present))}")
    evaluated = sorted((k for k in present if k.startswith("eval/")), key=lambda k: (k.split("@")[0], _natural_key(k.split("@")[-1])))
    return [metric] + [c for c in (*DEFAULT_COLUMNS, *evaluated) if c != metric and c in present]


def rows(runs: list[Run], params: list[str], columns: list[str]) -> list[list[str]]:
    return [[r.name] + [r.overrides.get(p, "") for p in params] + [_fmt(r.metrics.get(c)) for c in columns] for r in runs]


def print_table(runs: list[Run], params: list[str], columns: list[str], title: str) -> None:
    table = Table()
    for h in ["run", *short_names(params)]:
        table.add_column(h, style="cyan", overflow="fold")
    for c in columns:
        table.add_column(c, justify="right", overflow="fold")
    for row in rows(runs, params, columns):
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # logs and pipes: do not squeeze the table into 80 columns
        console = Console(width=max(console.width, 160))
    console.print(title, style="bold", soft_wrap=True)
    console.print(table)


def short_names(params: list[str]) -> list[str]:
    """`regularizer.weight` → `weight` when no other swept key ends the same way."""
    last = [p.rsplit(".", 1)[-1] for p in params]
    return [s if last.count(s) == 1 else p for p, s in zip(params, last)]


def write_markdown(path: Path, runs: list[Run], params: list[str], columns: list[str], title: str, plot: str | None) -> None:
    header = ["run", *params, *columns]
    fixed = {k: v for k, v in runs[0].overrides.items() if k not in params}
    lines = [f"# {title}", ""]
    if fixed:
        lines += ["Fixed overrides: " + " ".join(f"`{k}={v}`" for k, v in sorted(fixed.items())), ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows(runs, params, columns)]
    if plot:
        lines += ["", f"![{columns[0]}]({plot})"]
    path.write_text("\n".join(lines) + "\n")


def plot_metric(path: Path, runs: list[Run], params: list[str], metric: str) -> bool:
    """One panel per swept parameter: the metric against its values, one line per setting of the rest."""
    import matplotlib  # local: heavy, and the Agg backend must be chosen before pyplot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in runs if _finite(r.metrics.get(metric))]
    if not done:
        return False
    shown = params or ["run"]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.5 * len(shown), 3.6), squeeze=False)
    for ax, param in zip(axes[0], shown):
        others = [p for p in params if p != param]
        groups: dict[tuple, list[Run]] = {}
        for r in done:
            groups.setdefault(tuple(r.overrides.get(p, "") for p in others), []).append(r)
        values = sorted({_param_value(r, param) for r in done}, key=_natural_key)
        numeric = all(_as_float(v) is not None for v in values)
        for key, members in sorted(groups.items()):
            members = sorted(members, key=lambda r: _natural_key(_param_value(r, param)))
            xs = [_as_float(_param_value(r, param)) if numeric else values.index(_param_value(r, param)) for r in members]
            label = ", ".join(f"{p}={v}" for p, v in zip(others, key)) or None
            ax.plot(xs, [r.metrics[metric] for r in members], marker="o", label=label)
        if not numeric:
            ax.set_xticks(range(len(values)), values, rotation=30)
        ax.set_xlabel(param)
        ax.set_ylabel(metric)
        if len(groups) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def report_sweep(sweep_dir: Path, metric: str = "val/nelbo", out: Path | None = None, plot: bool = True) -> list[Run]:
    runs = collect_runs(sweep_dir)
    params = swept_keys(runs)
    columns = metric_columns(runs, metric)
    out = out or sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    title = f"{sweep_dir} — {len(runs)} runs"
    png = out / (metric.replace("/", "_") + ".png")
    plotted = plot and plot_metric(png, runs, params, metric)
    print_table(runs, params, columns, title)
    write_markdown(out / "report.md", runs, params, columns, title, png.name if plotted else None)
    why_not = f" (no run has a finite {metric} to plot)" if plot else ""
    print(f"wrote {out / 'report.md'}" + (f" and {png}" if plotted else why_not))
    return runs


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffuse.report", description=__doc__.splitlines()[0])
    parser.add_argument("dirs", type=Path, nargs="+", metavar="DIR",
                        help="a multirun directory (e.g. experiments/runs/multirun/<date>/<time>); with --curves, runs")
    parser.add_argument("--metric", default="val/nelbo", help="the metric to plot and put first (default: val/nelbo)")
    parser.add_argument("--out", type=Path, default=None, help="where report.md and the PNG go (default: the sweep dir)")
    parser.add_argument("--no-plot", dest="plot", action="store_false", help="the table only (e.g. a baseline beside "
                        "a sweep, whose plot against the swept values would mix unrelated runs)")
    parser.add_argument("--heatmap", action="store_true", help="the directory is one run: draw its gradient-norm / "
                        "accuracy heatmaps by corruption level (heatmap.png)")
    parser.add_argument("--curves", action="store_true", help="the directories are runs: plot --metric over "
                        "training, one line per run (curves_<metric>.png/.csv)")
    parser.add_argument("--x", default="step", choices=("step", "epochs"), help="x axis of --curves")
    parser.add_argument("--labels", default=None, help="comma-separated legend labels for --curves")
    args = parser.parse_args(argv)
    if args.curves:
        labels = args.labels.split(",") if args.labels else None
        if labels is not None and len(labels) != len(args.dirs):
            raise DiffuseError(f"report: --labels has {len(labels)} names for {len(args.dirs)} runs")
        draw_curves(args.dirs, args.metric, args.x, args.out, labels)
        return
    if len(args.dirs) != 1:
        raise DiffuseError(f"report: give one directory (got {len(args.dirs)}); several runs need --curves")
    args.sweep_dir = args.dirs[0]
    if args.heatmap:
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
        print(f"wrote {draw_heatmap(args.sweep_dir, args.out / 'heatmap.png' if args.out else None)}")
        return
    report_sweep(args.sweep_dir, args.metric, args.out, args.plot)


# -- helpers ----------------------------------------------------------------------------------------
def _param_value(run: Run, param: str) -> str:
    return run.name if param == "run" else run.overrides.get(param, "")


def _as_float(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _fmt(v) -> str:
    if not _finite(v):
        return ""
    return f"{v:.4g}"


def _natural_key(v: str):
    f = _as_float(v)
    return (0, f, "") if f is not None else (1, 0.0, str(v))


if __name__ == "__main__":
    main()
