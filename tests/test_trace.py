"""sampling/trace.py: every sampler records its trajectory on request, the same tokens traced or not, batch = singles
traced; the recorded canvas ends on the tokens; masked decoding commits each position once; entropy and confidence
of the uniform predictor are ln V and 1/V; OFF outside `recording`."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SPECIAL, VOCAB, ZeroBackbone, tiny_transformer

from diffuse.objectives.autoregressive import Autoregressive
from diffuse.objectives.continuous import ContinuousEmbedding
from diffuse.objectives.masked_discrete import MaskedDiscrete
from diffuse.objectives.uniform import Uniform
from diffuse.sampling.ar import ARSampler
from diffuse.sampling.base import trim_at_eos
from diffuse.sampling.block import BlockSampler
from diffuse.sampling.ddim import DDIMSampler
from diffuse.sampling.drafters import ARDrafter
from diffuse.sampling.llada import EBSampler, LLaDASampler, ThresholdSampler
from diffuse.sampling.masked import AncestralSampler
from diffuse.sampling.speculative import SpeculativeSampler
from diffuse.sampling.trace import OFF, recorder, recording
from diffuse.sampling.uniform import UniformAncestralSampler
from diffuse.schedules import build_schedule

PROMPTS = [[3, 4, 5, 6], [8], [9, 10]]
AR = Autoregressive(special=SPECIAL)
MASKED = MaskedDiscrete(build_schedule("linear"), SPECIAL)
CASES = {
    "llada": (lambda: LLaDASampler(steps=6, span_length=3), lambda: MASKED),
    "threshold": (lambda: ThresholdSampler(threshold=0.05, steps=6, span_length=3, cache="dual"), lambda: MASKED),
    "ancestral": (lambda: AncestralSampler(steps=5), lambda: MASKED),
    "block": (lambda: BlockSampler(steps=2), lambda: MaskedDiscrete(build_schedule("linear"), SPECIAL, block_size=3)),
    "ar": (lambda: ARSampler(), lambda: AR),
    "speculative": (lambda: SpeculativeSampler(ARDrafter(tiny_transformer(seed=1), AR), draft_length=2), lambda: AR),
    "ddim": (lambda: DDIMSampler(steps=3), lambda: ContinuousEmbedding(build_schedule("linear"), SPECIAL)),
    "eb": (lambda: EBSampler(gamma=0.5, steps=6, span_length=3), lambda: MASKED),
    "uniform_ancestral": (lambda: UniformAncestralSampler(steps=3), lambda: Uniform(build_schedule("linear"), SPECIAL)),
}
TIME_CONDITIONED = ("ddim", "uniform_ancestral")


@pytest.mark.parametrize("name", CASES)
def test_traced_tokens_are_untraced_ones_and_batch_equals_singles(name):
    make, objective = CASES[name]
    sampler, obj, model = make(), objective(), tiny_transformer(seed=2, time_conditioning=name in TIME_CONDITIONED)
    plain = sampler.generate(model, obj, PROMPTS, 6, seed=3)
    assert recorder(sampler) is OFF
    with recording(sampler) as traj:
        assert recorder(sampler) is not OFF
        traced = sampler.generate(model, obj, PROMPTS, 6, seed=3)
    assert recorder(sampler) is OFF  # closed: the next run records nothing
    assert torch.equal(plain.tokens, traced.tokens) and plain.nfe == traced.nfe
    final = traj.steps[-1].canvas
    assert final.shape == (len(PROMPTS), 6)
    assert torch.equal(trim_at_eos(final, SPECIAL)[0], traced.tokens)  # the last canvas is the sample
    nfes = [s.nfe for s in traj.steps]
    assert nfes == sorted(nfes) and 0 < nfes[-1] <= traced.nfe  # each step names the pass it came from
    for r, prompt in enumerate(PROMPTS):  # batch = singles, traced: the same tokens, committed on the same steps
        with recording(sampler) as alone:
            one = sampler.generate(model, obj, [prompt], 6, seed=3 + r)
        assert torch.equal(one.tokens[0], traced.tokens[r])
        if name in ("llada", "ancestral", "block"):  # fixed step grids: step i of the batch is step i alone
            n = len(alone.steps)
            assert torch.equal(alone.committed_at()[0], traj.committed_at()[r]) and len(traj.steps) >= n


@pytest.mark.parametrize("name", ["llada", "threshold", "eb", "block"])
def test_masked_decoding_commits_each_position_once_and_never_revises(name):
    make, objective = CASES[name]
    with recording(sampler := make()) as traj:
        sampler.generate(tiny_transformer(seed=2), objective(), PROMPTS, 6, seed=0)
    times = torch.stack([s.committed for s in traj.steps]).sum(0)
    assert (times == 1).all()  # every generated position committed exactly once
    for before, after in zip(traj.steps, traj.steps[1:]):
        kept = before.canvas != SPECIAL.mask
        assert torch.equal(after.canvas[kept], before.canvas[kept])  # a committed token never changes
        assert (after.canvas[after.committed] != SPECIAL.mask).all()
        assert not after.remasked.any()


def test_uniform_predictor_has_entropy_ln_v_and_confidence_one_over_v():
    """ZeroBackbone: all logits 0, so p is uniform over the V − 1 tokens left when [MASK] is excluded."""
    sampler = LLaDASampler(steps=4, span_length=None)
    with recording(sampler) as traj:
        sampler.generate(ZeroBackbone(), MASKED, [[1, 2]], 4, seed=0)
    first = traj.steps[0]
    assert torch.allclose(first.entropy, torch.full((1, 4), math.log(VOCAB - 1)), atol=1e-5)
    assert torch.allclose(first.confidence, torch.full((1, 4), 1 / (VOCAB - 1)), atol=1e-6)
    with recording(ar := ARSampler()) as traj:
        ar.generate(ZeroBackbone(), AR, [[1]], 3, seed=0)
    assert [s.committed[0].nonzero().flatten().tolist() for s in traj.steps] == [[0], [1], [2]][: len(traj.steps)]
    assert torch.allclose(traj.steps[0].entropy[0, 0], torch.tensor(math.log(VOCAB - 1)))
    assert traj.steps[0].entropy[0, 1:].isnan().all()  # not predicted on that step


def test_on_step_streams_each_step_and_an_exception_stops_the_sampler():
    seen = []

    def stop_at_two(step):
        seen.append(step)
        if len(seen) == 2:
            raise KeyboardInterrupt

    sampler = LLaDASampler(steps=6, span_length=3)
    with pytest.raises(KeyboardInterrupt), recording(sampler, on_step=stop_at_two):
        sampler.generate(tiny_transformer(), MASKED, [[1]], 6, seed=0)
    assert len(seen) == 2 and recorder(sampler) is OFF
