"""Capabilities (diffuse/contracts.py): what a sampler, distiller or regularizer calls beyond an objective's or a
backbone's contract is declared there, and a missing one is named in one line at build time, not met as an
AttributeError mid-loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import SPECIAL, ZeroBackbone, tiny_transformer
from diffuse.contracts import (
    GAUSSIAN,
    Absorbing,
    Blockwise,
    Cached,
    Gaussian,
    NoisingObjective,
    Seekable,
    TakesBlockLayout,
    block_size_of,
    check_contract,
    new_cache,
)
from diffuse.errors import DiffuseError
from diffuse.registry import OBJECTIVES, SAMPLERS
from diffuse.run.build import build_sampler
from diffuse.schedules import build_schedule


def objective(name: str, **kw):
    return OBJECTIVES.build({"name": name, **kw}, schedule=build_schedule("linear"), special=SPECIAL)


class PlainGaussian(nn.Module):
    """A plugin objective on the Gaussian process: every noising hook, none of what DDIM steps with."""

    registry_name = "plain_gaussian"
    process, causal, default_sampler, special, eps = GAUSSIAN, False, "ddim", SPECIAL, 1e-3

    def loss(self, backbone, batch, generator=None, train=True, t_range=None): ...
    def sample_t(self, x0, generator=None, train=True, t_range=None): ...
    def draw_noise(self, x0, generator=None): ...
    def corrupt(self, x0, t, noise, batch): ...
    def predict(self, backbone, z, t, batch): ...
    def still_noisy(self, z): ...
    def noise_level(self, t): ...
    def distance(self, pred, target, where): ...


def test_a_noising_objective_without_the_gaussian_capability_is_refused_by_ddim_in_one_line():
    plugin = PlainGaussian()
    check_contract(plugin, NoisingObjective, "objective=plain_gaussian")  # it meets the noising contract
    with pytest.raises(DiffuseError) as err:
        build_sampler({"name": "ddim"}, plugin)
    message = str(err.value)
    assert "\n" not in message and "sampler=ddim" in message and "Gaussian contract" in message
    assert "missing alpha_bar, embedding_table, noised, num_timesteps, round_logits" in message


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_every_sampler_declares_the_capabilities_it_needs(name):
    cls = SAMPLERS.get(name)
    assert isinstance(cls.requires, tuple)
    assert all(getattr(c, "_is_protocol", False) for c in cls.requires)


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_every_objective_meets_what_its_default_sampler_requires(name):
    obj = objective(name)
    for capability in SAMPLERS.get(obj.default_sampler).requires:
        check_contract(obj, capability, name)


def test_built_in_objectives_declare_their_capabilities():
    check_contract(objective("continuous"), Gaussian, "continuous")
    for name in ("masked_discrete", "llada"):
        check_contract(objective(name), Absorbing, name)
        assert isinstance(objective(name), Blockwise) and block_size_of(objective(name)) is None
        assert block_size_of(objective(name, block_size=4)) == 4
    assert not isinstance(objective("autoregressive"), Absorbing)
    assert block_size_of(objective("continuous")) is None


def test_the_block_process_and_sampler_are_derived_not_written_on_the_instance():
    full, blocks = objective("llada"), objective("llada", block_size=4)
    assert (full.process, full.default_sampler) == ("absorbing", "llada")
    assert (blocks.process, blocks.default_sampler) == ("block_absorbing", "block")
    assert "process" not in vars(blocks) and "default_sampler" not in vars(blocks)


def test_backbone_capabilities():
    model = tiny_transformer()
    assert isinstance(model, Cached) and isinstance(model, TakesBlockLayout) and model.supports_block_layout
    assert isinstance(new_cache(model, 8), Seekable)
    assert not isinstance(ZeroBackbone(), Cached) and new_cache(ZeroBackbone(), 8) is None
    from diffuse.models.mamba2 import Mamba2

    mamba = Mamba2(vocab_size=64, d_model=16, n_layers=1, d_state=8, headdim=8, chunk_size=4)
    assert isinstance(mamba, Cached) and not isinstance(new_cache(mamba, 8), Seekable)
    assert isinstance(mamba, TakesBlockLayout) and not mamba.supports_block_layout
    assert torch.is_tensor(mamba(ids=torch.zeros(1, 4, dtype=torch.long)))
