"""A CSV logger for run directories that already hold files (Hydra's .hydra/, a resumed run's log).

`metrics.csv` holds each (step, metric) once across kills and resumes:

- **Written as logged.** Every logged row is appended at once (`flush_logs_every_n_steps=1`; Lightning's default of
  100 keeps rows in memory, and a `kill -9` lost the rows before a checkpoint that no resumed run logs again).
- **Never half a file.** A header change (new metric keys) rewrites the file atomically; a row torn by a kill in
  the middle of an append (the file does not end with a newline) is dropped when the file is opened again.
- **A resume forgets what it replays.** `forget_steps_from(step)` (diffuse/run/fit.py, on resume) drops the rows of
  `step` and later — the rows a killed run logged after its checkpoint, which the resumed run logs again.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from diffuse.core.io import atomic_write


def _read_rows(path: Path) -> tuple[list[str], list[dict], bool]:
    """(fields, complete rows, whether a torn last line was left out) of a metrics.csv."""
    with open(path, newline="") as f:
        text = f.read()
    torn = bool(text) and not text.endswith("\n")
    if torn:
        text = text[: text.rfind("\n") + 1]  # a kill in the middle of an append: the partial row goes
    reader = csv.DictReader(io.StringIO(text, newline=""))
    return list(reader.fieldnames or []), list(reader), torn


def _write_rows(path: Path, fields: list[str], rows: list[dict]) -> None:
    with atomic_write(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _step(row: dict) -> int | None:  # None: a row without a step (kept as it is)
    try:
        return int(float(row.get("step") or ""))
    except ValueError:
        return None


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # Lightning deletes an existing metrics.csv here; a resumed run appends to it instead (a torn row dropped).
        path = Path(self.metrics_file_path)
        if path.is_file():
            fields, rows, torn = _read_rows(path)
            if torn:
                _write_rows(path, fields, rows)
            self.metrics_keys = sorted(fields)

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        _, rows, _ = _read_rows(Path(self.metrics_file_path))
        _write_rows(Path(self.metrics_file_path), fieldnames, rows)  # atomically: a kill leaves the old file

    def save(self) -> None:
        """Append the rows logged since the last save, in one write (a new key rewrites the file first)."""
        if not self.metrics:
            return
        path = Path(self.metrics_file_path)
        new_keys = self._record_new_keys()
        if not path.is_file() or path.stat().st_size == 0:
            _write_rows(path, self.metrics_keys, self.metrics)
        else:
            if new_keys:
                self._rewrite_with_new_header(self.metrics_keys)
            buffer = io.StringIO(newline="")
            csv.DictWriter(buffer, fieldnames=self.metrics_keys).writerows(self.metrics)
            with open(path, "a", newline="") as f:
                f.write(buffer.getvalue())
        self.metrics = []


class RunCSVLogger(CSVLogger):
    """`metrics.csv` in the run directory; history survives a resume, each step once."""

    def __init__(self, *args, flush_logs_every_n_steps: int = 1, **kwargs):
        super().__init__(*args, flush_logs_every_n_steps=flush_logs_every_n_steps, **kwargs)

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    def forget_steps_from(self, step: int) -> int:
        """Drop the rows logged at `step` or later (and a row torn by a kill): a run resumed from a checkpoint of
        that step logs them again, and a step must appear once. Rewritten atomically; returns the rows dropped."""
        path = Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE
        if not path.is_file():
            return 0
        fields, rows, torn = _read_rows(path)
        kept = [r for r in rows if (s := _step(r)) is None or s < step]
        if len(kept) == len(rows) and not torn:
            return 0
        _write_rows(path, fields, kept)
        return len(rows) - len(kept) + torn
