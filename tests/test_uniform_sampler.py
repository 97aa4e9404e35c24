"""sampler=uniform_ancestral (Duo's exact posterior) on objective=uniform: the one-step law is x_θ, batch = singles
(self-conditioned too), EOS, the sampler/objective pairing, and a tiny training run that samples."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from diffuse.errors import DiffuseError
from diffuse.objectives.uniform import Uniform
from diffuse.run.build import build_sampler
from diffuse.sampling.uniform import UniformAncestralSampler
from diffuse.schedules import build_schedule
from tests.conftest import SPECIAL, VOCAB, call_main, tiny_args, tiny_transformer


class RowLogits(nn.Module):
    """The same logits [V] at every position, whatever the input."""

    time_conditioned = False

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.fixed, self.vocab_size = logits, logits.shape[-1]
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, ids=None, t=None, segment_ids=None, **_):
        return self.fixed.expand(*ids.shape, -1).clone()

    def logits(self, hidden):
        return hidden


def uniform_objective(schedule="linear"):
    return Uniform(build_schedule(schedule), SPECIAL)


def test_one_step_draws_from_x_theta():
    """t = 1 → 0 in one step: α_t = 0 makes z_t uninformative and α_s = 1 makes the posterior x_θ itself."""
    logits = torch.full((VOCAB,), -9.0)
    logits[[3, 7, 11, 20]] = torch.tensor([2.0, 1.0, 0.0, 1.5])
    out = UniformAncestralSampler(steps=1).generate(RowLogits(logits), uniform_objective(), [[]] * 300, 8, seed=0)
    freq = torch.bincount(out.tokens.flatten(), minlength=VOCAB).float() / out.tokens.numel()
    assert out.nfe == 1 and (freq - logits.softmax(-1)).abs().sum() / 2 < 0.04


def test_batch_equals_singles_self_conditioned():
    model = tiny_transformer(self_condition=True, time_conditioning=True)
    torch.nn.init.normal_(model.self_cond.mlp.down.weight, std=0.2)
    calls = []
    model.register_forward_hook(lambda m, args, kw, out: calls.append("prev_probs" in kw), with_kwargs=True)
    sampler, obj = UniformAncestralSampler(steps=4), uniform_objective("cosine")
    prompts = [[1, 2, 3], [], [5]]
    batch = sampler.generate(model, obj, prompts, 6, seed=3)
    assert calls == [False, True, True, True] and batch.nfe == 4
    for i, p in enumerate(prompts):
        one = sampler.generate(model, obj, [p], 6, seed=3 + i)
        assert torch.equal(one.tokens[0], batch.tokens[i]) and one.lengths[0] == batch.lengths[i]


def test_eos_trims_and_argmax():
    logits = torch.full((VOCAB,), -5.0)
    logits[SPECIAL.eos] = 5.0
    out = UniformAncestralSampler(steps=3, temperature=0).generate(RowLogits(logits), uniform_objective(), [[1]], 5)
    assert out.lengths.tolist() == [0] and (out.tokens == SPECIAL.pad).all()


def test_pairing_and_bad_keys():
    assert type(build_sampler(None, uniform_objective())).__name__ == "UniformAncestralSampler"
    from diffuse.objectives.masked_discrete import MaskedDiscrete

    with pytest.raises(DiffuseError, match="uniform_ancestral decodes uniform"):
        build_sampler({"name": "uniform_ancestral"}, MaskedDiscrete(build_schedule("linear"), SPECIAL))
    with pytest.raises(DiffuseError, match="sampler.steps"):
        UniformAncestralSampler(steps=0)


def test_train_uniform_self_conditioned_and_sample(corpus, tmp_path):
    args = [a for a in tiny_args(corpus, tmp_path / "run") if not a.startswith("num_samples")]
    res = call_main("diffuse.train", *args, "objective=uniform", "objective.loss=ce", "model.self_condition=true",
                    "num_samples=2", "sampler.steps=4")
    assert res.returncode == 0, res
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["val/nelbo"] > 0


def test_block_uniform_cache_is_exact_and_batch_equals_singles():
    model = tiny_transformer(time_conditioning=True, self_condition=True)
    torch.nn.init.normal_(model.self_cond.mlp.down.weight, std=0.2)  # the previous step's probabilities matter
    obj = Uniform(build_schedule("linear"), SPECIAL, block_size=4)
    sampler = UniformAncestralSampler(steps=3)
    prompts = [[1, 2, 3, 4, 5], [6]]
    cached = sampler.generate(model, obj, prompts, 10, seed=1)

    class NoCache(nn.Module):  # the same network seen without its KV cache: the uncached block-causal canvas
        def __init__(self, inner):
            super().__init__()
            self.inner, self.vocab_size, self.time_conditioned = inner, inner.vocab_size, inner.time_conditioned
            self.self_conditioned = inner.self_conditioned

        def forward(self, **kw):
            return self.inner(**kw)

        def logits(self, h):
            return self.inner.logits(h)

    uncached = sampler.generate(NoCache(model), obj, prompts, 10, seed=1)
    assert torch.equal(cached.tokens, uncached.tokens) and cached.nfe > uncached.nfe  # + prefill and commits
    for i, p in enumerate(prompts):
        assert torch.equal(sampler.generate(model, obj, [p], 10, seed=1 + i).tokens[0], cached.tokens[i])
