"""A run directory belongs to one training at a time, and nothing in it is lost or mixed up.

- **Lock.** `run_dir/.lock` is held with `flock` by the process that writes the run (global rank 0):
  taken before Hydra writes `.hydra/` (the `RunDirLock` Hydra callback of conf/train.yaml, run/callbacks/run_dir_lock.py) or, for jobs
  that skip that callback (multirun jobs, the compose API), when training starts. A second writer gets one
  line naming the holder; the OS drops the lock when its holder dies (kill -9 included).
- **Temp files** of interrupted atomic writes (`.<name>.<pid>.tmp`) are removed when a run starts.
- **Resume.** `resume=true` without `checkpoints/last.ckpt` is an error (a mistyped dir must not train
  from scratch). Optimisation keys that differ from the checkpoint's are listed in one line; the given
  values are used (applied to the restored optimizer: run/optim.py, `ApplyOptimConfig`), so `.hydra/config.yaml` and the
  new checkpoints, which record the given config, say what was used.
- **No silent overwrite.** A new run (neither `resume=true` nor `ckpt_path=`) in a dir that holds a run's results
  (`checkpoints/last.ckpt` or rows in `metrics.csv`; Hydra's `.hydra/` and logs alone are not) is refused in one
  line, before Hydra rewrites `.hydra/` when the `RunDirLock` callback runs (`check_new_run`); `overwrite=true`
  starts afresh there, removing the old checkpoints and metrics first.
- **Metrics**: `metrics.json` is flat and written atomically; the metrics of a finished run survive a resume
  that trains no further step (`merge_metrics`).
"""

from __future__ import annotations

import csv
import fcntl
import json
import logging
import math
import os
import socket
import time
from pathlib import Path

from diffuse.core.io import write_text_atomic
from diffuse.core.ranks import is_global_rank_zero
from diffuse.errors import DiffuseError

log = logging.getLogger("diffuse")

LOCK_NAME = ".lock"
_held: dict[Path, int] = {}  # run dir → lock file descriptor held by this process


def acquire(run_dir: Path) -> bool:
    """Lock `run_dir` for this process; False if it already held it. Raises a one-line DiffuseError if another does."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return False
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 512).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise DiffuseError(f"run dir {run_dir} is in use by {holder}; give another hydra.run.dir "
                           "(or wait for it to finish)") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
    _held[run_dir] = fd
    return True


def release(run_dir: Path) -> None:
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def clean_temp_files(run_dir: Path) -> int:
    """Remove what interrupted atomic writes left behind (`.<name>….tmp`); returns how many."""
    removed = 0
    for folder in (Path(run_dir), Path(run_dir) / "checkpoints"):
        for tmp in folder.glob(".*.tmp") if folder.is_dir() else ():
            tmp.unlink(missing_ok=True)
            removed += 1
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted write in %s", removed, run_dir)
    return removed


def resume_path(cfg, run_dir: Path) -> str | None:
    if cfg.get("ckpt_path"):
        return str(cfg.ckpt_path)
    if not cfg.get("resume"):
        return None
    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise DiffuseError(f"resume=true but {last} does not exist; check hydra.run.dir={run_dir} "
                           "(or drop resume=true to start a new run)")
    return str(last)


def held_run(run_dir: Path) -> str | None:
    """What of a run `run_dir` holds ("checkpoints/last.ckpt and metrics.csv up to step 41"), or None: Hydra's
    `.hydra/`, logs and an empty metrics.csv are what any run writes before it trains, not a run."""
    run_dir = Path(run_dir)
    found = []
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        found.append("checkpoints/last.ckpt")
    metrics = run_dir / "metrics.csv"
    if metrics.is_file():
        steps = []
        with open(metrics, newline="") as f:
            for row in csv.DictReader(f):
                try:
                    steps.append(int(float(row.get("step") or "")))
                except ValueError:
                    steps.append(-1)
        if steps:
            found.append(f"metrics.csv up to step {max(steps)}" if max(steps) >= 0 else "metrics.csv rows")
    return " and ".join(found) or None


def check_new_run(cfg, run_dir: Path) -> None:
    """A new run (no `resume=true`, no `ckpt_path=`) may not write over a run: refused in one line unless
    `overwrite=true`, which removes the old checkpoints and metrics. Global rank 0 only (the others write nothing)."""
    if cfg.get("resume") or cfg.get("ckpt_path") or not is_global_rank_zero():
        return
    held = held_run(run_dir)
    if held is None:
        return
    if not cfg.get("overwrite"):
        resume = ("continue it with resume=true, " if (Path(run_dir) / "checkpoints" / "last.ckpt").is_file()
                  else "it left no checkpoint to resume; ")
        raise DiffuseError(f"run dir {run_dir} already holds a run ({held}): {resume}give another hydra.run.dir, "
                           "or overwrite=true to start a new run there (its checkpoints and metrics are removed)")
    removed = [p for p in (*sorted((Path(run_dir) / "checkpoints").glob("*.ckpt")), Path(run_dir) / "metrics.csv",
                           Path(run_dir) / "metrics.json") if p.is_file()]
    for p in removed:
        p.unlink()
    log.warning("overwrite=true: removed the run in %s (%s): %s", run_dir, held,
                ", ".join(str(p.relative_to(run_dir)) for p in removed))


def merge_metrics(path: Path, metrics: dict) -> dict:
    """The new metrics over the ones already in `path` (a resumed, already finished run keeps train/*)."""
    try:
        previous = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        previous = {}
    return {**previous, **metrics}


def flat_metrics(metrics: dict) -> dict:
    """{name: float or None (non-finite)} of the values that are numbers."""
    flat = {}
    for k, v in metrics.items():
        try:
            v = float(v)
        except (TypeError, ValueError):
            continue
        flat[k] = v if math.isfinite(v) else None
    return flat


def write_metrics_json(path: str | Path, metrics: dict) -> dict:
    """Flat {name: float}; written atomically (a temporary file of this process's own, then a rename).
    The training entry point calls it on global rank 0 only."""
    flat = flat_metrics(metrics)
    write_text_atomic(path, json.dumps(flat, indent=2, sort_keys=True) + "\n")
    return flat
