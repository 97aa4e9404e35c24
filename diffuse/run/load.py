"""From a checkpoint to objects: a whole run rebuilt from one file, or weights checked and loaded into a
module built from the config (a resume, a student started from another run)."""

from __future__ import annotations

from omegaconf import OmegaConf

from diffuse.errors import DiffuseError
from diffuse.run.build import build_module
from diffuse.run.callbacks.ema import inference_state_dict
from diffuse.run.checkpoint import checkpoint_tokenizer, read_checkpoint, stored_config


def load_run(ckpt_path: str, map_location="cpu", key: str = "ckpt"):
    """(config, tokenizer, DiffusionLM) rebuilt from one checkpoint file, weights loaded, eval mode.
    `key` is the config key that named the file (`ckpt`, `judge`, …), for the error messages."""
    ckpt = read_checkpoint(ckpt_path, key, map_location)
    meta = ckpt.get("diffuse")
    if not meta or not meta.get("tokenizer"):
        raise DiffuseError(f"{key}={ckpt_path} was not written by diffuse (no config/tokenizer inside)")
    config = stored_config(ckpt)
    cfg = OmegaConf.create(config)
    tokenizer = checkpoint_tokenizer(ckpt, ckpt_path)
    # a distilled student samples and evaluates without its teacher
    module = build_module(cfg, tokenizer, run_config=config, sampler_origin="the checkpoint", inference=True)
    module.load_state_dict(inference_state_dict(ckpt))  # the EMA weights when the run averaged them (callbacks=ema)
    module.eval()
    return cfg, tokenizer, module


def state_dict_misfit(mine: dict, theirs: dict) -> str | None:
    """None when `theirs` has exactly `mine`'s tensors and shapes; else a count of what differs and one example."""
    missing, extra = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
    shapes = sorted(k for k in set(mine) & set(theirs) if tuple(mine[k].shape) != tuple(theirs[k].shape))
    if not (missing or extra or shapes):
        return None
    first = (shapes or missing or extra)[0]
    return f"{len(missing)} missing, {len(extra)} unexpected, {len(shapes)} reshaped tensors, e.g. {first}"


def check_checkpoint_fits(module, ckpt: dict, ckpt_path: str) -> None:
    """Make sure a checkpoint's weights and objective fit `module`; one line names what differs. Objectives
    that share a backbone (masked_discrete, autoregressive, llada) have the same tensors, so a resume under
    another objective would fit the weights while continuing the optimizer and step count under another loss."""
    trained = (stored_config(ckpt).get("objective") or {}).get("name")
    given = module.objective.registry_name
    if trained and trained != given:
        raise DiffuseError(f"checkpoint {ckpt_path} was trained with objective={trained}, not objective={given}; "
                           f"a resume continues the same run: use objective={trained}")
    distilled = (stored_config(ckpt).get("distill") or {}).get("name")
    distilling = module.distiller.registry_name if module.distiller is not None else None
    if distilled != distilling:  # a round resumed as plain training would continue under another loss and lr
        raise DiffuseError(
            f"checkpoint {ckpt_path} is a round of diffuse.distill (method={distilled}): resume it by running the same "
            "python -m diffuse.distill command again (it continues unfinished rounds)" if distilled else
            f"checkpoint {ckpt_path} is not a diffuse.distill round: method={distilling} cannot resume it")
    misfit = state_dict_misfit(module.state_dict(), ckpt.get("state_dict", {}))
    if misfit:
        raise DiffuseError(f"checkpoint {ckpt_path} was written by another config ({misfit}); "
                           f"use the config it was trained with")


def load_weights(module, ckpt: dict, ckpt_path: str, key: str = "init_from") -> None:
    """Start `module` from a checkpoint's weights (its EMA weights when it kept them), nothing else: not its
    step, optimizer or objective. One line names what does not fit."""
    theirs = inference_state_dict(ckpt)
    misfit = state_dict_misfit(module.state_dict(), theirs)
    if misfit:
        raise DiffuseError(f"{key}={ckpt_path} does not fit this model ({misfit}); use its model config")
    module.load_state_dict(theirs)
