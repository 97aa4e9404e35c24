"""From a composed config to objects, through the registries. Shared by every entry point."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from diffuse.errors import DiffuseError
from diffuse.objectives.base import SpecialTokens
from diffuse.registry import MODELS, OBJECTIVES, REGULARIZERS, SAMPLERS, load_all
from diffuse.schedules import build_schedule

DATAMODULE_KEYS = ("seq_len", "batch_size", "eval_batch_size", "pack", "add_bos", "add_eos", "num_workers", "train_tokens")


def as_dict(cfg) -> dict:
    if cfg is None:
        return {}
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def build_datamodule(cfg, seed: int, cache_dir: str):
    """`data.*` keys of the DataModule go to it; the rest (name, path, …) describe the text source."""
    load_all()
    from diffuse.data import TextDataModule

    data = as_dict(cfg.data)
    kwargs = {k: data.pop(k) for k in DATAMODULE_KEYS if k in data}
    return TextDataModule(source=data, tokenizer=as_dict(cfg.tokenizer), seed=seed, cache_dir=cache_dir, **kwargs)


def build_model(cfg, tokenizer):
    load_all()
    spec = as_dict(cfg.model)
    vocab = len(tokenizer)
    declared = spec.pop("vocab_size", None)
    if declared is not None and int(declared) != vocab:
        raise DiffuseError(f"model.vocab_size={declared} does not match the tokenizer's vocabulary of {vocab}")
    return MODELS.build(spec, vocab_size=vocab)


def build_objective(cfg, tokenizer):
    load_all()
    special = SpecialTokens.from_tokenizer(tokenizer)
    return OBJECTIVES.build(as_dict(cfg.objective), schedule=build_schedule(as_dict(cfg.schedule)), special=special)


def build_regularizers(cfg) -> list:
    load_all()
    spec = as_dict(cfg.get("regularizer"))
    return [] if not spec or spec.get("name") in (None, "none") else [REGULARIZERS.build(spec)]


def build_sampler(spec: dict | None, objective, announce=print):
    """The configured sampler when it fits the objective, else the objective's own default."""
    load_all()
    spec = dict(spec or {})
    if spec.get("name") and SAMPLERS.get(spec["name"]).compatible(objective):
        return SAMPLERS.build(spec)
    if spec.get("name"):
        announce(f"sampler={spec['name']} does not fit this objective; using sampler={objective.default_sampler}")
    shared = {k: spec[k] for k in ("temperature",) if k in spec}
    return SAMPLERS.build({"name": objective.default_sampler, **shared})


def build_module(cfg, tokenizer, run_config: dict[str, Any] | None = None):
    from diffuse.module import DiffusionLM

    backbone = build_model(cfg, tokenizer)
    objective = build_objective(cfg, tokenizer)
    optim = as_dict(cfg.get("optim"))
    optim.setdefault("total_steps", cfg.trainer.get("max_steps") if "trainer" in cfg else None)
    return DiffusionLM(
        backbone=backbone,
        objective=objective,
        regularizers=build_regularizers(cfg),
        optim=optim,
        seed=int(cfg.get("seed", 0)),
        sampler=build_sampler(as_dict(cfg.get("sampler")), objective, announce=lambda m: None),
        tokenizer=tokenizer,
        run_config=run_config,
    )


def check_checkpoint_fits(module, ckpt: dict, ckpt_path: str) -> None:
    """Make sure a checkpoint's weights fit `module`; one line names what differs."""
    mine = module.state_dict()
    theirs = ckpt.get("state_dict", {})
    missing = sorted(set(mine) - set(theirs))
    extra = sorted(set(theirs) - set(mine))
    shapes = sorted(k for k in set(mine) & set(theirs) if tuple(mine[k].shape) != tuple(theirs[k].shape))
    if missing or extra or shapes:
        first = (shapes or missing or extra)[0]
        raise DiffuseError(
            f"checkpoint {ckpt_path} was written by another config ({len(missing)} missing, {len(extra)} unexpected, "
            f"{len(shapes)} reshaped tensors, e.g. {first}); use the config it was trained with"
        )
