"""The shared decode loop of the absorbing samplers (sampling/absorbing.py): tokens committed per step
(LLaDA's reference split for llada-linear, the round rule elsewhere), and what every sampler declares:
its processes and Python defaults equal to its yaml."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from conftest import SPECIAL, ZeroBackbone, tiny_transformer
from diffuse import contracts
from diffuse.errors import DiffuseError
from diffuse.objectives.llada import LLaDA
from diffuse.registry import SAMPLERS
from diffuse.sampling import ar, ddim, llada, masked
from diffuse.sampling.base import rand_rows
from diffuse.schedules import build_schedule

OBJECTIVE = LLaDA(SPECIAL, build_schedule("linear"))
CONF = Path(__file__).resolve().parents[1] / "conf" / "sampler"


class Recorder(nn.Module):
    """Wraps a backbone and keeps every input canvas."""

    time_conditioned = False

    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, ids=None, **kw):
        self.seen.append(ids.clone())
        return self.inner(ids=ids, **kw)

    def logits(self, hidden):
        return self.inner.logits(hidden)


def commits_per_step(sampler, length: int) -> list[int]:
    """Tokens committed on each step for one empty prompt. The uniform predictor commits on every step, so
    each step has its own forward pass: the masks left before each pass, differenced."""
    model = Recorder(ZeroBackbone())
    out = sampler.generate(model, OBJECTIVE, [[]], length, seed=0)
    left = [int((z[0, 1:1 + length] == SPECIAL.mask).sum()) for z in model.seen] + [0]
    assert (out.tokens != SPECIAL.mask).all() and out.nfe == len(model.seen)
    return [a - b for a, b in zip(left, left[1:])]


def test_llada_linear_gives_the_remainder_to_the_first_steps_as_the_reference():
    """LLaDA's get_num_transfer_tokens: base = n // steps, the first n % steps steps commit one more."""
    assert commits_per_step(llada.LLaDASampler(steps=4, span_length=None), 10) == [3, 3, 2, 2]
    assert commits_per_step(llada.LLaDASampler(steps=5, span_length=None), 12) == [3, 3, 2, 2, 2]
    # per block: two blocks of 10 with 4 steps each
    assert commits_per_step(llada.LLaDASampler(steps=8, span_length=10), 20) == [3, 3, 2, 2] * 2
    assert commits_per_step(llada.LLaDASampler(steps=4, span_length=None), 8) == [2, 2, 2, 2]


def test_remask_keeps_the_round_rule():
    """remask: k = round(n·(1 − (1−α(s))/(1−α(t)))), unchanged (round half to even on the ε-grid)."""
    assert commits_per_step(masked.RemaskSampler(steps=4, schedule="linear"), 10) == [2, 3, 2, 3]
    assert commits_per_step(masked.RemaskSampler(steps=5, schedule="linear"), 12) == [2, 2, 3, 2, 3]


@pytest.mark.parametrize("schedule", ["cosine", "cosine_maskgit"])
def test_llada_with_another_schedule_is_the_remask_rule_in_blocks(schedule):
    model = tiny_transformer()
    one_block = llada.LLaDASampler(steps=6, span_length=None, schedule=schedule)
    remask = masked.RemaskSampler(steps=6, schedule=schedule)
    a = one_block.generate(model, OBJECTIVE, [[3, 4], [5]], 9, seed=2)
    b = remask.generate(model, OBJECTIVE, [[3, 4], [5]], 9, seed=2)
    assert torch.equal(a.tokens, b.tokens) and a.nfe == b.nfe
    assert commits_per_step(one_block, 12) == commits_per_step(remask, 12)


def test_threshold_commits_one_a_step_when_nothing_reaches_tau_and_the_last_step_the_rest():
    assert commits_per_step(llada.ThresholdSampler(threshold=0.9, steps=4), 7) == [1, 1, 1, 4]
    assert commits_per_step(llada.ThresholdSampler(threshold=0.9, steps=4, span_length=3), 6) == [1, 2, 1, 2]


def test_rand_rows_draws_nothing_for_waiting_rows():
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    out = rand_rows(gens, (3,), "cpu", active=torch.tensor([False, True]))
    assert out[0].eq(1.0).all()
    assert torch.equal(out[1], torch.rand(3, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(torch.rand(3, generator=gens[0]), torch.rand(3, generator=torch.Generator().manual_seed(0)))


def registered() -> dict[str, type]:
    return {name: SAMPLERS.get(name) for name in ("ancestral", "remask", "llada", "threshold", "ddim", "ar")}


def test_every_sampler_declares_its_processes():
    expected = {"ancestral": contracts.ABSORBING, "remask": contracts.ABSORBING, "llada": contracts.ABSORBING,
                "threshold": contracts.ABSORBING, "ddim": contracts.GAUSSIAN, "ar": contracts.AUTOREGRESSIVE}
    for name, cls in registered().items():
        assert cls.processes == (expected[name],), name
        for gone in ("compatible", "needs_causal", "sample_space"):
            assert not hasattr(cls, gone), (name, gone)
    assert registered()["ar"] is ar.ARSampler and registered()["ddim"] is ddim.DDIMSampler


@pytest.mark.parametrize("name", ["ancestral", "remask", "llada", "threshold", "ddim", "ar"])
def test_python_defaults_equal_the_yaml(name):
    """A sampler built from `{name: X}` alone is the one conf/sampler/X.yaml describes."""
    spec = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    assert spec.pop("name") == name
    params = inspect.signature(SAMPLERS.get(name)).parameters
    defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    assert set(spec) <= set(defaults), set(spec) - set(defaults)
    assert {k: defaults[k] for k in spec} == spec
    assert all(p.default is not inspect.Parameter.empty for p in params.values())  # {name: X} alone builds
    SAMPLERS.build({"name": name})


def test_ar_takes_no_steps_or_schedule():
    with pytest.raises(DiffuseError, match="steps"):
        SAMPLERS.build({"name": "ar", "steps": 8})
    with pytest.raises(DiffuseError, match="schedule"):
        SAMPLERS.build({"name": "ar", "schedule": "linear"})
