"""From a composed config to objects, through the registries. Shared by every entry point."""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf

from diffuse.contracts import (
    Backbone,
    ChecksBackbone,
    Distiller,
    Objective,
    Regularizer,
    Sampler,
    TrainsSelfConditioning,
    check_contract,
    is_self_conditioned,
)
from diffuse.data import TextDataModule
from diffuse.errors import DiffuseError
from diffuse.objectives.base import SpecialTokens
from diffuse.registry import DISTILLERS, MODELS, OBJECTIVES, REGULARIZERS, SAMPLERS
from diffuse.run.module import DiffusionLM
from diffuse.run.optim import check_optim
from diffuse.schedules import build_schedule

log = logging.getLogger("diffuse")

# the `data.*` keys of the DataModule (conf/data/_datamodule.yaml): TextDataModule's keywords, read off its signature
DATAMODULE_KEYS = TextDataModule.config_keys()


def as_dict(cfg) -> dict:
    if cfg is None:
        return {}
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def build_datamodule(cfg, seed: int, cache_dir: str):
    """`data.*` keys of the DataModule (DATAMODULE_KEYS) go to it; the rest (name, path, …) describe the text source."""
    data = as_dict(cfg.data)
    kwargs = {k: data.pop(k) for k in DATAMODULE_KEYS if k in data}
    return TextDataModule(source=data, tokenizer=as_dict(cfg.tokenizer), seed=seed, cache_dir=cache_dir, **kwargs)


def build_model(cfg, tokenizer):
    spec = as_dict(cfg.model)
    vocab = len(tokenizer)
    declared = spec.pop("vocab_size", None)
    if declared is not None and int(declared) != vocab:
        raise DiffuseError(f"model.vocab_size={declared} does not match the tokenizer's vocabulary of {vocab}")
    model = MODELS.build(spec, vocab_size=vocab)
    check_contract(model, Backbone, f"model={spec.get('name')}")
    return model


def build_objective(cfg, tokenizer):
    special = SpecialTokens.from_tokenizer(tokenizer)
    spec = as_dict(cfg.objective)
    objective = OBJECTIVES.build(spec, schedule=build_schedule(as_dict(cfg.schedule)), special=special)
    check_contract(objective, Objective, f"objective={spec.get('name')}")
    return objective


def regularizer_specs(cfg) -> list[dict]:
    """The `regularizer` group (one, or `none`) followed by the `regularizers` list (any number)."""
    specs = [as_dict(cfg.get("regularizer"))] + [as_dict(s) for s in (cfg.get("regularizers") or [])]
    return [s for s in specs if s and s.get("name") not in (None, "none")]


def build_regularizers(cfg) -> list:
    regularizers = []
    for spec in regularizer_specs(cfg):
        regularizers.append(REGULARIZERS.build(spec))
        check_contract(regularizers[-1], Regularizer, f"regularizer={spec['name']}")
    return regularizers


def build_distiller(cfg, objective):
    """`distill` (written by diffuse.distill into each round's config): the method and its teacher; None
    when the run trains the objective itself."""
    spec = as_dict(cfg.get("distill"))
    if not spec:
        return None
    distiller = DISTILLERS.build(spec, objective=objective)
    check_contract(distiller, Distiller, f"method={spec.get('name')}")
    return distiller


def sampler_fits(sampler_cls, objective) -> bool:
    return objective.process in sampler_cls.processes


def build_sampler(spec: dict | None, objective):
    """The configured sampler, or the objective's own (`default_sampler`) when the config names none.
    A sampler whose reverse process is not the objective's, or that needs a capability of the objective
    (`requires`: Protocols of diffuse/contracts.py) the objective lacks, is refused in one line."""
    spec = dict(spec or {})
    spec.setdefault("name", objective.default_sampler)
    cls = SAMPLERS.get(spec["name"])
    check_contract(cls, Sampler, f"sampler={spec['name']}")
    if not sampler_fits(cls, objective):
        raise DiffuseError(
            f"sampler={spec['name']} decodes {'/'.join(cls.processes)} processes, but objective="
            f"{objective.registry_name} runs a {objective.process} process; use sampler={objective.default_sampler}"
        )
    for capability in cls.requires:  # what the sampler calls beyond the Objective contract
        check_contract(objective, capability, f"sampler={spec['name']}'s objective={objective.registry_name}")
    return SAMPLERS.build(spec)


def build_module(cfg, tokenizer, run_config: dict[str, Any] | None = None, sampler_origin: str | None = None,
                 inference: bool = False):
    """`sampler_origin`: None when the user named the sampler (one that does not fit the objective is refused in
    one line); else where the config's sampler came from ("the checkpoint", "the config"): a sampler the user did
    not name never blocks a run — one that does not fit is replaced by the objective's own, said in one line and
    recorded in `run_config`. `inference`: for sampling and evaluation, without what only training needs (a
    distillation teacher)."""
    backbone = build_model(cfg, tokenizer)
    objective = build_objective(cfg, tokenizer)
    if isinstance(objective, ChecksBackbone):  # an objective that needs more of the backbone says so in one line
        objective.check_backbone(backbone, as_dict(cfg.model).get("name"))
    if is_self_conditioned(backbone) and not isinstance(objective, TrainsSelfConditioning):
        raise DiffuseError(f"objective={objective.registry_name} does not train self-conditioning: set "
                           "model.self_condition=false (objective=masked_discrete, llada and uniform train it)")
    declared, used = getattr(backbone, "mask_token_id", None), getattr(getattr(objective, "special", None), "mask", None)
    if declared is not None and used is not None and declared != used:  # a pretrained diffusion model's own [MASK]
        raise DiffuseError(f"model.mask_token_id={declared} is not the [MASK] the objective uses (id {used}: the "
                           "tokenizer's, or objective.mask_token_id); use the model's own tokenizer folder")
    sampler_cfg = as_dict(cfg.get("sampler"))
    if (sampler_origin and sampler_cfg.get("name")
            and not sampler_fits(SAMPLERS.get(sampler_cfg["name"]), objective)):
        log.warning("sampler=%s (from %s) does not decode objective=%s's %s process; using sampler=%s",
                    sampler_cfg["name"], sampler_origin, objective.registry_name, objective.process,
                    objective.default_sampler)
        sampler_cfg = {}
        if run_config is not None:
            run_config["sampler"] = {}  # what was used: the objective's own
    optim = as_dict(cfg.get("optim"))
    check_optim(optim)
    optim.setdefault("total_steps", cfg.trainer.get("max_steps") if "trainer" in cfg else None)
    return DiffusionLM(
        backbone=backbone,
        objective=objective,
        regularizers=build_regularizers(cfg),
        optim=optim,
        seed=int(cfg.get("seed", 0)),
        sampler=build_sampler(sampler_cfg, objective),
        tokenizer=tokenizer,
        run_config=run_config,
        distiller=None if inference else build_distiller(cfg, objective),
    )
