"""A run directory belongs to one training at a time, and nothing in it is lost or mixed up.

- **Lock.** `run_dir/.lock` is held with `flock` by the process that writes the run (global rank 0):
  taken before Hydra writes `.hydra/` (the `RunDirLock` Hydra callback of conf/train.yaml) or, for jobs
  that skip that callback (multirun jobs, the compose API), when training starts. A second writer gets one
  line naming the holder; the OS drops the lock when its holder dies (kill -9 included).
- **Temp files** of interrupted atomic writes (`.<name>.<pid>.tmp`) are removed when a run starts.
- **Resume.** `resume=true` without `checkpoints/last.ckpt` is an error (a mistyped dir must not train
  from scratch). Optimisation keys that differ from the checkpoint's are listed in one line; the given
  values are used (applied to the restored optimizer: `ApplyOptimConfig`), so `.hydra/config.yaml` and the
  new checkpoints, which record the given config, say what was used.
- **Metrics** of a finished run survive a resume that trains no further step (`merge_metrics`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.experimental.callback import Callback

from diffuse.errors import DiffuseError
from diffuse.run.module import LR_SCHEDULE_KEYS

log = logging.getLogger("diffuse")

LOCK_NAME = ".lock"
_held: dict[Path, int] = {}  # run dir → lock file descriptor held by this process


def is_global_rank_zero() -> bool:
    """From the environment, as Lightning, torchrun and SLURM set it (child ranks never write the run dir)."""
    return all(int(os.environ.get(k, 0) or 0) == 0 for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


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


class RunDirLock(Callback):
    """Hydra callback: lock `hydra.run.dir` before Hydra writes `.hydra/` into it, release after the run."""

    def on_run_start(self, config, **kwargs: Any) -> None:
        if not is_global_rank_zero():
            return
        try:
            acquire(Path(config.hydra.run.dir))
        except DiffuseError as err:  # before the task function: print it as the entry points do
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    def on_run_end(self, config, **kwargs: Any) -> None:
        release(Path(config.hydra.run.dir))


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


def optim_changes(saved: dict, given: dict) -> dict[str, tuple[Any, Any]]:
    """{key: (checkpoint's value, given value)} for the optimisation keys that differ."""
    keys = sorted((set(saved) | set(given)) - {"total_steps"})  # total_steps follows trainer.max_steps
    changes = {k: (saved.get(k), given.get(k)) for k in keys if saved.get(k) != given.get(k)}
    if "_target_" in changes and saved.get("_target_") is not None:
        old, new = changes["_target_"]
        raise DiffuseError(f"optim._target_={new} but the checkpoint was trained with {old}: its optimizer state "
                           f"cannot be resumed into another optimizer (resume with optim._target_={old})")
    changes.pop("_target_", None)
    return changes


def announce_optim_changes(changes: dict[str, tuple[Any, Any]]) -> None:
    if changes:
        listed = "; ".join(f"optim.{k}: {old} in the checkpoint → {new}" for k, (old, new) in changes.items())
        log.warning("resume with changed optimisation keys (%s); the given values are used and recorded", listed)


class ApplyOptimConfig(L.Callback):
    """After Lightning restored the optimizer and scheduler of a checkpoint, set the hyper-parameters the
    config changed (the restored state would otherwise keep the checkpoint's lr, betas, …)."""

    def __init__(self, changes: dict[str, tuple[Any, Any]]):
        self.changes = {k: new for k, (_, new) in changes.items() if k not in LR_SCHEDULE_KEYS}

    def on_train_start(self, trainer, pl_module):
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                for key, value in self.changes.items():
                    if key == "weight_decay" and group.get("weight_decay") == 0.0:
                        continue  # the no-decay group (norms, biases, embeddings) stays at 0
                    if key in group:
                        group[key] = tuple(value) if isinstance(group[key], tuple) else value
        if "lr" in self.changes:
            for config in trainer.lr_scheduler_configs:
                sched = config.scheduler
                sched.base_lrs = [float(self.changes["lr"])] * len(sched.base_lrs)
                for group, lr in zip(sched.optimizer.param_groups, _current_lrs(sched)):
                    group["lr"] = lr


def _current_lrs(sched) -> list[float]:
    """The lr each group has at the scheduler's current step under its (possibly new) base lr."""
    lambdas = getattr(sched, "lr_lambdas", None)
    if lambdas is None:
        return [g["lr"] for g in sched.optimizer.param_groups]
    return [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, lambdas)]


def merge_metrics(path: Path, metrics: dict) -> dict:
    """The new metrics over the ones already in `path` (a resumed, already finished run keeps train/*)."""
    try:
        previous = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        previous = {}
    return {**previous, **metrics}
