"""Training analyses: gradient norms by corruption level, heatmaps of them, learning curves."""

from pathlib import Path

from diffuse.errors import DiffuseError


def metrics_csv(run: str | Path, tool: str) -> Path:
    """A run directory's metrics.csv (or the CSV itself); a one-line error naming `tool` when it is missing."""
    run = Path(run)
    path = run / "metrics.csv" if run.is_dir() else run
    if not path.is_file():
        raise DiffuseError(f"{tool}: {path} does not exist (give a run directory holding metrics.csv)")
    return path
