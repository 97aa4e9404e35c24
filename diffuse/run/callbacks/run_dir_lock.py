"""Hydra callback (conf/train.yaml): the run directory is locked, and a new run over a finished one refused, before
Hydra writes `.hydra/` into it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from diffuse.core.ranks import is_global_rank_zero
from diffuse.errors import DiffuseError
from diffuse.run.rundir import acquire, check_new_run, release


class RunDirLock(Callback):
    """Lock `hydra.run.dir` before Hydra writes `.hydra/` into it (and refuse a new run over a finished one: `overwrite=true`
    is applied by the run itself), release after the run (diffuse/run/rundir.py)."""

    def on_run_start(self, config, **kwargs: Any) -> None:
        if not is_global_rank_zero():
            return
        run_dir = Path(config.hydra.run.dir)
        try:
            acquire(run_dir)
        except DiffuseError as err:  # before the task function: print it as the entry points do
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        try:
            check_new_run(config, run_dir)  # before .hydra/ is rewritten (the run checks again: multirun, compose)
        except DiffuseError as err:
            release(run_dir)
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    def on_run_end(self, config, **kwargs: Any) -> None:
        release(Path(config.hydra.run.dir))
