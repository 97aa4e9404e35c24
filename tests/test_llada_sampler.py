"""sampler=llada and sampler=threshold: commitments are final, blocks go left to right, every mask
is filled, NFE is counted, batches equal single samples whatever the prompt lengths."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import SPECIAL, VOCAB, FixedLogits, ZeroBackbone, tiny_transformer
from diffuse.errors import DiffuseError
from diffuse.objectives.llada import LLaDA
from diffuse.objectives.masked_discrete import MaskedDiscrete
from diffuse.sampling.llada import LLaDASampler, ThresholdSampler
from diffuse.schedules import build_schedule

PROMPTS = [[3, 4, 5, 6, 7], [8], [9, 10, 11]]


class Recorder(nn.Module):
    """Wraps a backbone and keeps every input it is given."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []
        self.time_conditioned = False

    def forward(self, ids=None, **kw):
        self.seen.append(ids.clone())
        return self.inner(ids=ids, **kw)

    def logits(self, hidden):
        return self.inner.logits(hidden)


@pytest.fixture(scope="module")
def objective():
    return LLaDA(SPECIAL, build_schedule("linear"))


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_commitments_are_final_blocks_go_left_to_right_and_every_mask_is_filled(objective, remasking):
    model = Recorder(tiny_transformer())
    length, block = 8, 4
    sampler = LLaDASampler(steps=8, span_length=block, remasking=remasking)
    out = sampler.generate(model, objective, [PROMPTS[0]], length, seed=0)
    start = 1 + len(PROMPTS[0])
    spans = [z[0, start:start + length] for z in model.seen] + [out.tokens[0]]
    for before, after in zip(spans, spans[1:]):
        committed = before != SPECIAL.mask
        assert (after[committed] == before[committed]).all()  # a committed token never changes
        assert (after == SPECIAL.mask).sum() < (before == SPECIAL.mask).sum()  # each pass commits something
        if (before[:block] == SPECIAL.mask).any():
            assert (after[block:] == SPECIAL.mask).all()  # the second block waits for the first
    assert (out.tokens != SPECIAL.mask).all()
    assert out.nfe == len(model.seen) == 8  # 8 steps over two blocks of 4: one token per step
    assert all((z[0, :start] == torch.tensor([SPECIAL.bos, *PROMPTS[0]])).all() for z in model.seen)


def test_steps_are_split_evenly_across_blocks():
    assert LLaDASampler(steps=7, span_length=4).blocks(10) == [(0, 4, 3), (4, 8, 2), (8, 10, 2)]
    assert LLaDASampler(steps=4, span_length=None).blocks(6) == [(0, 6, 4)]
    with pytest.raises(DiffuseError, match="span_length"):
        LLaDASampler(steps=2, span_length=2).blocks(8)


@pytest.mark.parametrize("sampler", [LLaDASampler(steps=6, span_length=3, temperature=1.0),
                                     LLaDASampler(steps=6, span_length=3, remasking="random"),
                                     ThresholdSampler(threshold=0.3, steps=6, span_length=3, temperature=1.0),
                                     LLaDASampler(steps=6, span_length=3, temperature=0.0, cfg_scale=1.5)],
                         ids=["llada", "llada-random", "threshold", "llada-cfg"])
def test_batch_of_prompts_of_different_lengths_equals_singles(objective, sampler):
    """Row r of a batch drawn with seed s is the single sample drawn with seed s + r (base.row_generators),
    whatever the other prompts' lengths: draws happen in the frame of each generated span."""
    model = tiny_transformer()
    batch = sampler.generate(model, objective, PROMPTS, 6, seed=3)
    for r, prompt in enumerate(PROMPTS):
        alone = sampler.generate(model, objective, [prompt], 6, seed=3 + r)
        assert batch.tokens[r].tolist() == alone.tokens[0].tolist()
        assert batch.lengths[r] == alone.lengths[0]
        assert batch.nfe_per_row()[r] == alone.nfe
    assert batch.prompts == PROMPTS


class Sharpened(nn.Module):
    """A backbone whose logits are scaled up: confidences spread out, so threshold decoding commits a
    different number of tokens per row and the rows of a batch finish at different steps."""

    def __init__(self, inner, scale: float):
        super().__init__()
        self.inner, self.scale, self.time_conditioned = inner, scale, False

    def forward(self, ids=None, **kw):
        return self.inner(ids=ids, **kw)

    def logits(self, hidden):
        return self.inner.logits(hidden) * self.scale


@pytest.mark.parametrize("span_length", [None, 4])
def test_threshold_rows_that_finish_early_match_their_single_samples(objective, span_length):
    """A row done with its block waits for the batch: it must not use up random draws (it would decode
    its next block differently from the same sample alone), and its cost is its own passes, not the batch's."""
    model = Sharpened(tiny_transformer(), 30.0)
    sampler = ThresholdSampler(threshold=0.3, steps=12, span_length=span_length, temperature=1.0)
    batch = sampler.generate(model, objective, PROMPTS, 12, seed=3)
    alone = [sampler.generate(model, objective, [p], 12, seed=3 + r) for r, p in enumerate(PROMPTS)]
    assert [batch.tokens[r].tolist() for r in range(3)] == [a.tokens[0].tolist() for a in alone]
    assert batch.row_nfe.tolist() == [a.nfe for a in alone]
    assert len(set(batch.row_nfe.tolist())) > 1 and batch.nfe == max(batch.row_nfe.tolist())  # rows did differ


def peaked_logits(width: int, token: int, p: float) -> torch.Tensor:
    """Every position puts probability p on `token` (of the 39 non-mask tokens)."""
    other = (1 - p) / (VOCAB - 2)
    probs = torch.full((1, width, VOCAB), other)
    probs[..., token] = p
    return probs.log()


def test_threshold_uses_fewer_forward_passes_when_confident(objective):
    prompt, length = [3, 4], 10
    confident = FixedLogits(peaked_logits(1 + len(prompt) + length, 5, 0.95))
    out = ThresholdSampler(threshold=0.9, steps=10).generate(confident, objective, [prompt], length)
    assert out.nfe == 1 and (out.tokens == 5).all()
    unsure = ZeroBackbone()  # confidence 1/39 < τ: exactly one token per step
    out = ThresholdSampler(threshold=0.9, steps=10).generate(unsure, objective, [prompt], length)
    assert out.nfe == 10 and (out.tokens != SPECIAL.mask).all()
    capped = ThresholdSampler(threshold=0.9, steps=4).generate(unsure, objective, [prompt], length)
    assert capped.nfe == 4 and (capped.tokens != SPECIAL.mask).all()  # the last step fills the rest


def test_guidance_runs_an_unconditional_pass_with_the_prompt_masked(objective):
    prompt, length = [3, 4, 5], 4
    model = FixedLogits(peaked_logits(1 + len(prompt) + length, 6, 0.5))
    out = LLaDASampler(steps=4, span_length=None, cfg_scale=2.0).generate(model, objective, [prompt], length)
    assert out.nfe == 8 == len(model.seen)
    cond, uncond = model.seen[0][0], model.seen[1][0]
    assert cond[1:4].tolist() == prompt and (uncond[1:4] == SPECIAL.mask).all() and uncond[0] == SPECIAL.bos


def test_generation_stops_at_eos_and_reports_lengths(objective):
    prompt, length = [3], 6
    logits = peaked_logits(1 + len(prompt) + length, 7, 0.9)
    logits[0, 1 + len(prompt) + 2, SPECIAL.eos] = 10.0  # the third generated slot is EOS
    out = LLaDASampler(steps=6, span_length=None, temperature=0.0).generate(FixedLogits(logits), objective,
                                                                            [prompt], length)
    assert out.lengths.tolist() == [2] and out.tokens[0, 2:].eq(SPECIAL.pad).all()


def test_works_for_masked_discrete_too():
    md = MaskedDiscrete(build_schedule("linear"), SPECIAL)
    out = LLaDASampler(steps=4, span_length=2).generate(tiny_transformer(), md, [[3, 4]], 4)
    assert (out.tokens != SPECIAL.mask).all() and out.nfe == 4


def test_bad_settings_fail_in_one_line():
    with pytest.raises(DiffuseError, match="threshold"):
        ThresholdSampler(threshold=0.0)
    with pytest.raises(DiffuseError, match="span_length"):
        LLaDASampler(span_length=0)
    with pytest.raises(DiffuseError, match="remasking"):
        LLaDASampler(remasking="entropy")
