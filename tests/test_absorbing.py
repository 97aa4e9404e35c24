"""The absorbing-state family and the objective contract: t_range draws, objectives as nn.Modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import SPECIAL, ZeroBackbone
from diffuse.contracts import ABSORBING, AUTOREGRESSIVE, NoisingObjective, Objective
from diffuse.objectives.absorbing import AbsorbingObjective
from diffuse.objectives.autoregressive import Autoregressive
from diffuse.objectives.llada import LLaDA
from diffuse.objectives.masked_discrete import MaskedDiscrete
from diffuse.registry import OBJECTIVES
from diffuse.schedules import Schedule, build_schedule

MAKERS = {
    "masked_discrete": lambda: MaskedDiscrete(build_schedule("cosine"), SPECIAL),
    "masked_per_token": lambda: MaskedDiscrete(build_schedule("linear"), SPECIAL, single_ratio_per_sequence=False),
    "llada": lambda: LLaDA(SPECIAL, build_schedule("linear")),
    "llada_clamped": lambda: LLaDA(SPECIAL, build_schedule("cosine"), min_mask_ratio=0.5, max_mask_ratio=0.6),
    "masked_clamped": lambda: MaskedDiscrete(build_schedule("linear"), SPECIAL, min_mask_ratio=0.5),
}


def batch_of(B=64, L=32):
    ids = torch.randint(0, 36, (B, L), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = SPECIAL.bos
    return {"input_ids": ids, "segment_ids": torch.ones_like(ids)}


@pytest.mark.parametrize("name", MAKERS)
def test_t_range_draws_uniformly_inside_the_range_without_clamping(name):
    obj, x0 = MAKERS[name](), batch_of()["input_ids"]
    lo, hi = 0.05, 0.2  # below every clamp above: no clamp applies
    t = obj.sample_t(x0, torch.Generator().manual_seed(3), train=True, t_range=(lo, hi))
    assert t.shape == (64, 1) and t.min() >= lo and t.max() <= hi and t.std() > 0.02
    u = torch.rand((64, 1), generator=torch.Generator().manual_seed(3))  # the gradient analysis' draw
    assert torch.equal(t, lo + (hi - lo) * u)
    assert torch.equal(obj.sample_t(x0, torch.Generator().manual_seed(3), train=False, t_range=(lo, hi)), t)


@pytest.mark.parametrize("name", ["masked_discrete", "llada_clamped"])
def test_the_loss_takes_t_range(name):
    obj, batch = MAKERS[name](), batch_of()
    low = obj.loss(ZeroBackbone(), batch, torch.Generator().manual_seed(0), t_range=(0.01, 0.02))
    high = obj.loss(ZeroBackbone(), batch, torch.Generator().manual_seed(0), t_range=(0.98, 1.0))
    assert float(low.metrics["mask_ratio"]) < 0.05 < 0.9 < float(high.metrics["mask_ratio"])
    same = obj.loss(ZeroBackbone(), batch, torch.Generator().manual_seed(0), t_range=(0.01, 0.02))
    assert torch.equal(same.loss, low.loss)


OBJECTIVES_ = {
    "masked_discrete": (lambda: MaskedDiscrete(build_schedule("linear"), SPECIAL), ABSORBING, "ancestral"),
    "llada": (lambda: LLaDA(SPECIAL, build_schedule("linear")), ABSORBING, "llada"),
    "autoregressive": (lambda: Autoregressive(SPECIAL), AUTOREGRESSIVE, "ar"),
}


@pytest.mark.parametrize("name", OBJECTIVES_)
def test_objectives_are_modules_that_carry_state_with_their_parent(name):
    make, process, sampler = OBJECTIVES_[name]
    obj = make()
    assert isinstance(obj, nn.Module) and isinstance(obj, Objective)
    assert obj.process == process and obj.default_sampler == sampler and obj.registry_name == name
    assert OBJECTIVES.get(name) is type(obj) and obj.global_step == 0
    assert isinstance(obj, NoisingObjective) == (process == ABSORBING)
    assert obj.state_dict() == {}  # no state of their own: checkpoints keep their keys
    if hasattr(obj, "schedule"):
        assert isinstance(obj.schedule, Schedule) and not isinstance(obj.schedule, nn.Module)

    obj.register_buffer("ema", torch.zeros(3))  # what a stateful objective (a teacher, an EMA) would own
    obj.teacher = nn.Linear(2, 2)
    parent = nn.Module()
    parent.objective = obj
    parent.to(torch.float64)
    assert obj.ema.dtype == torch.float64 and obj.teacher.weight.dtype == torch.float64
    assert {"objective.ema", "objective.teacher.weight", "objective.teacher.bias"} <= set(parent.state_dict())


def test_a_variant_is_its_hooks():
    """A new absorbing objective changes one hook; corrupt, noise_level and the loss follow it."""

    class HalfMasked(AbsorbingObjective):
        def mask_prob(self, t):
            return 0.5 * t

    obj, batch = HalfMasked(build_schedule("linear"), SPECIAL), batch_of(B=8, L=2048)
    x0 = batch["input_ids"]
    z = obj.corrupt(x0, torch.ones(8, 1), obj.draw_noise(x0, torch.Generator().manual_seed(0)), batch)
    assert float(obj.still_noisy(z).float().mean()) == pytest.approx(0.5, abs=0.02)
    assert float(obj.noise_level(torch.tensor(0.4))) == pytest.approx(0.2)
    out = obj.loss(ZeroBackbone(), batch, torch.Generator().manual_seed(0), t_range=(1.0, 1.0))
    assert float(out.metrics["mask_ratio"]) == pytest.approx(0.5, abs=0.02)
