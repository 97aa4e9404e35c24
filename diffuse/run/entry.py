"""What the entry points (sample, evaluate, compare, export) share: the device, the sampler spec, and
the `data.*` keys given on the command line. Entry points import this, never each other."""

from __future__ import annotations

import functools
import logging
import sys

import torch
from hydra.core.hydra_config import HydraConfig

from diffuse.errors import DiffuseError
from diffuse.registry import SAMPLERS, accepts_keyword
from diffuse.run.build import as_dict
from diffuse.run.load import load_run
from diffuse.sampling.drafters import drafter_from

log = logging.getLogger("diffuse")

SHORTHANDS = ("steps", "temperature")  # `steps=32` on the command line means `sampler.steps=32`


def sampler_knobs(main):
    """Outermost decorator of an entry point: `sampler.<key>=…` on the command line sets a knob of the chosen
    sampler, or of the checkpoint's own when none is chosen (`sampler: {}` in the yaml, which Hydra's struct
    mode would refuse to extend). Rewritten as Hydra's add-or-override `++sampler.<key>=…`; a key the sampler
    does not take is then refused in one line by its registry."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        sys.argv = [f"++{a}" if a.startswith("sampler.") else a for a in sys.argv]
        return main(*args, **kwargs)

    return wrapper


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DiffuseError("device=cuda but no CUDA device is available; use device=cpu")
    try:
        return torch.device(name)
    except RuntimeError:  # torch's message lists ~20 device types: name ours
        raise DiffuseError(f"device={name} is not a device: use device=auto, cpu or cuda") from None


def sampler_spec(cfg, train_cfg, objective, shorthands=SHORTHANDS) -> dict:
    """The command line's sampler (`sampler=<name>`), else the one the checkpoint was trained with, else the
    objective's own. `sampler.<key>=…` without `sampler=<name>` are knobs of that sampler (the checkpoint's own);
    shorthands (`steps=…`, `temperature=…`) apply where the sampler has that knob (an AR sampler has no steps)."""
    given = as_dict(cfg.get("sampler"))
    spec = given if "name" in given else {**as_dict(train_cfg.get("sampler")), **given}
    spec.setdefault("name", objective.default_sampler)
    sampler_cls = SAMPLERS.get(spec["name"])
    for key in shorthands:
        if cfg.get(key) is not None and accepts_keyword(sampler_cls, key):
            spec[key] = cfg[key]
    if isinstance(spec.get("drafter"), str):  # sampler=speculative: a drafter checkpoint, loaded here (run layer)
        spec["drafter"] = load_drafter(spec["drafter"])
    return spec


def load_drafter(path: str):
    """`sampler.drafter=CKPT`: the checkpoint as an eval-mode drafter (sampling/speculative.py); the sampler
    checks its tokenizer against the target's."""
    _, _, module = load_run(path, key="sampler.drafter")
    return drafter_from(module.backbone, module.objective)


def check_context(train_cfg, prompts: list[list[int]], length: int, beyond: bool = False, sampler=None) -> None:
    """BOS + the longest prompt + `length` must fit the checkpoint's trained `data.seq_len`. A sampler (class
    or instance) with `any_length` (block-causal decoding) may run past it: a warning, as with `beyond`."""
    beyond = beyond or (sampler is not None and sampler.any_length)
    seq_len = (train_cfg.get("data") or {}).get("seq_len")
    longest = max(map(len, prompts), default=0)
    need = 1 + longest + length
    if not seq_len or need <= int(seq_len):
        return
    what = f"BOS + a {longest}-token prompt + length={length}" if longest else f"BOS + length={length}"
    if beyond:
        log.warning("%s = %d positions, past the %d the model was trained on (data.seq_len): quality unknown",
                    what, need, seq_len)
        return
    raise DiffuseError(f"{what} = {need} positions, past the model's trained context of data.seq_len={seq_len}; "
                       f"ask for fewer tokens, or pass +beyond_context=true to sample there anyway (quality unknown)")


def named_on_command_line(group: str) -> bool:
    """Whether the command line set `group=…` or one of its keys (True outside a Hydra app: the caller chose)."""
    if not HydraConfig.initialized():
        return True
    return any(k == group or k.startswith(f"{group}.") for k in command_line_keys())


def overridden_data_keys() -> set[str]:
    """`data.*` keys set on the command line (they win over the checkpoint's DataModule settings)."""
    return {k.removeprefix("data.") for k in command_line_keys() if k.startswith("data.")}


def command_line_keys() -> list[str]:
    """The keys the command line's overrides set (`+`, `++` and `~` stripped)."""
    return [o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task]
