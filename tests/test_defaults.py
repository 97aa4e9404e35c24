"""Python defaults equal their yaml: a component built from Python alone is the one conf/ describes.

For every registered component of every registry with a yaml conf/<group>/<name>.yaml, each key that yaml
sets is compared with the Python default of that keyword, where the class has one (tests/test_decode_loop.py
does the same, more strictly, for the samplers). The DataModule's keys (conf/data/_datamodule.yaml, composed
by every data option) are compared with TextDataModule's defaults.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from diffuse.core.paths import CONFIG_DIR
from diffuse.data import TextDataModule
from diffuse.registry import DATASETS, DISTILLERS, MODELS, OBJECTIVES, REGULARIZERS, SAMPLERS, SCHEDULES, TOKENIZERS
from diffuse.run.build import DATAMODULE_KEYS

CONF = Path(CONFIG_DIR)
REGISTRY_OF = {"model": MODELS, "objective": OBJECTIVES, "regularizer": REGULARIZERS, "schedule": SCHEDULES,
               "sampler": SAMPLERS, "tokenizer": TOKENIZERS, "data": DATASETS, "method": DISTILLERS}
COMPONENTS = [(group, name) for group, registry in REGISTRY_OF.items() for name in registry.names()
              if (CONF / group / f"{name}.yaml").is_file()]
# (group, name): {key: why}: known differences outside the data side, reported and left for their owners
KNOWN = {
    ("model", "hf"): {"config": "model=hf: models/hf.py HFCausalLM(config=None) vs conf/model/hf.yaml's tiny Llama "
                                "config; built from Python alone (no base_model) it fails for want of "
                                "model.config.model_type"},
    ("model", "diffusion_gemma"): {"config": "model=diffusion_gemma: models/diffusion_gemma.py (config=None) vs "
                                             "the yaml's tiny text config; built from Python alone it needs "
                                             "model.path or model.config"},
}


def plain(value):
    """yaml has lists where Python writes tuples."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def yaml_keys(group: str, name: str) -> dict:
    """The keys conf/<group>/<name>.yaml sets for the component (its own node of a `_global_` file)."""
    text = (CONF / group / f"{name}.yaml").read_text()
    spec = yaml.safe_load(text) or {}
    if "@package _global_" in text:
        spec = spec.get(group) or {}
    spec.pop("defaults", None)
    assert spec.pop("name", name) == name
    return {k: v for k, v in spec.items() if not (isinstance(v, str) and v.startswith("${"))}  # interpolations


def python_defaults(obj) -> dict:
    return {k: p.default for k, p in inspect.signature(obj).parameters.items() if p.default is not inspect.Parameter.empty}


def mismatches(spec: dict, defaults: dict) -> dict:
    return {k: (defaults[k], v) for k, v in spec.items() if k in defaults and plain(defaults[k]) != plain(v)}


def test_every_registry_has_components_with_yamls():
    assert {g for g, _ in COMPONENTS} == set(REGISTRY_OF)
    assert ("tokenizer", "bpe") in COMPONENTS and ("data", "sft") in COMPONENTS


@pytest.mark.parametrize("group,name", COMPONENTS, ids=[f"{g}={n}" for g, n in COMPONENTS])
def test_python_defaults_equal_the_yaml(group, name):
    spec = yaml_keys(group, name)
    wrong = mismatches(spec, python_defaults(REGISTRY_OF[group].get(name)))
    known = KNOWN.get((group, name), {})
    assert {k: v for k, v in wrong.items() if k not in known} == {}, f"{group}={name}: (python, yaml)"
    assert set(known) <= set(wrong), f"{group}={name}: {sorted(set(known) - set(wrong))} agree now: drop from KNOWN"
    if known:
        pytest.xfail(reason="; ".join(known.values()))


def test_the_datamodule_keys_are_one_yaml_and_its_defaults():
    spec = yaml.safe_load((CONF / "data" / "_datamodule.yaml").read_text())
    assert tuple(spec) == DATAMODULE_KEYS == TextDataModule.config_keys()
    assert mismatches(spec, python_defaults(TextDataModule)) == {}
    assert set(python_defaults(TextDataModule)) >= set(spec)
    for option in sorted((CONF / "data").glob("*.yaml")):  # every data option composes it first
        if option.stem != "_datamodule":
            assert (yaml.safe_load(option.read_text()) or {}).get("defaults") == ["_datamodule", "_self_"], option.name


def test_data_sft_has_the_streaming_keys_and_refuses_streaming_in_one_line(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from diffuse.errors import DiffuseError
    from diffuse.run.build import build_datamodule

    path = tmp_path / "c.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n')
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["data=sft", f"data.path={path}", "data.streaming=true"])
    assert cfg.data.stream_val_docs == 2000
    with pytest.raises(DiffuseError, match=r"^data.streaming=true: data=sft cannot be streamed") as err:
        build_datamodule(cfg, seed=0, cache_dir=str(tmp_path))
    assert "\n" not in str(err.value)
