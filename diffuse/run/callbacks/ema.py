"""An exponential moving average of the weights: Lightning's `EMAWeightAveraging` (`callbacks=ema`).

The checkpoint layout is Lightning's: `state_dict` holds the **EMA** weights, `current_model_state` the raw ones,
`averaging_state` the average's counter (`n_averaged`); everything is tensors and plain containers
(`torch.load(weights_only=True)` reads it). So whatever loads `state_dict` — `diffuse.sample`, `diffuse.evaluate`,
`diffuse.export`, a frozen teacher, all through `run.load.load_run` → `inference_state_dict` — uses the EMA
weights, and a resumed fit restores both (Lightning loads `state_dict`, then the callback reloads the raw weights
into the module and the EMA into its average).

`EMA` is that callback with four changes, each for a reason:

- **The update has no host sync.** `AveragedModel.update_parameters` asks `bool(n_averaged == 0)` every step, a
  device sync on a GPU; here whether the average is empty is a host-side fact (`_latest_update_step == 0`) and the
  update is torch's own EMA (`get_ema_multi_avg_fn`: one foreach lerp, instead of ~4 kernels per tensor).
- **Training ends with the module holding the EMA weights and the raw ones kept** (Lightning copies the average over
  the raw weights at train end): the final validation, the samples printed by `diffuse.train` and the final
  `last.ckpt` use the EMA, and that checkpoint still carries the raw weights, so `resume=true` from it continues
  exactly. Done in `on_fit_end`, which also runs when a resumed run had no step left to train.
- **Before the first update** (`update_starting_at_step`) validation and checkpoints use the raw weights: the
  average holds only the initial weights then.
- Buffers that are not floating point are copied, never averaged.
"""

from __future__ import annotations

import logging

import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, WeightAveraging
from torch.optim.swa_utils import get_ema_multi_avg_fn

from diffuse.core.checks import check_range

log = logging.getLogger("diffuse")


def inference_state_dict(ckpt: dict, ema: bool = True) -> dict:
    """The weights to sample, evaluate and export with: the EMA weights when the run averaged them (`ema=False`:
    the raw ones). A checkpoint written by Lightning's own callback before its first update holds the initial
    weights under `state_dict` (`n_averaged == 0`): the raw weights are returned then."""
    raw = ckpt.get("current_model_state")
    if raw is None:
        return ckpt["state_dict"]
    n_averaged = (ckpt.get("averaging_state") or {}).get("n_averaged")
    if not ema or (n_averaged is not None and int(n_averaged) == 0):
        return raw
    return ckpt["state_dict"]


def resume_without_ema(trainer, checkpoint: dict) -> None:
    """A fit resumed from an EMA checkpoint without a weight-averaging callback continues from the raw weights
    (Lightning would load `state_dict`, the average). Called by `DiffusionLM.on_load_checkpoint`, which runs before
    Lightning loads `state_dict`; with the callback there, the callback restores both."""
    if trainer is None or "current_model_state" not in checkpoint:
        return
    if not any(isinstance(c, WeightAveraging) for c in trainer.callbacks):
        log.info("resuming without EMA from a checkpoint that has it: training continues from the raw weights")
        checkpoint["state_dict"] = checkpoint["current_model_state"]


class EMA(EMAWeightAveraging):
    def __init__(self, decay: float = 0.999, update_every_n_steps: int = 1, update_starting_at_step: int | None = None,
                 use_buffers: bool = True, device: str | None = None):
        # decay = 1 would keep the initial weights for good (validation, best.ckpt, samples, export all untrained)
        check_range("callbacks.ema.decay", decay, 0, 1, high_open=True)
        check_range("callbacks.ema.update_every_n_steps", update_every_n_steps, 1, integer=True)
        check_range("callbacks.ema.update_starting_at_step", update_starting_at_step, 0, integer=True,
                    null="from the first step")
        super().__init__(device=device, use_buffers=use_buffers, decay=decay, update_every_n_steps=update_every_n_steps,
                         update_starting_at_step=update_starting_at_step)
        self.decay = float(decay)
        self._ema_update = get_ema_multi_avg_fn(self.decay)
        self._holds_ema = False  # the module holds the EMA weights (validation, after fit); the average the raw ones

    @property
    def started(self) -> bool:
        return self._latest_update_step > 0

    def _pairs(self, pl_module):
        """(average, module) tensor pairs: parameters, then buffers."""
        avg = self._average_model.module
        params = list(zip(avg.parameters(), pl_module.parameters()))
        buffers = list(zip(avg.buffers(), pl_module.buffers()))
        return params, buffers

    @torch.no_grad()
    def _update(self, pl_module) -> None:
        params, buffers = self._pairs(pl_module)
        averaged = params + [(a, b) for a, b in buffers if self._use_buffers and a.is_floating_point()]
        copied = [(a, b) for a, b in buffers if not (self._use_buffers and a.is_floating_point())]
        if not self.started:
            copied = params + buffers
            averaged = []
        for a, b in copied:
            a.copy_(b.detach())
        groups: dict[tuple, tuple[list, list]] = {}
        for a, b in averaged:
            ga, gb = groups.setdefault((a.device, a.dtype), ([], []))
            ga.append(a)
            gb.append(b.detach().to(a.device, a.dtype))
        for ga, gb in groups.values():
            self._ema_update(ga, gb, None)
        self._average_model.n_averaged += 1  # in place, on its device: no sync

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step_idx = trainer.global_step - 1  # as Lightning's: zero-based index of the last optimizer step
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=step_idx):
            self._update(pl_module)
            self._latest_update_step = trainer.global_step

    def on_train_epoch_end(self, trainer, pl_module):
        pass  # step-based only (our data streams are endless: one epoch)

    def _swap(self, pl_module) -> None:
        self._swap_models(pl_module)
        self._holds_ema = not self._holds_ema

    def on_validation_epoch_start(self, trainer, pl_module):
        if self._average_model is not None and self.started and not self._holds_ema:
            self._swap(pl_module)
            self._swapped_for_validation = True

    def on_validation_epoch_end(self, trainer, pl_module):
        if getattr(self, "_swapped_for_validation", False):
            self._swap(pl_module)
            self._swapped_for_validation = False

    def on_train_end(self, trainer, pl_module):
        pass  # see on_fit_end

    def on_fit_end(self, trainer, pl_module):
        if self._average_model is not None and self.started and not self._holds_ema:
            self._swap(pl_module)  # the module now holds the EMA weights; the average keeps the raw ones

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if self._average_model is None or not self.started:
            return  # nothing averaged yet: a plain checkpoint (state_dict = the raw weights)
        if not self._holds_ema:
            return super().on_save_checkpoint(trainer, pl_module, checkpoint)
        # after fit the module holds the EMA weights (already in state_dict), the average the raw ones
        average = self._average_model.state_dict()
        checkpoint["current_model_state"] = {k[7:]: v for k, v in average.items() if k.startswith("module.")}
        checkpoint["averaging_state"] = {k: v for k, v in average.items() if not k.startswith("module.")}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        if self._average_model is not None and "current_model_state" not in checkpoint:
            # written before the first update, or without EMA: the average starts from these weights
            self._average_model.module.load_state_dict(checkpoint["state_dict"], strict=False)
            return
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        self._holds_ema = False
