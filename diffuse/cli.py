"""What the entry points (sample, evaluate, compare, export) share: the device, the sampler spec, and
the `data.*` keys given on the command line. Entry points import this, never each other."""

from __future__ import annotations

import inspect

import torch
from hydra.core.hydra_config import HydraConfig

from diffuse.build import as_dict
from diffuse.errors import DiffuseError
from diffuse.registry import SAMPLERS

SHORTHANDS = ("steps", "temperature")  # `steps=32` on the command line means `sampler.steps=32`


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DiffuseError("device=cuda but no CUDA device is available; use device=cpu")
    return torch.device(name)


def sampler_spec(cfg, train_cfg, objective, shorthands=SHORTHANDS) -> dict:
    """The command line's sampler, else the one the checkpoint was trained with, else the objective's own;
    shorthands (`steps=…`, `temperature=…`) apply where the sampler has that knob (an AR sampler has no steps)."""
    spec = as_dict(cfg.get("sampler")) or as_dict(train_cfg.get("sampler"))
    spec.setdefault("name", objective.default_sampler)
    accepted = inspect.signature(SAMPLERS.get(spec["name"])).parameters
    for key in shorthands:
        if cfg.get(key) is not None and key in accepted:
            spec[key] = cfg[key]
    return spec


def overridden_data_keys() -> set[str]:
    """`data.*` keys set on the command line (they win over the checkpoint's DataModule settings)."""
    keys = (o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task)
    return {k.removeprefix("data.") for k in keys if k.startswith("data.")}
