"""A resumed run with changed `optim.*` keys: the given values, applied once Lightning restored the optimizer."""

from __future__ import annotations

from typing import Any

import lightning as L

from diffuse.run.optim import apply_changes


class ApplyOptimConfig(L.Callback):
    """After Lightning restored the optimizer and scheduler of a checkpoint, set the hyper-parameters the
    config changed (diffuse/run/optim.py: `optim_changes`, `apply_changes`)."""

    def __init__(self, changes: dict[str, tuple[Any, Any]]):
        self.changes = changes

    def on_train_start(self, trainer, pl_module):
        apply_changes(trainer.optimizers, trainer.lr_scheduler_configs, self.changes)
