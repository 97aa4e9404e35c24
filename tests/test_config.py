"""Config composition: every option of every group, every recipe, and `--cfg job`.

Options and recipes are found by listing the yaml files, so a new one is covered without editing
this file. A config that needs a required value (`???`) gets one from REQUIRED.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from conftest import run_cli
from diffuse.run.build import DATAMODULE_KEYS
from diffuse.core.paths import CONFIG_DIR
from diffuse.registry import DATASETS, DISTILLERS, MODELS, OBJECTIVES, REGULARIZERS, SAMPLERS, SCHEDULES, TOKENIZERS

CONF = Path(CONFIG_DIR)
REQUIRED = {("tokenizer", "hf"): ["tokenizer.path=/path/to/tokenizer"]}
REGISTRY_OF = {"model": MODELS, "objective": OBJECTIVES, "regularizer": REGULARIZERS, "schedule": SCHEDULES,
               "sampler": SAMPLERS, "tokenizer": TOKENIZERS, "data": DATASETS, "method": DISTILLERS}
# keyword arguments the builders pass at runtime (not from the yaml)
RUNTIME_KEYS = {"model": {"vocab_size"}, "objective": {"schedule", "special"},
                "method": {"objective", "teacher", "student_steps", "trajectories"}}
# groups of another entry point than diffuse.train: (its config, what it requires)
ENTRY_OF = {"method": ("distill", ["teacher=/path/to/teacher.ckpt"])}

GROUPS = sorted(d.name for d in CONF.iterdir() if d.is_dir() and any(d.glob("*.yaml")))
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]
RECIPES = [o for g, o in OPTIONS if g == "recipe"]


def compose_train(overrides: list[str], entry: str = "train"):
    """Compose like `python -m diffuse.<entry> overrides…` and resolve every interpolation."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(entry, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = "/tmp/diffuse-compose-test"  # what ${hydra:runtime.output_dir} reads
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    missing = OmegaConf.missing_keys(cfg)
    assert not missing, f"{overrides} leaves required values unset: {missing} (give one in REQUIRED)"
    OmegaConf.resolve(cfg)
    return cfg


def test_groups_found():
    assert {"model", "objective", "schedule", "data", "tokenizer", "sampler", "recipe", "debug"} <= set(GROUPS)


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes(group, option):
    # the debug preset claims to work with any model and objective: check it does on those groups
    debug = ["debug=default"] if group in ("model", "objective") else []
    entry, required = ENTRY_OF.get(group, ("train", []))
    cfg = compose_train([f"{group}={option}", *REQUIRED.get((group, option), []), *required, *debug], entry)
    registry = REGISTRY_OF.get(group)
    node = cfg.get(group)
    if registry is None or node is None or "name" not in node:
        return
    spec = OmegaConf.to_container(node)
    name = spec.pop("name")
    if group == "regularizer" and name == "none":
        return
    cls = registry.get(name)  # the yaml names a registered component
    if group == "data":
        spec = {k: v for k, v in spec.items() if k not in DATAMODULE_KEYS}
    spec = {k: v for k, v in spec.items() if k not in getattr(cls, "plan_keys", ())}  # read by the round plan
    params = inspect.signature(cls).parameters
    runtime = {k: None for k in RUNTIME_KEYS.get(group, ()) if k in params}
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = set(spec) - set(params)
        assert not unknown, f"{group}={option}: {cls.__name__} does not accept {sorted(unknown)}"
    inspect.signature(cls).bind(**{**spec, **runtime})  # no required argument is left out


def recipe_parts(name: str) -> tuple[list[str], dict]:
    """(group overrides, body) of a recipe, following recipes it builds on (`- llada`)."""
    raw = yaml.safe_load((CONF / "recipe" / f"{name}.yaml").read_text()) or {}
    overrides, body = [], {}
    for entry in raw.pop("defaults", []):
        if isinstance(entry, str) and entry != "_self_":  # another recipe
            parent_overrides, parent_body = recipe_parts(entry)
            overrides += parent_overrides
            body = OmegaConf.to_container(OmegaConf.merge(body, parent_body))
        elif isinstance(entry, dict):
            (key, value), = entry.items()
            overrides.append((key.split()[-1].strip("/"), value))
    return overrides, OmegaConf.to_container(OmegaConf.merge(body, raw))


def leaf_paths(node: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in node.items():
        path = f"{prefix}{k}"
        out += leaf_paths(v, path + ".") if isinstance(v, dict) and v else [path]
    return out


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_and_overrides_existing_options_and_keys(recipe):
    overrides, body = recipe_parts(recipe)
    for group, option in overrides:
        assert (CONF / group / f"{option}.yaml").is_file(), f"recipe={recipe} names {group}={option}: no such file"
    compose_train([f"recipe={recipe}"])
    base = compose_train([f"{g}={o}" for g, o in overrides])  # the same groups, without the recipe's values
    for path in leaf_paths(body):
        if path.startswith("hydra."):
            continue
        parent, _, key = path.rpartition(".")
        node = OmegaConf.select(base, parent) if parent else base
        assert node is not None and key in node, f"recipe={recipe} sets {path}, which no config defines (a typo?)"
    compose_train([f"recipe={recipe}", "debug=default"])  # the debug preset works on top of every recipe


def test_tdlm_recipe_is_what_its_comment_says():
    cfg = compose_train(["recipe=tdlm"])
    assert (cfg.model.name, cfg.objective.name, cfg.sampler.name) == ("transformer", "masked_discrete", "remask")
    assert cfg.model.d_model == 256 and cfg.model.n_layers == 6


def test_configs_ship_with_the_package():
    """`diffuse.conf` is a package of the wheel (setup.py), and CONFIG_DIR finds train.yaml."""
    assert (CONF / "train.yaml").is_file()
    setup = (CONF.parent / "setup.py").read_text() if (CONF.parent / "setup.py").is_file() else ""
    if setup:  # a checkout: the wheel maps conf/ to diffuse.conf with every yaml
        assert '"diffuse.conf": "conf"' in setup and "**/*.yaml" in setup


def test_cfg_job_prints_the_composed_config():
    proc = run_cli("diffuse.train", "--cfg", "job", "objective=autoregressive", "model.d_model=96")
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["objective"]["name"] == "autoregressive" and cfg["model"]["d_model"] == 96
    assert {"model", "objective", "schedule", "data", "tokenizer", "sampler", "optim", "trainer"} <= set(cfg)
    assert "hydra" not in cfg
