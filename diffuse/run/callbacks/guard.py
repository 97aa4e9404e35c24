"""A diverging run stops instead of training on NaN, and no checkpoint ever holds non-finite weights.

`NonFiniteGuard` (a callback, `callbacks.nonfinite_guard` in conf/callbacks/default.yaml):

- **Detect, on the device.** `on_before_backward` keeps `bad |= ~isfinite(loss)` (every micro-batch);
  `on_before_optimizer_step` — after backward, before Lightning clips the gradients and before the update —
  adds `~isfinite(‖grad‖)` (the pre-clipping norm of the optimizer's gradients, logged as `train/grad_norm`).
- **Skip the step.** An optimizer that honours torch's `found_inf` protocol (`_step_supports_amp_scaling`:
  torch's AdamW / Adam / SGD / Adagrad with `fused=True`, the default in conf/optim/adamw.yaml) gets
  `optimizer.found_inf = bad`: the fused kernel then leaves the weights, the moments and the step counts exactly as
  they were, with no host sync — from its first finite step on (before it, torch has not created the optimizer
  state yet, and fused SGD would keep uninitialised momentum buffers from a skipped first step: those first steps
  are decided on the host, usually one sync per run). Any other optimizer costs one host sync per step
  (`bad.item()`, what torch's GradScaler does for such optimizers) and, when bad, gets every gradient set to None:
  torch optimizers leave a parameter without a gradient untouched, its state included. The learning-rate schedule and `global_step` advance
  on a skipped step (as they do under AMP's GradScaler). With `precision=16-mixed` the GradScaler owns `found_inf`
  (it skips steps whose gradients are non-finite) and the guard only counts.
- **Count and stop.** Counters stay on the device (steps skipped, the current streak, its first step, loss and
  gradient norm). The host reads them every `check_every_n_steps` (the logging interval), before validation, before
  every checkpoint and at the end of training: `train/skipped_steps` is logged, and after `max_consecutive`
  non-finite steps in a row the run stops with a `DiffuseError` naming the steps and the values (the train entry
  point prints it as one line and exits 2). A trip is never written to a checkpoint.

`check_finite_checkpoint` (called by `DiffusionLM.on_save_checkpoint`, so it holds whatever callbacks are
configured) refuses to write a checkpoint whose weights (raw or averaged) are not finite. `FiniteModelCheckpoint`
is Lightning's ModelCheckpoint that never records a non-finite monitored value: `best.ckpt` never points at a NaN
validation (Lightning's own turns NaN into ±inf and saves it while it has fewer than `save_top_k` files). With
`every_n_seconds` it also writes `last.ckpt` when that many seconds passed since its last write, whichever of that
and `every_n_train_steps` comes first (Lightning's `train_time_interval` excludes the step interval), so a run
killed early (`kill -9`) still resumes (`callbacks.last_checkpoint` in conf/callbacks/default.yaml).
"""

from __future__ import annotations

import logging
import math
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from diffuse.errors import DiffuseError

log = logging.getLogger("diffuse")


def supports_found_inf(optimizer) -> bool:
    """Whether `optimizer.step()` reads `optimizer.found_inf` and skips its update when it is 1 (the contract
    torch.amp.GradScaler relies on). torch's optimizers honour it only in their fused kernel: every param group must
    say `fused` (a restored optimizer state can change that)."""
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return False
    return all(group.get("fused", True) for group in optimizer.param_groups)


class NonFiniteGuard(L.Callback):
    def __init__(self, max_consecutive: int = 10, check_every_n_steps: int | None = None):
        if int(max_consecutive) < 1:
            raise DiffuseError(f"callbacks.nonfinite_guard.max_consecutive={max_consecutive}: must be ≥ 1")
        self.max_consecutive = int(max_consecutive)
        self.check_every_n_steps = check_every_n_steps
        # host copies: what a checkpoint carries and a resumed run starts from
        self._saved = {"skipped": 0, "consecutive": 0, "streak_start": -1, "streak_loss": math.nan,
                       "streak_grad_norm": math.nan}
        self._t: dict[str, torch.Tensor] | None = None  # the device counters
        self._bad_loss: torch.Tensor | None = None
        self._last_loss: torch.Tensor | None = None
        self._grad_norm: torch.Tensor | None = None
        self._found: dict[int, torch.Tensor] = {}  # per fused optimizer, once it has stepped: the found_inf it reads
        self._announced: set[int] = set()

    # -- device state ------------------------------------------------------------------------------
    def _init_device(self, device):
        s = self._saved
        self._t = {
            "skipped": torch.tensor(s["skipped"], dtype=torch.long, device=device),
            "consecutive": torch.tensor(s["consecutive"], dtype=torch.long, device=device),
            "tripped": torch.tensor(s["consecutive"] >= self.max_consecutive, device=device),
            "streak_start": torch.tensor(s["streak_start"], dtype=torch.long, device=device),
            "streak_loss": torch.tensor(s["streak_loss"], dtype=torch.float32, device=device),
            "streak_grad_norm": torch.tensor(s["streak_grad_norm"], dtype=torch.float32, device=device),
        }
        self._bad_loss = torch.zeros((), dtype=torch.bool, device=device)
        self._last_loss = torch.full((), math.nan, dtype=torch.float32, device=device)

    def on_train_start(self, trainer, pl_module):
        self._init_device(pl_module.device)

    # -- every step, on the device -------------------------------------------------------------------
    def on_before_backward(self, trainer, pl_module, loss):
        if self._t is None:
            return
        loss = loss.detach()
        self._bad_loss = self._bad_loss | ~torch.isfinite(loss)
        self._last_loss = loss.float() * trainer.accumulate_grad_batches  # Lightning divided it

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self._t is None:
            return
        t = self._t
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = (torch.nn.utils.get_total_norm(grads).float() if grads
                else torch.zeros((), device=t["skipped"].device))
        bad = self._bad_loss | ~torch.isfinite(norm)
        if trainer.world_size > 1:  # every rank skips the same steps
            bad = trainer.strategy.reduce(bad.float(), reduce_op="max") > 0
        starts = bad & (t["consecutive"] == 0) & ~t["tripped"]  # a streak begins here (frozen once tripped)
        t["consecutive"] = torch.where(bad, t["consecutive"] + 1, 0)
        t["skipped"] = t["skipped"] + bad
        t["streak_start"] = torch.where(starts, trainer.global_step, t["streak_start"])
        t["streak_loss"] = torch.where(starts, self._last_loss, t["streak_loss"])
        t["streak_grad_norm"] = torch.where(starts, norm, t["streak_grad_norm"])
        t["tripped"] = t["tripped"] | (t["consecutive"] >= self.max_consecutive)
        self._grad_norm = norm
        self._bad_loss = torch.zeros_like(self._bad_loss)

        fused = supports_found_inf(optimizer)  # decided every step: python attribute look-ups
        if fused and id(optimizer) in self._found:
            self._found[id(optimizer)].copy_(bad)
            optimizer.found_inf = self._found[id(optimizer)]  # read by the fused kernel after this hook and clipping
            return
        if not fused:
            if self._found.pop(id(optimizer), None) is not None and hasattr(optimizer, "found_inf"):
                del optimizer.found_inf  # no longer fused: torch's other code paths refuse found_inf
            if id(optimizer) not in self._announced:
                self._announced.add(id(optimizer))
                log.info("non-finite guard: %s does not read found_inf (torch's fused optimizers do: optim.fused=true),"
                         " so skipping a non-finite step costs one host sync per step", type(optimizer).__name__)
        # The host decides: every step of an optimizer without found_inf, and a fused one's steps until one is finite
        # (torch creates optimizer state on the first step, and fused SGD would keep the uninitialised momentum
        # buffers of a skipped first step). Skipping = no gradients: torch optimizers leave such a parameter untouched.
        if bool(bad):
            optimizer.zero_grad(set_to_none=True)
        elif fused:
            self._found[id(optimizer)] = torch.zeros((), device=bad.device)

    # -- on the host, now and then ---------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        every = self.check_every_n_steps or trainer.log_every_n_steps
        if self._t is None or trainer.global_step % max(1, int(every)):
            return
        pl_module.log("train/skipped_steps", self._t["skipped"].float(), on_step=True, on_epoch=False)
        if self._grad_norm is not None:
            pl_module.log("train/grad_norm", self._grad_norm, on_step=True, on_epoch=False)
        self.check()

    def on_validation_start(self, trainer, pl_module):
        self.check()

    def on_train_end(self, trainer, pl_module):
        self.check()
        skipped = int(self._t["skipped"]) if self._t is not None else 0
        if skipped:
            log.warning("%d optimizer step(s) skipped: non-finite loss or gradient norm (train/skipped_steps)", skipped)
        for opt in trainer.optimizers:  # leave the optimizer as configure_optimizers made it
            if self._found.pop(id(opt), None) is not None and hasattr(opt, "found_inf"):
                del opt.found_inf

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.check()  # a tripped run writes nothing more

    def check(self):
        """Raise when `max_consecutive` steps in a row were non-finite (one host read)."""
        if self._t is None or not bool(self._t["tripped"]):
            return
        s = self._host()
        first = s["streak_start"]
        raise DiffuseError(
            f"training diverged: loss or gradient norm non-finite for {self.max_consecutive} optimizer steps in a row, "
            f"steps {first}–{first + self.max_consecutive - 1} (step {first}: loss {s['streak_loss']:.4g}, gradient "
            f"norm {s['streak_grad_norm']:.4g}); those steps were skipped and no checkpoint holds them — lower optim.lr "
            f"or raise callbacks.nonfinite_guard.max_consecutive")

    # -- checkpoints -----------------------------------------------------------------------------------
    def _host(self) -> dict:
        if self._t is None:
            return dict(self._saved)
        values = torch.stack([v.double() for k, v in self._t.items() if k != "tripped"]).cpu().tolist()
        out = dict(zip([k for k in self._t if k != "tripped"], values))
        for k in ("skipped", "consecutive", "streak_start"):
            out[k] = int(out[k])
        return out

    def state_dict(self):
        return self._host()

    def load_state_dict(self, state_dict):
        self._saved.update({k: state_dict[k] for k in self._saved if k in state_dict})
        self._t = None  # rebuilt on the device at train start


def check_finite_checkpoint(checkpoint: dict) -> None:
    """Raise instead of writing non-finite weights: `state_dict` and, with EMA, `current_model_state` (one host
    sync per device, at save time)."""
    for key in ("state_dict", "current_model_state"):
        weights = {k: v for k, v in (checkpoint.get(key) or {}).items()
                   if isinstance(v, torch.Tensor) and v.is_floating_point()}
        by_device: dict[torch.device, list[str]] = {}
        for name, v in weights.items():
            by_device.setdefault(v.device, []).append(name)
        for names in by_device.values():
            ok = torch.stack([torch.isfinite(weights[n]).all() for n in names]).cpu()
            if not bool(ok.all()):
                bad = [n for n, fine in zip(names, ok.tolist()) if not fine]
                more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
                raise DiffuseError(f"refusing to write a checkpoint at step {checkpoint.get('global_step')}: "
                                   f"non-finite weights in {key}[{bad[0]!r}]{more}; the run diverged — lower optim.lr")


class FiniteModelCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that never records a non-finite monitored value (NaN / ±inf validation).

    `every_n_seconds`: also write `last` (only: no top-k file) at the end of an optimizer step when this many seconds
    passed since this callback's last write or the start of training — "every N steps or every T seconds, whichever
    comes first". Written like every checkpoint (AtomicCheckpointIO: the old file or the new one). One process checks
    the clock every step; several decide on rank 0 every `trainer.log_every_n_steps` steps (one broadcast)."""

    def __init__(self, *args, every_n_seconds: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if every_n_seconds is not None:
            if not (float(every_n_seconds) > 0 and math.isfinite(float(every_n_seconds))):
                raise DiffuseError(f"every_n_seconds={every_n_seconds}: must be a positive number of seconds (or null)")
            if not self.save_last:
                raise DiffuseError(f"every_n_seconds={every_n_seconds} writes last.ckpt: it needs save_last: true")
        self.every_n_seconds = None if every_n_seconds is None else float(every_n_seconds)
        self._last_write: float | None = None  # time.monotonic() of this callback's last write (or train start)
        self._stepped_at: int | None = None  # global_step at the previous batch end: a new one means a step was taken

    def check_monitor_top_k(self, trainer, current=None):
        if current is not None and not bool(torch.isfinite(torch.as_tensor(current)).all()):
            log.warning("%s=%s at step %d: %s not updated", self.monitor, float(current), trainer.global_step,
                        f"{self.filename}{self.FILE_EXTENSION}" if self.filename else "the best checkpoint")
            return False
        return super().check_monitor_top_k(trainer, current)

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        self._last_write = time.monotonic()
        self._stepped_at = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # every_n_train_steps, as Lightning
        stepped, self._stepped_at = trainer.global_step != self._stepped_at, trainer.global_step
        if self.every_n_seconds is None or not stepped or self._should_skip_saving_checkpoint(trainer):
            return  # no interval; mid-accumulation (no optimizer step yet); or written at this step already
        if self._last_write is None:
            self._last_write = time.monotonic()
        due = time.monotonic() - self._last_write >= self.every_n_seconds
        if trainer.world_size > 1:  # every rank must take part in a save: rank 0's clock decides, now and then
            if trainer.global_step % max(1, int(trainer.log_every_n_steps or 1)):
                return
            due = trainer.strategy.broadcast(due)
        if due:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self._last_write = time.monotonic()  # the interval counts from the end of any write of this callback

    @property
    def state_key(self) -> str:  # Lightning's own key: a run written with ModelCheckpoint resumes its best score
        return "ModelCheckpoint" + super().state_key[len(type(self).__qualname__):]
