"""Every optimizer piece in one place: the `optim.*` keys checked before anything is built, the optimizer
(any `optim._target_`, AdamW by default) with its decay / no-decay groups, the warm-up + cosine learning-rate
schedule, and what a resume with changed keys does to a restored optimizer."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from hydra.utils import get_object, instantiate

from diffuse.errors import DiffuseError
from diffuse.registry import accepts_keyword

log = logging.getLogger("diffuse")

# optim keys that shape the learning-rate schedule; every other key (with `_target_`) builds the optimizer
LR_SCHEDULE_KEYS = ("warmup_steps", "min_lr_ratio", "total_steps")

# optim keys checked before the optimizer sees them (torch's own ValueError would surface at fit time as a
# traceback); keys the chosen optimizer does not take are left to it
OPTIM_RULES = {
    "lr": (lambda v: v > 0, "> 0"),
    "eps": (lambda v: v >= 0, "≥ 0"),
    "weight_decay": (lambda v: v >= 0, "≥ 0"),
    "warmup_steps": (lambda v: v >= 0 and float(v).is_integer(), "an integer ≥ 0"),
    "min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
}


def check_optim(optim: dict) -> None:
    """`optim.lr=-1` and friends: one line naming the key and value."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    for key, (ok, rule) in OPTIM_RULES.items():
        value = optim.get(key)
        if value is not None and not (number(value) and ok(value)):
            raise DiffuseError(f"optim.{key}={value} must be {'a number ' if 'integer' not in rule else ''}{rule}")
    betas = optim.get("betas")
    if betas is not None and not (isinstance(betas, (list, tuple)) and len(betas) == 2
                                  and all(number(b) and 0 <= b < 1 for b in betas)):
        raise DiffuseError(f"optim.betas={betas} must be two numbers in [0, 1)")


def target_accepts(target: str, name: str) -> bool:
    """Whether the class or function named `target` takes the keyword `name` (True when it cannot be
    resolved: the error then comes from instantiate, naming the target)."""
    try:
        obj = get_object(str(target))
    except Exception:
        return True
    return accepts_keyword(obj, name)


def build_optimizer(named_parameters, optim: dict):
    """(optimizer, LambdaLR): linear warm-up over `warmup_steps`, then cosine down to `min_lr_ratio` × lr at
    `total_steps`. The decay group takes the optimizer's weight_decay; norms, biases and embeddings take none."""
    o = dict(optim)
    decay, no_decay = [], []
    for name, p in named_parameters:
        if p.requires_grad:
            (decay if p.dim() >= 2 and "emb" not in name else no_decay).append(p)
    spec = {k: v for k, v in o.items() if k not in LR_SCHEDULE_KEYS}
    spec.setdefault("_target_", "torch.optim.AdamW")  # checkpoints written before optim._target_
    if "betas" in spec:
        spec["betas"] = tuple(spec["betas"])
    if "fused" in spec and not target_accepts(spec["_target_"], "fused"):
        spec.pop("fused")  # an optimizer without a fused kernel: run/callbacks/guard.py skips its bad steps with a host sync
    opt = instantiate(spec, [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], _convert_="all")
    warmup, total = int(o.get("warmup_steps", 0)), int(o.get("total_steps") or 0)
    min_ratio = float(o.get("min_lr_ratio", 0.1))

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / (total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)


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


def apply_changes(optimizers, lr_scheduler_configs, changes: dict[str, tuple[Any, Any]]) -> None:
    """Set the hyper-parameters a resume changed on a restored optimizer and scheduler (the restored state
    would otherwise keep the checkpoint's lr, betas, …)."""
    new = {k: value for k, (_, value) in changes.items() if k not in LR_SCHEDULE_KEYS}
    for opt in optimizers:
        for group in opt.param_groups:
            for key, value in new.items():
                if key == "weight_decay" and group.get("weight_decay") == 0.0:
                    continue  # the no-decay group (norms, biases, embeddings) stays at 0
                if key in group:
                    group[key] = tuple(value) if isinstance(group[key], tuple) else value
    if "lr" in new:
        for config in lr_scheduler_configs:
            sched = config.scheduler
            sched.base_lrs = [float(new["lr"])] * len(sched.base_lrs)
            for group, lr in zip(sched.optimizer.param_groups, _current_lrs(sched)):
                group["lr"] = lr


def _current_lrs(sched) -> list[float]:
    """The lr each group has at the scheduler's current step under its (possibly new) base lr."""
    if not isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
        return [g["lr"] for g in sched.optimizer.param_groups]
    return [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
