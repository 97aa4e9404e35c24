"""Callbacks: throughput, and the final metrics.json of a run."""

from __future__ import annotations

import time

import lightning as L


class Throughput(L.Callback):
    """Logs `train/tokens_per_sec` and `train/epochs` (passes over the training split) every
    `log_every_n_steps` (no per-step device sync); the run
    average, excluding the first step (compilation, warm-up), is kept for metrics.json. With several
    processes the tokens are all ranks' (each reads a batch of the same shape), timed on this rank."""

    def __init__(self):
        self.window_tokens = 0
        self.window_start = None
        self.run_start = None
        self.run_tokens = 0
        self.average = float("nan")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.window_start is None:
            self.window_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        n = batch["input_ids"].numel() * trainer.world_size
        if self.run_start is None:  # the first step pays for warm-up: start counting after it
            self.run_start = time.perf_counter()
            self.window_start, self.window_tokens = self.run_start, 0
            return
        self.window_tokens += n
        self.run_tokens += n
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            now = time.perf_counter()
            rate = self.window_tokens / max(now - self.window_start, 1e-9)
            pl_module.log("train/tokens_per_sec", rate, on_step=True, on_epoch=False)
            epochs = self._epochs(trainer, batch["input_ids"].shape[0])
            if epochs is not None:
                pl_module.log("train/epochs", epochs, on_step=True, on_epoch=False)
            self.window_start, self.window_tokens = now, 0
            self.average = self.run_tokens / max(now - self.run_start, 1e-9)

    @staticmethod
    def _epochs(trainer, rows_per_batch: int) -> float | None:
        """Passes over the training split so far (our samplers are endless: Lightning's own epoch stays 0)."""
        loader = trainer.train_dataloader
        size = len(loader.dataset) if loader is not None and hasattr(loader.dataset, "__len__") else 0
        if not size:
            return None
        seen = trainer.global_step * trainer.accumulate_grad_batches * rows_per_batch * trainer.world_size
        return seen / size

    def on_train_end(self, trainer, pl_module):
        if self.run_start is not None and self.run_tokens:
            self.average = self.run_tokens / max(time.perf_counter() - self.run_start, 1e-9)
